"""``fmi plan``: what the model predicts for every plan of every collective.

For one group size and message size it shows every valid plan of every
collective with its predicted seconds and dollars, and marks the one
:func:`~fmi_async.selection.plan.plan` picks under each hint, so a user can
see *why* a channel was chosen before paying for a run.  ``--plot`` draws the
chosen plans over message sizes from 8 B to 64 MiB and at ``--size``, one panel
per family of collectives (:mod:`fmi_async.tools.plot`, matplotlib, optional).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..channels import registry
from ..config import Config
from ..errors import ArgumentError
from ..ops import SUM
from ..selection.model import CostModel, load_cost_model
from ..selection.plan import OPERATIONS, Hint, Plan, plan, plans
from .plot import PLOT_SIZES, plot_plans, plot_sizes
from .tables import render_table
from .units import fmt_bytes, fmt_seconds, fmt_usd, parse_size

__all__ = [
    "add_plan_arguments",
    "chosen_plans",
    "cmd_plan",
    "deployable",
    "plan_call",
    "plan_rows",
]

logger = logging.getLogger(__name__)


def deployable() -> list[str]:
    """Channels planned over when the config enables none: what a distributed job
    can use, as the channel registry says (the memory channel only joins peers of
    one process)."""
    return [entry.name for entry in registry.channels() if entry.deployable]


def load_config(path: Path | None) -> Config:
    """The config at ``path``, or the defaults; raises what :meth:`Config.load` raises."""
    return Config.load(path) if path is not None else Config()


def cost_model(config: Config, faas_memory: float) -> CostModel:
    """The config's model for functions of ``faas_memory`` MB.

    Raises :class:`~fmi_async.errors.ConfigError` for an invalid model section.
    """
    return load_cost_model(config.model, faas_memory)


def planned_channels(config: Config, names: str | None) -> list[tuple[str, str]]:
    """``(name, kind)`` of the channels to plan over: ``names`` (comma-separated),
    else the config's enabled backends, else the deployable ones.

    Raises :class:`~fmi_async.errors.ArgumentError` for an unknown channel.
    """
    if names:
        chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    else:
        chosen = config.enabled() or deployable()
    known = registry.names()
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ArgumentError(f"unknown channel(s) {unknown}; choose from {', '.join(known)}")
    return [(n, registry.spec(n).kind) for n in dict.fromkeys(chosen)]


def plan_call(op: str, size: int, arrays: bool) -> dict[str, Any]:
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
    call = plan_call(op, size, arrays)
    every = plans(op, num_peers=peers, channels=channels, models=models, **call)
    fast = plan(op, num_peers=peers, channels=channels, models=models, hint=Hint.FAST, **call)
    cheap = plan(op, num_peers=peers, channels=channels, models=models, hint=Hint.CHEAP, **call)
    return every, fast, cheap


def chosen_plans(
    peers: int,
    channels: Sequence[tuple[str, str]],
    models: CostModel,
    hint: Hint,
    ops: Sequence[str] = OPERATIONS,
    *,
    arrays: bool = True,
    sizes: Sequence[int] = PLOT_SIZES,
) -> dict[str, list[Plan]]:
    """For each collective, the plan chosen under ``hint`` at each of ``sizes``."""
    return {
        op: [
            plan(
                op,
                num_peers=peers,
                channels=channels,
                models=models,
                hint=hint,
                **plan_call(op, n, arrays),
            )
            for n in sizes
        ]
        for op in ops
    }


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
        f"backends, else {','.join(deployable())})",
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
    """Print every plan per collective with the FAST and CHEAP choices marked.

    Raises :class:`~fmi_async.errors.ArgumentError` for bad arguments (size,
    peers, channel, collective), :class:`~fmi_async.errors.ConfigError` for a
    config that does not load or a ``--plot`` without matplotlib.
    """
    if args.peers < 1:
        raise ArgumentError(f"--peers must be at least 1, got {args.peers}")
    size = parse_size(str(args.size))
    config = load_config(args.config)
    models = cost_model(config, args.faas_memory)
    channels = planned_channels(config, args.channels)
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
        sizes = plot_sizes(size)
        chosen_by_op = chosen_plans(
            args.peers, channels, models, hint, ops, arrays=arrays, sizes=sizes
        )
        title = f"the plan chosen under {hint.name}, {args.peers} peers"
        plot_plans(args.plot, sizes, chosen_by_op, registry.names(), title, size=size)
        print(f"\nplot written to {args.plot}")
    return 0
