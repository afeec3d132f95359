"""Relayed UDP datagrams on the peer's side: relay addresses and the router.

When a pairing's verdict is *relay*, the peer behind it gets a relay address
``(RELAY_HOST, number)``; the UDP channel sends to it like to any endpoint,
and :class:`Router` (the sender the channel uses for all its datagrams)
sends those through the rendezvous server, prefixed with the pair's nonce,
and everything else straight (see :mod:`fmi_async.holepunch.udp`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .net import Address, DatagramSender

if TYPE_CHECKING:
    from .udp import UDPHolePuncher

__all__ = ["RELAY_HOST", "Router"]

logger = logging.getLogger(__name__)

RELAY_HOST = "<relay>"
"""Host part of a relay address: not a valid host name, so never a real endpoint."""


class Router:
    """The channel's sender: relay addresses go through the server, the rest straight."""

    __slots__ = ("out", "puncher")

    def __init__(self, puncher: UDPHolePuncher, out: DatagramSender) -> None:
        self.puncher = puncher
        self.out = out

    def sendto(self, data: bytes, addr: Address) -> None:
        if addr[0] == RELAY_HOST:
            self.puncher.send_relayed(self.out, data, addr[1])
        else:
            self.out.sendto(data, addr)

    def is_closing(self) -> bool:
        """Whether the transport underneath is closing (wrappers that delay
        datagrams ask before sending late)."""
        closing = getattr(self.out, "is_closing", None)
        return bool(closing()) if closing is not None else False
