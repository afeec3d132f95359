"""Dollars for what a channel actually carried (``comm.stats()``, ``fmi cost``)."""

from __future__ import annotations

from ..channels.base import ChannelStats
from .model import ChannelModel

__all__ = ["channel_cost"]


def channel_cost(kind: str, stats: ChannelStats, model: ChannelModel) -> float:
    """Requests by kind at their price, bytes sent at the transfer price, and the
    infrastructure share per message (direct) or request (storage)."""
    if kind == "mediated":
        calls = sum(v for k, v in stats.requests.items() if not k.endswith("_units"))
    else:
        calls = stats.messages_sent
    return (
        model.request_cost(stats.requests)
        + model.infra_cost(calls)
        + model.transfer_cost(stats.bytes_sent)
    )
