"""Plain-text tables for the commands' output."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

__all__ = ["indent", "render_table"]

logger = logging.getLogger(__name__)


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


def indent(text: str, prefix: str = "  ") -> str:
    """Every line of ``text`` with ``prefix`` in front."""
    return "\n".join(prefix + line for line in text.splitlines())
