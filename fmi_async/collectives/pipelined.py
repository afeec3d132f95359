"""Pipelined ring allreduce: each ring step moves its chunk in segments.

The ring of :func:`~fmi_async.collectives.direct.allreduce_ring` sends a
chunk of ``n / P`` bytes per step and folds it once the whole chunk has
arrived: while a peer folds, its link is idle, and while its link is busy, its
CPU is.  Here every chunk travels as segments of :data:`SEGMENT_BYTES`
(the scheme of Gloo's and NCCL's ring algorithms; Patarasuk and Yuan,
"Bandwidth optimal all-reduce algorithms for clusters of workstations",
JPDC 2009): a peer sends segment ``k`` of a step, receives segment ``k`` from
its left neighbour and folds it, and meanwhile the kernel's socket buffers
carry the neighbours' next segments, so one segment's fold overlaps the next
one's transfer.  The folded segment is what the next step sends, so the
reduce-scatter flows into the allgather segment by segment too.

Every element is folded exactly as in the unsegmented ring (the same
operands in the same order), so the results are identical; the ring needs a
commutative, associative operator either way.

The segment size is a trade between per-message overhead (about 50-100 us
per message through the event loop, measured on loopback TCP) and overlap:
at 1 MiB the overhead is a few percent of the segment's transfer time, and a
segment still fits the kernel's default socket buffers (4 MiB) so a send
completes while the receiver folds (measured: docs/collectives.md).
"""

from __future__ import annotations

import logging

import numpy as np

from ..ops import Op
from .base import CollectiveContext
from .direct import allreduce_ring
from .registry import Need, algorithm
from .results import combine, keeps_dtype, result_array

__all__ = ["SEGMENT_BYTES", "allreduce_ring_pipelined", "segments"]

logger = logging.getLogger(__name__)

SEGMENT_BYTES = 1024 * 1024
"""Bytes per segment of a ring step (see the module docstring).  The planner's
estimate of this algorithm (``fmi_async.selection.rounds``) reads it too."""


def segments(nbytes: float, peers: int, segment: int = SEGMENT_BYTES) -> int:
    """Segments per ring step of an ``nbytes`` allreduce among ``peers``."""
    chunk = nbytes / peers
    return max(1, -(-int(chunk) // segment))


@algorithm(
    "direct",
    "allreduce",
    "ring_pipelined",
    needs=(Need.ARRAY, Need.COMMUTATIVE, Need.ASSOCIATIVE),
)
async def allreduce_ring_pipelined(ctx: CollectiveContext, value: np.ndarray, op: Op) -> np.ndarray:
    """Ring reduce-scatter + ring allgather in segments (see the module docstring).

    An operator whose ufunc changes the dtype (``LAND`` of integers gives
    booleans) cannot fold into the result in place: those run the unsegmented
    ring (every peer decides alike: the dtype is part of the plan).
    """
    size, rank = ctx.size, ctx.rank
    if size == 1:
        return value
    if value.size == 0 or not keeps_dtype(op, value.dtype):
        return await allreduce_ring(ctx, value, op)
    flat_in = np.ascontiguousarray(value).reshape(-1)
    result = result_array(ctx.channel, "allreduce", value.shape, value.dtype)
    flat_out = result.reshape(-1)
    bounds = _chunk_bounds(flat_in.size, size)
    per = max(1, SEGMENT_BYTES // value.dtype.itemsize)
    count = -(-(bounds[0][1] - bounds[0][0]) // per)  # the first chunk is the longest
    right, left = (rank + 1) % size, (rank - 1) % size
    # This peer's current value of each chunk: the input, then its folds in `result`.
    current = [flat_in[lo:hi] for lo, hi in bounds]
    for s in range(size - 1):
        send_i, recv_i = (rank - s) % size, (rank - s - 1) % size
        mine, dest = current[recv_i], flat_out[slice(*bounds[recv_i])]
        for k in range(count):
            seg = slice(k * per, (k + 1) * per)
            got = await ctx.sendrecv(right, current[send_i][seg], left, ("rs", s, k))
            combine(op, got, mine[seg], dest[seg])
            del got  # the channel's receive buffer goes back to its pool
        current[recv_i] = dest
    for s in range(size - 1):
        send_i, recv_i = (rank + 1 - s) % size, (rank - s) % size
        dest = flat_out[slice(*bounds[recv_i])]
        for k in range(count):
            seg = slice(k * per, (k + 1) * per)
            got = await ctx.sendrecv(right, current[send_i][seg], left, ("ag", s, k))
            dest[seg] = got
            del got
        current[recv_i] = dest
    return result


def _chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """The ``numpy.array_split`` chunks of ``n`` elements: ``(start, stop)`` each."""
    base, extra = divmod(n, size)
    out, lo = [], 0
    for i in range(size):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _seg(bounds: tuple[int, int], k: int, per: int) -> slice:
    lo, hi = bounds
    start = min(hi, lo + k * per)
    return slice(start, min(hi, start + per))
