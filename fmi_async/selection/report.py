"""``fmi plan`` and ``fmi cost``: what the model predicts, and what a run cost.

``fmi plan`` shows, for one group size and message size, every valid plan of
every collective with its predicted seconds and dollars, and marks the one
:func:`~fmi_async.selection.plan.plan` picks under each hint, so a user can
see *why* a channel was chosen before paying for a run.  ``--plot`` draws the
chosen plans over message sizes from 8 B to 64 MiB (matplotlib, optional).

``fmi cost`` reads ``comm.stats()`` dictionaries saved as JSON and prices
them with the model of a config, so the same run can be re-priced under other
prices (another region, a calibrated model) without running it again.

Both are registered in the ``fmi`` command through :func:`add_plan_arguments`
/ :func:`cmd_plan` and :func:`add_cost_arguments` / :func:`cmd_cost`; the
``main_*`` functions run them stand-alone (tests, scripts).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..channels.base import ChannelStats
from ..config import Config
from ..errors import ArgumentError, ConfigError, FMIError
from ..ops import SUM
from .cost import channel_cost
from .model import CostModel, load_cost_model
from .plan import OPERATIONS, Hint, Plan, plan, plans

__all__ = [
    "CHANNEL_KINDS",
    "DEPLOYABLE",
    "add_cost_arguments",
    "add_plan_arguments",
    "cmd_cost",
    "cmd_plan",
    "cost_report",
    "fmt_bytes",
    "fmt_rate",
    "fmt_seconds",
    "fmt_usd",
    "load_stats",
    "main_cost",
    "main_plan",
    "parse_size",
    "parse_sizes",
    "plan_rows",
    "plot_plans",
    "render_table",
]

logger = logging.getLogger(__name__)

# What each channel is, without importing its module (and its optional
# dependency): plan() only needs the kind.
CHANNEL_KINDS: dict[str, str] = {
    "memory": "direct",
    "mpi": "direct",
    "tcp": "direct",
    "udp": "direct",
    "redis": "mediated",
    "dynamodb": "mediated",
    "s3": "mediated",
}
# Channels planned over when the config enables none: what a distributed job
# can use (the memory channel only joins peers of one process).
DEPLOYABLE = ("tcp", "redis", "s3", "dynamodb")
PLOT_SIZES = tuple(8 << k for k in range(24))  # 8 B .. 64 MiB

# ---------------------------------------------------------------- formatting

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20}
_UNITS |= {"mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; ``k``/``KiB`` are binary, ``kB`` decimal."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ArgumentError(
            f"cannot read the size {text!r}: write a number of bytes with an optional unit, "
            "such as 8, 1KiB, 64KiB, 1MiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes, sorted and without duplicates."""
    sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    if not sizes:
        raise ArgumentError("--sizes needs at least one size, such as 8,1KiB,1MiB")
    return sizes


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return str(s)
    if abs(s) >= 1:
        return f"{s:.3g} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_rate(bps: float) -> str:
    if bps >= 1e9:
        return f"{bps / 1e9:.3g} GB/s"
    if bps >= 1e6:
        return f"{bps / 1e6:.3g} MB/s"
    return f"{bps / 1e3:.3g} kB/s"


def fmt_usd(usd: float) -> str:
    return f"${usd:.3e}" if usd else "$0"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: str = "") -> str:
    """Plain-text table; columns whose index is in ``right`` are right-aligned."""
    body = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if str(i) in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [line(body[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body[1:])
    return "\n".join(out)


# ---------------------------------------------------------------- models from a config


def _load_config(path: Path | None) -> Config:
    return Config.load(path) if path is not None else Config()


def _models(config: Config, faas_memory: float) -> CostModel:
    return load_cost_model(config.model, faas_memory)


def _channels(config: Config, names: str | None) -> list[tuple[str, str]]:
    """``(name, kind)`` of the channels to plan over: ``--channels``, else the
    config's enabled backends, else the deployable ones."""
    if names:
        chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    else:
        chosen = config.enabled() or list(DEPLOYABLE)
    unknown = [n for n in chosen if n not in CHANNEL_KINDS]
    if unknown:
        raise ArgumentError(
            f"unknown channel(s) {unknown}; choose from {', '.join(sorted(CHANNEL_KINDS))}"
        )
    return [(n, CHANNEL_KINDS[n]) for n in dict.fromkeys(chosen)]


def _call(op: str, size: int, arrays: bool) -> dict[str, Any]:
    """What plan() is told about the values: float64 arrays summed, or objects."""
    out: dict[str, Any] = {"nbytes": size, "is_array": arrays}
    if op in ("reduce", "allreduce", "reduce_scatter", "scan", "exscan"):
        out["operator"] = SUM
    if arrays:
        out["elements"] = max(1, size // 8)
    return out


def plan_rows(
    op: str,
    size: int,
    peers: int,
    channels: Sequence[tuple[str, str]],
    models: CostModel,
    *,
    arrays: bool = True,
) -> tuple[list[Plan], Plan, Plan]:
    """Every valid plan of ``op``, and the ones chosen under FAST and CHEAP."""
    call = _call(op, size, arrays)
    every = plans(op, num_peers=peers, channels=channels, models=models, **call)
    fast = plan(op, num_peers=peers, channels=channels, models=models, hint=Hint.FAST, **call)
    cheap = plan(op, num_peers=peers, channels=channels, models=models, hint=Hint.CHEAP, **call)
    return every, fast, cheap


# ---------------------------------------------------------------- fmi plan


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi plan``."""
    parser.add_argument("--peers", "-n", type=int, required=True, help="number of peers")
    parser.add_argument(
        "--size", required=True, help="bytes of each peer's value (8, 64KiB, 1MiB, ...)"
    )
    parser.add_argument("--config", type=Path, help="JSON config (its model section is used)")
    parser.add_argument(
        "--channels",
        help="comma-separated channels to plan over (default: the config's enabled "
        f"backends, else {','.join(DEPLOYABLE)})",
    )
    parser.add_argument(
        "--hint", choices=[h.value for h in Hint], default="fast", help="hint of the plot"
    )
    parser.add_argument(
        "--values",
        choices=("array", "object"),
        default="array",
        help="float64 numpy arrays (default) or Python objects; decides which algorithms apply",
    )
    parser.add_argument("--faas-memory", type=float, default=2048.0, help="function memory, MB")
    parser.add_argument("--collectives", help="comma-separated subset (default: all)")
    parser.add_argument("--plot", type=Path, help="save a PNG of time and cost over sizes")


def _collectives(text: str | None) -> list[str]:
    if not text:
        return list(OPERATIONS)
    ops = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPERATIONS]
    if unknown:
        raise ArgumentError(f"unknown collective(s) {unknown}; known: {', '.join(OPERATIONS)}")
    return ops


def cmd_plan(args: argparse.Namespace) -> int:
    """Print every plan per collective with the FAST and CHEAP choices marked."""
    if args.peers < 1:
        raise ArgumentError(f"--peers must be at least 1, got {args.peers}")
    size = parse_size(str(args.size))
    config = _load_config(args.config)
    models = _models(config, args.faas_memory)
    channels = _channels(config, args.channels)
    arrays = args.values == "array"
    ops = _collectives(args.collectives)
    hint = Hint(args.hint)
    print(
        f"predicted time and cost of each plan: {args.peers} peers, {fmt_bytes(size)} per peer "
        f"({args.values} values), channels {', '.join(n for n, _ in channels)}"
    )
    print("FAST / CHEAP: the plan chosen under that hint\n")
    rows: list[list[str]] = []
    summary: list[list[str]] = []
    for op in ops:
        every, fast, cheap = plan_rows(op, size, args.peers, channels, models, arrays=arrays)
        for p in every:
            marks = [m for m, c in (("FAST", fast), ("CHEAP", cheap)) if c == p]
            rows.append(
                [
                    op,
                    p.channel,
                    f"{p.family}:{p.algorithm}",
                    fmt_seconds(p.seconds),
                    fmt_usd(p.usd),
                    " ".join(marks),
                ]
            )
        chosen = fast if hint is Hint.FAST else cheap
        summary.append(
            [
                op,
                f"{chosen.channel} {chosen.family}:{chosen.algorithm}",
                fmt_seconds(chosen.seconds),
                fmt_usd(chosen.usd),
            ]
        )
    print(render_table(["collective", "channel", "algorithm", "time", "cost", "chosen"], rows))
    print(f"\nchosen under {hint.name}:")
    print(render_table(["collective", "plan", "time", "cost"], summary))
    if args.plot is not None:
        plot_plans(args.plot, args.peers, channels, models, hint, ops, arrays=arrays)
        print(f"\nplot written to {args.plot}")
    return 0


def plot_plans(
    path: Path,
    peers: int,
    channels: Sequence[tuple[str, str]],
    models: CostModel,
    hint: Hint,
    ops: Sequence[str] = OPERATIONS,
    *,
    arrays: bool = True,
    sizes: Sequence[int] = PLOT_SIZES,
) -> None:
    """PNG of the chosen plan's predicted time and cost against message size.

    matplotlib is optional (the ``test`` extra has it): imported here, on the
    Agg backend so it needs no display.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install matplotlib (or the fmi-async[test] extra)"
        ) from exc
    markers = dict(zip(CHANNEL_KINDS, "sDo^vPX", strict=True))
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    seen: set[str] = set()
    for i, op in enumerate(ops):
        chosen = [
            plan(
                op,
                num_peers=peers,
                channels=channels,
                models=models,
                hint=hint,
                **_call(op, n, arrays),
            )
            for n in sizes
        ]
        color = cmap((2 * i) % 20 + (i // 10) % 2)  # the dark shades first
        ax_t.plot(sizes, [p.seconds for p in chosen], color=color, label=op)
        ax_c.plot(sizes, [max(p.usd, 1e-15) for p in chosen], color=color, label=op)
        for ch in {p.channel for p in chosen}:
            xs = [n for n, p in zip(sizes, chosen, strict=True) if p.channel == ch]
            ts = [p.seconds for p in chosen if p.channel == ch]
            us = [max(p.usd, 1e-15) for p in chosen if p.channel == ch]
            label = f"on {ch}" if ch not in seen else None
            seen.add(ch)
            mk = markers.get(ch, "o")
            ax_t.scatter(xs, ts, color=color, marker=mk, s=14, label=None)
            ax_c.scatter(xs, us, color=color, marker=mk, s=14, label=None)
            if label:  # one legend entry per channel, in black
                ax_c.scatter([], [], color="black", marker=mk, label=label)
    for ax, what in ((ax_t, "predicted seconds"), (ax_c, "predicted dollars")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes per peer")
        ax.set_ylabel(what)
        ax.grid(True, which="major", alpha=0.3)
    ax_t.set_title(f"time of the plan chosen under {hint.name}, {peers} peers")
    ax_c.set_title(f"cost of the plan chosen under {hint.name}, {peers} peers")
    ax_t.legend(fontsize=7, ncol=2)
    ax_c.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- fmi cost


def load_stats(path: Path) -> list[dict[str, Any]]:
    """``comm.stats()`` dictionaries from a JSON file: one object, a list of them,
    an object keyed by peer, or JSON lines."""
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
    """
    peers: list[dict[str, Any]] = []
    total_channels: dict[str, dict[str, Any]] = {}
    total = {"channels_usd": 0.0, "faas_gb_seconds": 0.0, "faas_usd": 0.0, "total_usd": 0.0}
    for index, s in enumerate(stats):
        rows: dict[str, dict[str, Any]] = {}
        channels_usd = 0.0
        for name, entry in sorted(dict(s["channels"]).items()):
            kind = CHANNEL_KINDS.get(name)
            if kind is None:
                raise ConfigError(f"stats name an unknown channel {name!r}")
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
    """Print what each channel carried and cost, per peer and in total."""
    stats = load_stats(args.stats)
    config = _load_config(args.config)
    models = _models(config, 2048.0)
    report = cost_report(stats, models)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for p in report["peers"]:
        print(f"peer {p['peer']}:")
        lines = [_channel_line(n, r) for n, r in p["channels"].items()]
        print(_indent(render_table(_COST_HEADERS, lines, right="1234678")))
        print(
            f"  function: {p['faas_memory_mb']:g} MB x {p['seconds_open']:.3f} s = "
            f"{p['faas_gb_seconds']:.4g} GB-s, {fmt_usd(p['faas_usd'])}; channels "
            f"{fmt_usd(p['channels_usd'])}; total {fmt_usd(p['total_usd'])}\n"
        )
    t = report["total"]
    print(f"total over {len(report['peers'])} peer(s):")
    lines = [_channel_line(n, r) for n, r in sorted(report["channels"].items())]
    print(_indent(render_table(_COST_HEADERS, lines, right="1234678")))
    print(
        f"  functions: {t['faas_gb_seconds']:.4g} GB-s, {fmt_usd(t['faas_usd'])}; channels "
        f"{fmt_usd(t['channels_usd'])}; total {fmt_usd(t['total_usd'])}"
    )
    return 0


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# ---------------------------------------------------------------- stand-alone entry points


def _main(
    prog: str,
    configure: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return handler(args)
    except FMIError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def main_plan(argv: Sequence[str] | None = None) -> int:
    """``fmi plan`` without the ``fmi`` command (returns the exit code)."""
    return _main("fmi plan", add_plan_arguments, cmd_plan, argv)


def main_cost(argv: Sequence[str] | None = None) -> int:
    """``fmi cost`` without the ``fmi`` command (returns the exit code)."""
    return _main("fmi cost", add_cost_arguments, cmd_cost, argv)
