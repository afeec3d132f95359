"""The PNG of ``fmi plan --plot``: chosen plans' time and cost over message sizes.

Small multiples: one column per family of collectives (one to many, many to
one, all to all, prefix, synchronisation), predicted seconds on top and
dollars below, a few lines per panel; the legends sit outside the panels
(collectives under each column, channels by marker at the top), and the
``--size`` of the command is marked in every panel.

matplotlib is optional (the ``test`` extra has it): it is imported when a
plot is drawn, on the Agg backend so no display is needed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..selection.plan import Plan
from .units import fmt_bytes

__all__ = ["FAMILIES", "PLOT_SIZES", "family_of", "plot_plans", "plot_sizes"]

logger = logging.getLogger(__name__)

PLOT_SIZES = tuple(8 << k for k in range(24))  # 8 B .. 64 MiB
_MARKERS = "sDo^vPX*hp"

# Panels: collectives that move data alike share one (a collective not listed
# gets a panel of its own, so a new collective is never left out).
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("one to many", ("bcast", "scatter")),
    ("many to one", ("gather", "reduce")),
    ("all to all", ("allreduce", "allgather", "alltoall", "reduce_scatter")),
    ("prefix", ("scan", "exscan")),
    ("synchronisation", ("barrier",)),
)


def family_of(op: str) -> str:
    """The panel a collective is drawn in."""
    for name, ops in FAMILIES:
        if op in ops:
            return name
    return op


def plot_sizes(size: int | None) -> list[int]:
    """:data:`PLOT_SIZES`, with ``size`` added where it is not one of them."""
    sizes = set(PLOT_SIZES)
    if size is not None and size > 0:
        sizes.add(size)
    return sorted(sizes)


def plot_plans(
    path: Path,
    sizes: Sequence[int],
    chosen: Mapping[str, Sequence[Plan]],
    channel_order: Sequence[str],
    title: str,
    *,
    size: int | None = None,
) -> None:
    """Predicted seconds and dollars against bytes per peer, one column per family.

    ``chosen`` maps each collective to its chosen plan at each of ``sizes``:
    one line per collective, the marker naming the plan's channel (markers
    are given in ``channel_order``); ``size`` (the command's ``--size``) is
    marked by a dashed line.  Raises :class:`~fmi_async.errors.ConfigError`
    when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install matplotlib (or the fmi-async[test] extra)"
        ) from exc
    panels: dict[str, list[str]] = {}
    for op in chosen:
        panels.setdefault(family_of(op), []).append(op)
    markers = dict(zip(channel_order, itertools.cycle(_MARKERS), strict=False))
    columns = max(1, len(panels))
    fig, axes = plt.subplots(
        2, columns, figsize=(3.3 * columns + 1, 7.0), squeeze=False, sharex=True
    )
    cmap = plt.get_cmap("tab10")
    channels_seen: list[str] = []
    for col, (family, ops) in enumerate(panels.items()):
        ax_t, ax_c = axes[0][col], axes[1][col]
        for i, op in enumerate(ops):
            plans = chosen[op]
            color = cmap(i % 10)
            ax_t.plot(sizes, [p.seconds for p in plans], color=color, label=op, lw=1.4)
            ax_c.plot(sizes, [max(p.usd, 1e-15) for p in plans], color=color, lw=1.4)
            for ch in dict.fromkeys(p.channel for p in plans):
                if ch not in channels_seen:
                    channels_seen.append(ch)
                xs = [n for n, p in zip(sizes, plans, strict=True) if p.channel == ch]
                ts = [p.seconds for p in plans if p.channel == ch]
                us = [max(p.usd, 1e-15) for p in plans if p.channel == ch]
                mk = markers.get(ch, "o")
                ax_t.scatter(xs, ts, color=color, marker=mk, s=16, zorder=3)
                ax_c.scatter(xs, us, color=color, marker=mk, s=16, zorder=3)
        ax_t.set_title(family, fontsize=10)
        # The collectives of this column, under it, outside the panels.
        ax_c.legend(
            *ax_t.get_legend_handles_labels(),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            fontsize=8,
            frameon=False,
            ncol=2,
        )
        for ax in (ax_t, ax_c):
            _axes(ax, size)
        ax_c.set_xlabel("bytes per peer", fontsize=8)
    axes[0][0].set_ylabel("predicted seconds")
    axes[1][0].set_ylabel("predicted dollars")
    handles = [
        Line2D([], [], color="black", marker=markers.get(ch, "o"), ls="", label=f"on {ch}")
        for ch in channel_order
        if ch in channels_seen
    ]
    mark = f"; dashed: --size {fmt_bytes(size)}" if size else ""
    fig.suptitle(f"{title}{mark}", fontsize=11)
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.94),
        ncol=max(1, len(handles)),
        fontsize=8,
        frameon=False,
    )
    # A fixed layout (tight_layout and a tight bounding box each lay the
    # figure out again: seconds of tick placement for ten log-scale panels).
    fig.subplots_adjust(left=0.06, right=0.99, top=0.84, bottom=0.2, wspace=0.3, hspace=0.12)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _axes(ax: Any, size: int | None) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_minor_locator(NullLocator())
    if size:
        ax.axvline(size, color="grey", ls="--", lw=0.9)
