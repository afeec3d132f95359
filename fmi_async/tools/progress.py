"""Progress bars of the commands, drawn by tqdm on stderr.

On a terminal the bar redraws in place at most ten times a second; into a
file or pipe it writes about one status per tenth of the work, so logs of
long measurements stay short.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Protocol, TextIO

from tqdm import tqdm

__all__ = ["ProgressBar", "progress_bar"]

logger = logging.getLogger(__name__)


class ProgressBar(Protocol):
    """What the commands call on a bar (a subset of :class:`tqdm.tqdm`'s methods)."""

    def update(self, n: float | None = 1) -> bool | None:
        """Count ``n`` more steps done."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Show ``s`` after the bar (what is being done now)."""

    def close(self) -> None:
        """Draw the final state and end the line."""


def progress_bar(
    total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None
) -> ProgressBar:
    """A bar of ``total`` steps titled ``label`` on ``stream`` (default stderr).

    ``enabled=False`` gives a bar that draws nothing (``--no-progress``).
    """
    out = stream if stream is not None else sys.stderr
    tty = bool(getattr(out, "isatty", lambda: False)())
    total = max(total, 1)
    bar: ProgressBar = tqdm(
        total=total,
        desc=label,
        file=out,
        disable=not enabled,
        mininterval=0.1 if tty else 0.0,
        miniters=None if tty else math.ceil(total / 10),
        dynamic_ncols=tty,
        ascii=not tty,
    )
    return bar
