"""Collectives over point-to-point messages (the *direct* family).

Each algorithm is a coroutine over a :class:`CollectiveContext`.  Sources:

* binomial trees for bcast, reduce, gather and scatter (Thakur, Rabenseifner,
  Gropp, "Optimization of Collective Communication Operations in MPICH",
  IJHPCA 2005, sections 4.1-4.4);
* allreduce by recursive doubling (small messages) and by a ring
  reduce-scatter followed by a ring allgather (large arrays, commutative
  operators) -- same paper, section 4.5; for group sizes that are not powers of
  two, the first ``2 * rem`` ranks are folded pairwise first (the paper's
  "rem" step), which keeps contiguous rank blocks and therefore rank order;
* allgather by Bruck's algorithm (Bruck et al., IEEE TPDS 1997): ceil(log2 P)
  rounds for any P;
* dissemination barrier (Hensgen, Finkel, Manber 1988);
* scan / exscan by recursive doubling as in MPICH's ``MPIR_Scan_intra``, with
  the operand order that keeps non-commutative operators exact.

Non-commutative operators: every combination is ``op(lower ranks, higher
ranks)``.  Non-associative operators (``Op(associative=False)``) cannot be
regrouped at all, so they use the linear forms (gather then left fold, or a
chain for scan), which equal the sequential reference exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import numpy as np

from ..ops import Op, fold
from .base import CollectiveContext
from .registry import Need, algorithm
from .results import combine, fold_into, result_array

__all__ = [
    "bcast",
    "reduce",
    "reduce_linear",
    "allreduce_recursive_doubling",
    "allreduce_ring",
    "allreduce_linear",
    "gather",
    "scatter",
    "allgather",
    "alltoall",
    "reduce_scatter",
    "scan",
    "scan_chain",
    "exscan",
    "exscan_chain",
    "barrier",
]


async def _sends(sends: list[Coroutine[Any, Any, None]]) -> None:
    """Run the sends of one step; a single one is awaited directly (no task)."""
    if len(sends) == 1:
        await sends[0]
    elif sends:
        await asyncio.gather(*sends)


def _parent_mask(v: int, size: int) -> int:
    """Lowest set bit of ``v`` (the mask at which ``v`` talks to its parent), or >= size."""
    mask = 1
    while mask < size:
        if v & mask:
            return mask
        mask <<= 1
    return mask


# ------------------------------------------------------------------- bcast


@algorithm("direct", "bcast", "binomial")
async def bcast(ctx: CollectiveContext, value: Any, root: int) -> Any:
    """Binomial tree; the payload is serialized once and forwarded as received."""
    size, v = ctx.size, (ctx.rank - root) % ctx.size
    if size == 1:
        return value
    mask = _parent_mask(v, size)
    if v == 0:
        payload = ctx.pack(value)
    else:
        parent = (v - mask + root) % size
        payload = await ctx.recv_payload(parent, 0)
        value = ctx.unpack(payload, parent)
    mask >>= 1
    sends = []
    while mask > 0:
        if v + mask < size:
            sends.append(ctx.send_payload((v + mask + root) % size, 0, payload))
        mask >>= 1
    await _sends(sends)
    return value


# ------------------------------------------------------------------- reduce


@algorithm("direct", "reduce", "binomial", needs=(Need.ASSOCIATIVE,))
async def reduce(ctx: CollectiveContext, value: Any, op: Op, root: int) -> Any:
    """Binomial tree; a non-associative operator falls back to :func:`reduce_linear`."""
    size = ctx.size
    if size == 1:
        return value
    if not op.associative:
        return await reduce_linear(ctx, value, op, root)
    # Commutative: tree relative to the root.  Otherwise: tree rooted at rank 0
    # in true rank order, then one hop to the root.
    base = root if op.commutative else 0
    v = (ctx.rank - base) % size
    acc = value
    dest = _dest(ctx, "reduce", value, op) if v + 1 < size else None  # it folds
    mask = 1
    while mask < size:
        if v & mask:
            await ctx.send((v - mask + base) % size, ("r", mask), acc)
            break
        if v + mask < size:
            child = (v + mask + base) % size
            acc = combine(op, acc, await ctx.recv(child, ("r", mask)), dest)
        mask <<= 1
    if base == root:
        return acc if ctx.rank == root else None
    if ctx.rank == 0:
        await ctx.send(root, "to-root", acc)
        return None
    if ctx.rank == root:
        return await ctx.recv(0, "to-root")
    return None


@algorithm("direct", "reduce", "linear")
async def reduce_linear(ctx: CollectiveContext, value: Any, op: Op, root: int) -> Any:
    """Gather to the root, which folds left to right: exact for any operator."""
    if ctx.size == 1:
        return value
    values = await gather(ctx, value, root)
    return fold(op, values) if values is not None else None


# ------------------------------------------------------------------- allreduce


@algorithm("direct", "allreduce", "recursive_doubling", needs=(Need.ASSOCIATIVE,))
async def allreduce_recursive_doubling(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Recursive doubling; non-powers of two fold their first ``2 * rem`` ranks pairwise."""
    size, rank = ctx.size, ctx.rank
    if size == 1:
        return value
    pof2 = 1 << (size.bit_length() - 1)
    rem = size - pof2
    folds = rank >= 2 * rem or rank % 2 == 1  # the others only send and get the result
    dest = _dest(ctx, "allreduce", value, op) if folds else None
    newrank: int
    if rank < 2 * rem:
        if rank % 2 == 0:
            await ctx.send(rank + 1, "fold", value)
            newrank = -1
        else:
            value = combine(op, await ctx.recv(rank - 1, "fold"), value, dest)
            newrank = rank // 2
    else:
        newrank = rank - rem
    if newrank != -1:
        mask = 1
        while mask < pof2:
            newdst = newrank ^ mask
            dst = newdst * 2 + 1 if newdst < rem else newdst + rem
            other = await ctx.sendrecv(dst, value, dst, ("x", mask))
            # Both partners compute op(lower block, higher block): identical results.
            # The fold may overwrite `value`: its send has returned.
            if newdst < newrank:
                value = combine(op, other, value, dest)
            else:
                value = combine(op, value, other, dest)
            mask <<= 1
    if rank < 2 * rem:
        if rank % 2:
            await ctx.send(rank - 1, "unfold", value)
        else:
            value = await ctx.recv(rank + 1, "unfold")
    return value


@algorithm(
    "direct",
    "allreduce",
    "ring",
    needs=(Need.ARRAY, Need.COMMUTATIVE, Need.ASSOCIATIVE),
)
async def allreduce_ring(ctx: CollectiveContext, value: np.ndarray, op: Op) -> np.ndarray:
    """Ring reduce-scatter + ring allgather; commutative operators only.

    Chunk ``i`` of the result is written once per step that touches it:
    folded from the received chunk and this peer's input chunk (the input is
    never copied first), or copied from the gathered chunk.  The result is the
    caller's ``out=`` or pooled memory (:mod:`.results`), so a loop of calls
    does not fault fresh pages in at every call; each received chunk is
    released at once, so the channel's receive buffers are recycled too.
    """
    size, rank = ctx.size, ctx.rank
    if size == 1:
        return value
    inputs: list[np.ndarray] = np.array_split(np.ascontiguousarray(value).reshape(-1), size)
    result = result_array(ctx.channel, "allreduce", value.shape, value.dtype)
    views: list[np.ndarray] = np.array_split(result.reshape(-1), size)
    chunks: list[np.ndarray] = list(inputs)  # this peer's current value of each chunk
    right, left = (rank + 1) % size, (rank - 1) % size
    for s in range(size - 1):
        # Chunk recv_i is received once in this phase: chunks[recv_i] is still the input.
        send_i, recv_i = (rank - s) % size, (rank - s - 1) % size
        got = await ctx.sendrecv(right, chunks[send_i], left, ("rs", s))
        chunks[recv_i] = combine(op, got, chunks[recv_i], views[recv_i])
    for s in range(size - 1):
        send_i, recv_i = (rank + 1 - s) % size, (rank - s) % size
        got = await ctx.sendrecv(right, chunks[send_i], left, ("ag", s))
        if _same_layout(got, views[recv_i]):
            views[recv_i][...] = got
            chunks[recv_i] = views[recv_i]
        else:
            chunks[recv_i] = got
    if all(c is v for c, v in zip(chunks, views, strict=True)):
        return result
    return np.concatenate(chunks).reshape(value.shape)


def _same_layout(a: Any, b: np.ndarray) -> bool:
    return isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype


def _dest(ctx: CollectiveContext, op_name: str, value: Any, op: Op) -> np.ndarray | None:
    """Where a reduction of arrays like ``value`` folds: ``out=`` or pooled memory
    (``None`` where folds cannot be written in place: objects, user operators)."""
    if op.ufunc is None or not isinstance(value, np.ndarray) or value.dtype.hasobject:
        return None
    return result_array(ctx.channel, op_name, value.shape, value.dtype)


@algorithm("direct", "allreduce", "linear")
async def allreduce_linear(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Reduce to rank 0 (binomial; gather and left fold if not associative), then bcast."""
    result = await reduce(ctx, value, op, 0)
    return await bcast(ctx, result, 0)


# ------------------------------------------------------------------- gather / scatter


@algorithm("direct", "gather", "binomial")
async def gather(ctx: CollectiveContext, value: Any, root: int) -> list[Any] | None:
    """Binomial tree; each subtree forwards its values as one message."""
    size, v = ctx.size, (ctx.rank - root) % ctx.size
    items = [value]  # values of vranks [v, v + len(items))
    mask = 1
    while mask < size:
        if v & mask:
            await ctx.send((v - mask + root) % size, ("g", mask), items)
            return None
        if v + mask < size:
            items.extend(await ctx.recv((v + mask + root) % size, ("g", mask)))
        mask <<= 1
    result: list[Any] = [None] * size
    for vr, item in enumerate(items):
        result[(vr + root) % size] = item
    return result


@algorithm("direct", "scatter", "binomial")
async def scatter(ctx: CollectiveContext, values: list[Any] | None, root: int) -> Any:
    size, v = ctx.size, (ctx.rank - root) % ctx.size
    if v == 0:
        assert values is not None
        items = [values[(i + root) % size] for i in range(size)]
    mask = _parent_mask(v, size)
    if v != 0:
        items = await ctx.recv((v - mask + root) % size, "s")
    mask >>= 1
    sends = []
    while mask > 0:
        if v + mask < size:
            sends.append(ctx.send((v + mask + root) % size, "s", items[mask:]))
            items = items[:mask]
        mask >>= 1
    await _sends(sends)
    return items[0]


# ------------------------------------------------------------------- allgather / alltoall


@algorithm("direct", "allgather", "bruck")
async def allgather(ctx: CollectiveContext, value: Any) -> list[Any]:
    """Bruck's algorithm: block j at this rank holds the value of rank (rank + j) mod P."""
    size, rank = ctx.size, ctx.rank
    blocks = [value]
    dist = 1
    while dist < size:
        count = min(dist, size - dist)
        got = await ctx.sendrecv((rank - dist) % size, blocks[:count], (rank + dist) % size, dist)
        blocks.extend(got)
        dist <<= 1
    result: list[Any] = [None] * size
    for j, item in enumerate(blocks[:size]):
        result[(rank + j) % size] = item
    return result


@algorithm("direct", "alltoall", "pairwise")
async def alltoall(ctx: CollectiveContext, values: list[Any]) -> list[Any]:
    """Pairwise exchange: in round s, send to rank+s and receive from rank-s."""
    size, rank = ctx.size, ctx.rank
    result: list[Any] = [None] * size
    result[rank] = values[rank]
    for s in range(1, size):
        dst, src = (rank + s) % size, (rank - s) % size
        result[src] = await ctx.sendrecv(dst, values[dst], src, s)
    return result


@algorithm("direct", "reduce_scatter", "pairwise")
async def reduce_scatter(ctx: CollectiveContext, parts: list[Any], op: Op) -> Any:
    """Part ``j`` of every peer goes to peer ``j``, which folds them in rank order."""
    size, rank = ctx.size, ctx.rank
    sends = [ctx.send(dst, "rsc", parts[dst]) for dst in range(size) if dst != rank]
    recvs = [ctx.recv(src, "rsc") for src in range(size) if src != rank]
    results = await asyncio.gather(*sends, *recvs)
    received = list(results[len(sends) :])
    received.insert(rank, parts[rank])
    return fold_into(op, received, _dest(ctx, "reduce_scatter", parts[rank], op))


# ------------------------------------------------------------------- scan / exscan


@algorithm("direct", "scan", "recursive_doubling", needs=(Need.ASSOCIATIVE,))
async def scan(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Recursive doubling; a non-associative operator falls back to :func:`scan_chain`."""
    size, rank = ctx.size, ctx.rank
    if not op.associative:
        return await scan_chain(ctx, value, op)
    partial, result = value, value
    mask = 1
    while mask < size:
        dst = rank ^ mask
        if dst < size:
            other = await ctx.sendrecv(dst, partial, dst, mask)
            if dst < rank:
                partial = op(other, partial)
                result = op(other, result)
            else:
                partial = op(partial, other)
        mask <<= 1
    return result


@algorithm("direct", "scan", "chain")
async def scan_chain(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Left to right, one peer after the other: exact for any operator."""
    rank = ctx.rank
    prefix = value if rank == 0 else op(await ctx.recv(rank - 1, "chain"), value)
    if rank + 1 < ctx.size:
        await ctx.send(rank + 1, "chain", prefix)
    return prefix


@algorithm("direct", "exscan", "recursive_doubling", needs=(Need.ASSOCIATIVE,))
async def exscan(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Exclusive scan; rank 0 gets ``None`` (MPI leaves it undefined).

    Recursive doubling; a non-associative operator falls back to :func:`exscan_chain`.
    """
    size, rank = ctx.size, ctx.rank
    if not op.associative:
        return await exscan_chain(ctx, value, op)
    partial: Any = value
    result: Any = None
    mask = 1
    while mask < size:
        dst = rank ^ mask
        if dst < size:
            other = await ctx.sendrecv(dst, partial, dst, mask)
            if dst < rank:
                partial = op(other, partial)
                result = other if result is None else op(other, result)
            else:
                partial = op(partial, other)
        mask <<= 1
    return result


@algorithm("direct", "exscan", "chain")
async def exscan_chain(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Left to right, one peer after the other; rank 0 gets ``None``."""
    rank = ctx.rank
    prefix = None if rank == 0 else await ctx.recv(rank - 1, "chain")
    if rank + 1 < ctx.size:
        await ctx.send(rank + 1, "chain", value if prefix is None else op(prefix, value))
    return prefix


# ------------------------------------------------------------------- barrier


@algorithm("direct", "barrier", "dissemination")
async def barrier(ctx: CollectiveContext) -> None:
    """Dissemination barrier: ceil(log2 P) rounds, any P."""
    size, rank = ctx.size, ctx.rank
    dist = 1
    while dist < size:
        await ctx.sendrecv((rank + dist) % size, None, (rank - dist) % size, dist)
        dist <<= 1
