"""The PNG of ``fmi plan --plot``: chosen plans' time and cost over message sizes.

matplotlib is optional (the ``test`` extra has it): it is imported when a
plot is drawn, on the Agg backend so no display is needed.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError
from ..selection.plan import Plan

__all__ = ["PLOT_SIZES", "plot_plans"]

logger = logging.getLogger(__name__)

PLOT_SIZES = tuple(8 << k for k in range(24))  # 8 B .. 64 MiB
_MARKERS = "sDo^vPX*hp"


def plot_plans(
    path: Path,
    sizes: Sequence[int],
    chosen: Mapping[str, Sequence[Plan]],
    channel_order: Sequence[str],
    title: str,
) -> None:
    """Two panels, predicted seconds and dollars against bytes per peer.

    ``chosen`` maps each collective to its chosen plan at each of ``sizes``:
    one line per collective, the marker naming the plan's channel (markers
    are given in ``channel_order``).  Raises
    :class:`~fmi_async.errors.ConfigError` when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib: pip install matplotlib (or the fmi-async[test] extra)"
        ) from exc
    markers = dict(zip(channel_order, itertools.cycle(_MARKERS), strict=False))
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    seen: set[str] = set()
    for i, (op, plans) in enumerate(chosen.items()):
        color = cmap((2 * i) % 20 + (i // 10) % 2)  # the dark shades first
        ax_t.plot(sizes, [p.seconds for p in plans], color=color, label=op)
        ax_c.plot(sizes, [max(p.usd, 1e-15) for p in plans], color=color, label=op)
        for ch in {p.channel for p in plans}:
            xs = [n for n, p in zip(sizes, plans, strict=True) if p.channel == ch]
            ts = [p.seconds for p in plans if p.channel == ch]
            us = [max(p.usd, 1e-15) for p in plans if p.channel == ch]
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
    ax_t.set_title(f"time of {title}")
    ax_c.set_title(f"cost of {title}")
    ax_t.legend(fontsize=7, ncol=2)
    ax_c.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
