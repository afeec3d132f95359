"""Sizes, times, rates and dollars as the commands read and print them.

``parse_size("64KiB") == 65536``; ``fmt_bytes(65536) == "64 KiB"``.  Binary
units (``k``, ``KiB``, ``MiB``) are powers of 1024, decimal ones (``kB``,
``MB``) powers of 1000.
"""

from __future__ import annotations

import logging
import math
import re

from ..errors import ArgumentError

__all__ = ["fmt_bytes", "fmt_rate", "fmt_seconds", "fmt_usd", "parse_size", "parse_sizes"]

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20}
_UNITS |= {"mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; ``k``/``KiB`` are binary, ``kB`` decimal.

    Raises :class:`~fmi_async.errors.ArgumentError` for text that is not a
    number with an optional known unit.
    """
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ArgumentError(
            f"cannot read the size {text!r}: write a number of bytes with an optional unit, "
            "such as 8, 1KiB, 64KiB, 1MiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes, sorted and without duplicates.

    Raises :class:`~fmi_async.errors.ArgumentError` for a size
    :func:`parse_size` cannot read, or for no size at all.
    """
    sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    if not sizes:
        raise ArgumentError("--sizes needs at least one size, such as 8,1KiB,1MiB")
    return sizes


def fmt_bytes(n: float) -> str:
    """``65536`` -> ``"64 KiB"``, ``1500`` -> ``"1.46 KiB"``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    """Seconds with three significant digits in s, ms or us."""
    if not math.isfinite(s):
        return str(s)
    if abs(s) >= 1:
        return f"{s:.3g} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_rate(bps: float) -> str:
    """Bytes per second in decimal GB/s, MB/s or kB/s."""
    if bps >= 1e9:
        return f"{bps / 1e9:.3g} GB/s"
    if bps >= 1e6:
        return f"{bps / 1e6:.3g} MB/s"
    return f"{bps / 1e3:.3g} kB/s"


def fmt_usd(usd: float) -> str:
    """Dollars in scientific notation (prices per call are tiny), ``$0`` for none."""
    return f"${usd:.3e}" if usd else "$0"
