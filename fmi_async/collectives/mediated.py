"""Collectives over storage (the *mediated* family): Redis, S3, DynamoDB.

Storage changes what is cheap.  A request costs a round trip of milliseconds
(S3: tens of them) and often money, while any number of peers may read one
object at once.  So these algorithms use few rounds and few requests rather
than the trees of :mod:`fmi_async.collectives.direct`:

* data that one peer reads travels as a point-to-point message of the
  channel (``ctx.send``/``ctx.recv``): stored once, read once, deleted by its
  reader, so it leaves nothing behind;
* data that many peers read is stored once with ``ctx.put`` and read
  concurrently with ``ctx.get`` (bcast, the result of allreduce, allgather).
  Those objects stay until the communicator closes (then its ``close``
  deletes them) or, after a crash, until their TTL: a long loop of large
  broadcasts over Redis should size ``maxmemory`` and ``ttl`` for it;
* a root that collects P-1 values fetches them concurrently and, for a
  commutative and associative operator, folds each one as it arrives;
  otherwise it folds in rank order, which is the sequential reference even
  for non-associative operators.

The scan is work-efficient (the up-sweep/down-sweep of Blelloch, "Prefix
Sums and Their Applications", CMU-CS-90-190, 1990, on a binary tree laid over
the ranks): 2(P-1) stored messages and 2 log2 P rounds, never the P^2/2
downloads of "every peer reads all its predecessors".  A non-associative
operator uses the chain, which folds strictly left to right.

Every key is ``ctx.key(...)``: private to one collective call of one
communicator, and the channel adds the communicator name and run id, so a
barrier or a broadcast never matches another run's objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, Final, TypeVar

import numpy as np

from ..errors import ArgumentError
from ..ops import Op
from .base import CollectiveContext
from .registry import Need, algorithm

__all__ = [
    "allgather",
    "allreduce",
    "allreduce_root",
    "allreduce_split",
    "alltoall",
    "barrier",
    "bcast",
    "exscan",
    "exscan_chain",
    "exscan_tree",
    "gather",
    "reduce",
    "reduce_scatter",
    "scan",
    "scan_chain",
    "scan_tree",
    "scatter",
]

T = TypeVar("T")

# Above this size an elementwise allreduce is split: each peer reduces one
# part, so no peer downloads more than about twice the array.
SPLIT_THRESHOLD: Final = 1024 * 1024


async def _all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently; the first failure cancels the rest and is raised as is."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        await _cancel(tasks)
        raise


async def _cancel(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Stop the tasks still running and collect every outcome, so that a second
    failed receive is not reported as a never-retrieved task exception."""
    tasks = list(tasks)
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _fetch_fold(ctx: CollectiveContext, own: Any, op: Op, step: str) -> Any:
    """Receive one value from every other peer under ``step`` and fold all P values.

    The downloads overlap in both cases; only the order of the combination
    differs: arrival order for commutative and associative operators, rank
    order otherwise.
    """
    others = [r for r in range(ctx.size) if r != ctx.rank]
    tasks = {r: asyncio.ensure_future(ctx.recv(r, step)) for r in others}
    try:
        if op.commutative and op.associative:
            acc = own
            for next_value in asyncio.as_completed(tasks.values()):
                acc = op(acc, await next_value)
            return acc
        acc = None
        for r in range(ctx.size):
            item = own if r == ctx.rank else await tasks[r]
            acc = item if r == 0 else op(acc, item)
        return acc
    except BaseException:
        await _cancel(tasks.values())
        raise


# ------------------------------------------------------------------- one to many


@algorithm("mediated", "bcast", "put_get")
async def bcast(ctx: CollectiveContext, value: Any, root: int) -> Any:
    """The root stores the value once; every other peer reads it, all at once."""
    if ctx.size == 1:
        return value
    if ctx.rank == root:
        await ctx.put("b", value)
        return value
    return await ctx.get("b", root)


@algorithm("mediated", "scatter", "store")
async def scatter(ctx: CollectiveContext, values: list[Any] | None, root: int) -> Any:
    """The root stores one message per peer, concurrently; each peer reads its own."""
    if ctx.rank != root:
        return await ctx.recv(root, "s")
    assert values is not None
    await _all(ctx.send(dst, "s", values[dst]) for dst in range(ctx.size) if dst != root)
    return values[root]


# ------------------------------------------------------------------- many to one


@algorithm("mediated", "gather", "fetch")
async def gather(ctx: CollectiveContext, value: Any, root: int) -> list[Any] | None:
    """Every peer stores its value; the root fetches them concurrently."""
    if ctx.rank != root:
        await ctx.send(root, "g", value)
        return None
    got = await _all(ctx.recv(src, "g") for src in range(ctx.size) if src != root)
    got.insert(root, value)
    return got


@algorithm("mediated", "reduce", "fetch_fold")
async def reduce(ctx: CollectiveContext, value: Any, op: Op, root: int) -> Any:
    """Every peer stores its value; the root fetches concurrently and folds (see module doc)."""
    if ctx.size == 1:
        return value
    if ctx.rank != root:
        await ctx.send(root, "r", value)
        return None
    return await _fetch_fold(ctx, value, op, "r")


# ------------------------------------------------------------------- all to all


async def allreduce(ctx: CollectiveContext, value: Any, op: Op, algorithm: str = "auto") -> Any:
    """Reduce to rank 0 and share the result, or, for large arrays, reduce in parts.

    ``split`` (chosen for numpy arrays of at least 1 MiB under a built-in
    elementwise operator; the choice depends on shape, dtype and operator
    only, which every peer has alike): peer j receives part j of every array, folds it, stores the
    reduced part once, and every peer reads all parts.  Each peer moves about
    twice the array instead of the root moving P times it.
    """
    if ctx.size == 1:
        return value
    if algorithm == "auto":
        large = isinstance(value, np.ndarray) and value.nbytes >= SPLIT_THRESHOLD
        algorithm = "split" if large and _splittable(ctx, value, op) else "root"
    if algorithm == "split":
        return await allreduce_split(ctx, value, op)
    if algorithm != "root":
        raise ArgumentError(f"mediated allreduce has no algorithm {algorithm!r}")
    return await allreduce_root(ctx, value, op)


@algorithm("mediated", "allreduce", "root")
async def allreduce_root(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Rank 0 fetches and folds every value, stores the result once; everyone reads it."""
    if ctx.size == 1:
        return value
    if ctx.rank == 0:
        result = await _fetch_fold(ctx, value, op, "r")
        await ctx.put("result", result)
        return result
    await ctx.send(0, "r", value)
    return await ctx.get("result", 0)


def _splittable(ctx: CollectiveContext, value: Any, op: Op) -> bool:
    """Elementwise (a numpy ufunc) on an array with at least one element per peer."""
    return isinstance(value, np.ndarray) and op.ufunc is not None and value.size >= ctx.size


@algorithm(
    "mediated",
    "allreduce",
    "split",
    needs=(Need.ARRAY, Need.ELEMENTWISE, Need.PART_PER_PEER),
)
async def allreduce_split(ctx: CollectiveContext, value: np.ndarray, op: Op) -> np.ndarray:
    """Peer j folds part j of every array and stores it once; every peer reads all parts.

    Raises :class:`~fmi_async.errors.ArgumentError` (with more than one peer)
    unless ``value`` is a numpy array with at least one element per peer and ``op`` a built-in
    elementwise operator.
    """
    if ctx.size == 1:
        return value
    if not _splittable(ctx, value, op):
        raise ArgumentError(
            "the split allreduce needs a numpy array with at least one element per peer "
            "and a built-in elementwise operator (fmi.SUM, fmi.MAX, ...)"
        )
    flat = np.ascontiguousarray(value).reshape(-1)
    parts = np.array_split(flat, ctx.size)
    mine = await _exchange_and_fold(ctx, parts, op, "part")
    await ctx.put(("reduced", ctx.rank), mine)
    others = await _all(ctx.get(("reduced", r), r) for r in range(ctx.size) if r != ctx.rank)
    others.insert(ctx.rank, mine)
    return np.concatenate(others).reshape(value.shape)


async def _exchange_and_fold(ctx: CollectiveContext, parts: list[Any], op: Op, step: str) -> Any:
    """Send part j to peer j, receive this peer's part from everyone, fold them."""
    sends = asyncio.ensure_future(
        _all(ctx.send(dst, step, parts[dst]) for dst in range(ctx.size) if dst != ctx.rank)
    )
    try:
        folded = await _fetch_fold(ctx, parts[ctx.rank], op, step)
        await sends
    except BaseException:
        await _cancel([sends])
        raise
    return folded


@algorithm("mediated", "allgather", "put_get")
async def allgather(ctx: CollectiveContext, value: Any) -> list[Any]:
    """Every peer stores its value once and reads every other one, concurrently: one round."""
    if ctx.size == 1:
        return [value]
    await ctx.put(("v", ctx.rank), value)
    got = await _all(ctx.get(("v", r), r) for r in range(ctx.size) if r != ctx.rank)
    got.insert(ctx.rank, value)
    return got


@algorithm("mediated", "alltoall", "store")
async def alltoall(ctx: CollectiveContext, values: list[Any]) -> list[Any]:
    """Every peer stores one message per destination and reads its own: one round."""
    rank = ctx.rank
    sends = [ctx.send(dst, "a", values[dst]) for dst in range(ctx.size) if dst != rank]
    recvs = [ctx.recv(src, "a") for src in range(ctx.size) if src != rank]
    results = await _all([*sends, *recvs])
    received = list(results[len(sends) :])
    received.insert(rank, values[rank])
    return received


@algorithm("mediated", "reduce_scatter", "fetch_fold")
async def reduce_scatter(ctx: CollectiveContext, parts: list[Any], op: Op) -> Any:
    """Part j of every peer is stored for peer j, which fetches and folds them."""
    if ctx.size == 1:
        return parts[0]
    return await _exchange_and_fold(ctx, parts, op, "rs")


@algorithm("mediated", "barrier", "gather_release")
async def barrier(ctx: CollectiveContext) -> None:
    """Every peer reports to rank 0, which stores one release object that everyone reads.

    Two rounds and 2(P-1)+1 requests, against P^2 reads if every peer had to
    see every arrival.
    """
    if ctx.size == 1:
        return
    if ctx.rank == 0:
        await _all(ctx.recv(src, "arrive") for src in range(1, ctx.size))
        await ctx.put("release", None)
    else:
        await ctx.send(0, "arrive", None)
        await ctx.get("release", 0)


# ------------------------------------------------------------------- prefix reductions


async def scan(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Inclusive prefix: peer i gets ``op(v0, ..., vi)`` (the tree, or the chain
    for a non-associative operator)."""
    if not op.associative:
        return await scan_chain(ctx, value, op)
    return await scan_tree(ctx, value, op)


async def exscan(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Exclusive prefix: peer i gets ``op(v0, ..., v(i-1))``; peer 0 gets ``None``."""
    if not op.associative:
        return await exscan_chain(ctx, value, op)
    return await exscan_tree(ctx, value, op)


@algorithm("mediated", "scan", "tree", needs=(Need.ASSOCIATIVE,))
async def scan_tree(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Inclusive prefix by Blelloch's tree (see :func:`_tree_scan`)."""
    return (await _tree_scan(ctx, value, op))[0]


@algorithm("mediated", "scan", "chain", needs=(Need.NON_ASSOCIATIVE,))
async def scan_chain(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Inclusive prefix along the chain of peers: exact for any operator.

    Registered for non-associative operators only, where the tree cannot run.
    """
    return (await _chain(ctx, value, op))[0]


@algorithm("mediated", "exscan", "tree", needs=(Need.ASSOCIATIVE,))
async def exscan_tree(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Exclusive prefix by Blelloch's tree (see :func:`_tree_scan`)."""
    return (await _tree_scan(ctx, value, op))[1]


@algorithm("mediated", "exscan", "chain", needs=(Need.NON_ASSOCIATIVE,))
async def exscan_chain(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """Exclusive prefix along the chain of peers; peer 0 gets ``None``."""
    return (await _chain(ctx, value, op))[1]


async def _chain(ctx: CollectiveContext, value: Any, op: Op) -> tuple[Any, Any]:
    """Left to right, one peer after the other: exact for any operator."""
    before = None if ctx.rank == 0 else await ctx.recv(ctx.rank - 1, "chain")
    inclusive = value if before is None else op(before, value)
    if ctx.rank + 1 < ctx.size:
        await ctx.send(ctx.rank + 1, "chain", inclusive)
    return inclusive, before


async def _tree_scan(ctx: CollectiveContext, value: Any, op: Op) -> tuple[Any, Any]:
    """Blelloch's up-sweep and down-sweep; returns (inclusive, exclusive).

    Rank r covers the ranks ``(r - span, r]`` where span is the lowest set bit
    of ``r + 1`` (capped by the tree height).  Up-sweep at distance d: rank r
    with ``(r + 1) % 2d == 0`` receives the cover of ``r - d`` and prepends
    it.  Down-sweep at distance d: rank r with ``(r + 1) % 2d == 0`` already
    holds its full prefix and sends it to ``r + d``, whose cover starts right
    after r.  ``below`` is the cover without the rank's own value: the
    exclusive result is the received prefix followed by ``below``.  Every
    combination is ``op(lower ranks, higher ranks)``, so non-commutative
    operators are exact.
    """
    size, rank = ctx.size, ctx.rank
    cover, below = value, None
    dist = 1
    while dist < size:  # up-sweep
        if (rank + 1) % (2 * dist) == 0:
            left = await ctx.recv(rank - dist, ("up", dist))
            cover = op(left, cover)
            below = left if below is None else op(left, below)
        elif (rank + 1) % (2 * dist) == dist:
            if rank + dist < size:
                await ctx.send(rank + dist, ("up", dist), cover)
            break
        dist <<= 1
    top = 1 << max(size - 1, 1).bit_length()
    inclusive, exclusive = cover, below
    dist = top
    while dist >= 1:  # down-sweep
        if (rank + 1) % (2 * dist) == 0:
            if rank + dist < size:
                await ctx.send(rank + dist, ("down", dist), inclusive)
        elif (rank + 1) % (2 * dist) == dist and rank >= dist:
            prefix = await ctx.recv(rank - dist, ("down", dist))
            exclusive = prefix if below is None else op(prefix, below)
            inclusive = op(prefix, cover)
        dist >>= 1
    return inclusive, exclusive
