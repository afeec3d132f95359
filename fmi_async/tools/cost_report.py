"""``fmi cost``: what a run's channels carried and cost, from saved ``comm.stats()``.

It reads ``comm.stats()`` dictionaries saved as JSON and prices them with the
model of a config, so the same run can be re-priced under other prices
(another region, a calibrated model) without running it again.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..channels import registry
from ..channels.base import ChannelStats
from ..errors import ConfigError
from ..selection.cost import channel_cost
from ..selection.model import CostModel
from .plan_report import cost_model, load_config
from .tables import indent, render_table
from .units import fmt_bytes, fmt_seconds, fmt_usd

__all__ = ["add_cost_arguments", "cmd_cost", "cost_report", "load_stats"]

logger = logging.getLogger(__name__)


def load_stats(path: Path) -> list[dict[str, Any]]:
    """``comm.stats()`` dictionaries from a JSON file: one object, a list of them,
    an object keyed by peer, or JSON lines.

    Raises :class:`~fmi_async.errors.ConfigError` when the file cannot be
    read, is neither JSON nor JSON lines, or holds no stats dictionaries.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the stats file {path}: {exc.strerror}") from exc
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{path} is neither JSON nor JSON lines: {exc}; save json.dumps(comm.stats()) "
                "(one per peer, or a list of them)"
            ) from exc
    if isinstance(data, Mapping) and "channels" not in data:
        data = list(data.values())  # keyed by peer
    items = [data] if isinstance(data, Mapping) else data
    if not isinstance(items, list) or not all(
        isinstance(s, Mapping) and isinstance(s.get("channels"), Mapping) for s in items
    ):
        raise ConfigError(
            f"{path}: expected comm.stats() dictionaries (with a 'channels' object), one or a list"
        )
    return [dict(s) for s in items]


def _channel_stats(entry: Mapping[str, Any]) -> ChannelStats:
    def count(key: str) -> int:
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"stats: {key} must be a number, got {value!r}")
        return int(value)

    return ChannelStats(
        messages_sent=count("messages_sent"),
        bytes_sent=count("bytes_sent"),
        messages_received=count("messages_received"),
        bytes_received=count("bytes_received"),
        requests=Counter({str(k): v for k, v in dict(entry.get("requests", {})).items()}),
        seconds=float(entry.get("seconds", 0.0)),
    )


def cost_report(stats: Sequence[Mapping[str, Any]], models: CostModel) -> dict[str, Any]:
    """Price each peer's channels and function time; totals over peers.

    Channel dollars are recomputed from the counters with ``models`` (not
    copied from the file), so a run can be re-priced under another config.
    Raises :class:`~fmi_async.errors.ConfigError` for an unknown channel or
    a counter that is not a number.
    """
    peers: list[dict[str, Any]] = []
    total_channels: dict[str, dict[str, Any]] = {}
    total = {"channels_usd": 0.0, "faas_gb_seconds": 0.0, "faas_usd": 0.0, "total_usd": 0.0}
    for index, s in enumerate(stats):
        rows: dict[str, dict[str, Any]] = {}
        channels_usd = 0.0
        for name, entry in sorted(dict(s["channels"]).items()):
            if name not in registry.names():
                raise ConfigError(f"stats name an unknown channel {name!r}")
            kind = registry.spec(name).kind
            cs = _channel_stats(entry)
            usd = channel_cost(kind, cs, models.channel(name))
            row = {
                "messages_sent": cs.messages_sent,
                "bytes_sent": cs.bytes_sent,
                "messages_received": cs.messages_received,
                "bytes_received": cs.bytes_received,
                "requests": dict(cs.requests),
                "seconds": cs.seconds,
                "usd": usd,
            }
            rows[name] = row
            channels_usd += usd
            acc = total_channels.setdefault(
                name, {**{k: 0 for k in row if k != "requests"}, "requests": Counter()}
            )
            for key, value in row.items():
                if key == "requests":
                    acc["requests"].update(value)
                else:
                    acc[key] += value
        cost = dict(s.get("cost", {}))
        memory_mb = float(cost.get("faas_memory_mb", models.faas_memory_mb))
        seconds_open = float(cost.get("seconds_open", 0.0))
        gb_s = seconds_open * memory_mb / 1024.0
        faas = gb_s * models.faas_gb_second
        peers.append(
            {
                "peer": s.get("peer", index),
                "channels": rows,
                "collectives": dict(s.get("collectives", {})),
                "predicted": dict(s.get("predicted", {})),
                "channels_usd": channels_usd,
                "faas_memory_mb": memory_mb,
                "seconds_open": seconds_open,
                "faas_gb_seconds": gb_s,
                "faas_usd": faas,
                "total_usd": channels_usd + faas,
            }
        )
        total["channels_usd"] += channels_usd
        total["faas_gb_seconds"] += gb_s
        total["faas_usd"] += faas
        total["total_usd"] += channels_usd + faas
    for acc in total_channels.values():
        acc["requests"] = dict(acc["requests"])
    return {"peers": peers, "channels": total_channels, "total": total}


# ---------------------------------------------------------------- fmi cost


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi cost``."""
    parser.add_argument("stats", type=Path, help="JSON file of comm.stats() (one or a list)")
    parser.add_argument("--config", type=Path, help="JSON config whose model prices the run")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _channel_line(name: str, row: Mapping[str, Any]) -> list[str]:
    requests = ", ".join(f"{k} {v:g}" for k, v in sorted(row["requests"].items())) or "-"
    return [
        name,
        f"{row['messages_sent']}",
        fmt_bytes(row["bytes_sent"]),
        f"{row['messages_received']}",
        fmt_bytes(row["bytes_received"]),
        requests,
        fmt_seconds(row["seconds"]),
        fmt_usd(row["usd"]),
    ]


_COST_HEADERS = ["channel", "sent", "bytes", "received", "bytes", "requests", "seconds", "cost"]


def cmd_cost(args: argparse.Namespace) -> int:
    """Print what each channel carried and cost, per peer and in total.

    Raises :class:`~fmi_async.errors.ConfigError` for a stats file or config
    that cannot be read (see :func:`load_stats`, :func:`cost_report`).
    """
    stats = load_stats(args.stats)
    models = cost_model(load_config(args.config), 2048.0)
    report = cost_report(stats, models)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for p in report["peers"]:
        print(f"peer {p['peer']}:")
        lines = [_channel_line(n, r) for n, r in p["channels"].items()]
        print(indent(render_table(_COST_HEADERS, lines, right="1234678")))
        print(
            f"  function: {p['faas_memory_mb']:g} MB x {p['seconds_open']:.3f} s = "
            f"{p['faas_gb_seconds']:.4g} GB-s, {fmt_usd(p['faas_usd'])}; channels "
            f"{fmt_usd(p['channels_usd'])}; total {fmt_usd(p['total_usd'])}\n"
        )
    t = report["total"]
    print(f"total over {len(report['peers'])} peer(s):")
    lines = [_channel_line(n, r) for n, r in sorted(report["channels"].items())]
    print(indent(render_table(_COST_HEADERS, lines, right="1234678")))
    print(
        f"  functions: {t['faas_gb_seconds']:.4g} GB-s, {fmt_usd(t['faas_usd'])}; channels "
        f"{fmt_usd(t['channels_usd'])}; total {fmt_usd(t['total_usd'])}"
    )
    return 0
