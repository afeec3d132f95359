"""The ``mpi`` family: collectives run by the MPI library itself.

On the MPI channel (:mod:`fmi_async.channels.mpi`) every collective maps onto
one of MPI's nonblocking collectives: reductions of numpy arrays with a
built-in operator onto ``Ireduce``/``Iallreduce``/``Iscan``/``Iexscan``/
``Ireduce_scatter`` (MPI folds in C, in rank order), everything else onto
``Ibcast``/``Igatherv``/``Iallgatherv``/``Iscatterv``/``Ialltoallv`` of the
values in the project's wire format (numpy arrays as raw buffers), and the
barrier onto ``Ibarrier``.  Python objects, user operators and
non-commutative operators reduce with the library's own algorithms over the
MPI point-to-point path (the ``direct`` family), in exact rank order.

Each algorithm here is a generator of MPI requests handed to the channel's
:class:`~fmi_async.channels.mpi.ordered.Ordered` queue, which posts it in the
same order on every rank and drives it to its end even if this caller stops
waiting.  The generator is attached before the coroutine's first ``await``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import msgpack
import numpy as np

from ..errors import CommTimeout
from ..ops import Op
from ..wire import Payload, dumps, loads
from . import direct
from .base import CollectiveContext
from .registry import Need, algorithm

__all__ = ["wait_for_step"]

Native = Generator[list[Any], None, Any]

_INLINE = 512
"""Buffers up to this many bytes in all travel inside bcast's first block."""
_BLOCK = 1024
"""Bytes of the first broadcast of ``bcast``: the sizes, and the whole value when it fits."""
_SIZES = struct.Struct("<II")
_REDUCTIONS = ("reduce", "allreduce", "scan", "exscan", "reduce_scatter")

# Which numpy kinds MPI folds like numpy does, per built-in operator.
_KINDS = {
    "SUM": "iufc",
    "PROD": "iufc",
    "MIN": "iuf",
    "MAX": "iuf",
    "BAND": "iu",
    "BOR": "iu",
    "BXOR": "iu",
    "LAND": "b",
    "LOR": "b",
}


def _mpi_op(ctx: CollectiveContext, op: Op, array: Any) -> Any:
    """MPI's operator for ``op`` on ``array``, or None where MPI would differ from numpy."""
    kinds = _KINDS.get(op.name)
    if kinds is None or op.ufunc is None or not isinstance(array, np.ndarray):
        return None
    if array.ndim == 0:  # numpy folds these into scalars: the direct algorithms do it alike
        return None
    if array.dtype.kind not in kinds or array.dtype.itemsize > 16 or array.dtype == np.float16:
        return None
    return getattr(ctx.channel.MPI, op.name)  # type: ignore[attr-defined]


async def wait_for_step(ctx: CollectiveContext, future: asyncio.Future[Any]) -> Any:
    """The outcome of an ordered step, bounded by the collective's deadline.

    The step itself goes on after a timeout or a cancellation (MPI cannot
    withdraw it); only this wait ends.
    """
    if future.done() or ctx.deadline is None:
        return await asyncio.shield(future)
    try:
        async with asyncio.timeout_at(ctx.deadline):
            return await asyncio.shield(future)
    except TimeoutError:
        raise CommTimeout(
            f"{ctx.op} (collective #{ctx.seq}): peer {ctx.rank} waited for every peer to "
            f"reach it on channel {ctx.channel.name} until its deadline; MPI cannot withdraw "
            "what it posted, so a late peer either completes it or is told of this timeout"
        ) from None


async def _run(ctx: CollectiveContext, gen: Native) -> Any:
    future = ctx.channel.ordered.attach(ctx.seq, gen)  # type: ignore[attr-defined]
    return await wait_for_step(ctx, future)


def _like(ctx: CollectiveContext, array: np.ndarray) -> np.ndarray:
    """An uninitialized array like ``array``, in memory reused once the user drops it."""
    memory = _memory(ctx, array.nbytes)
    return np.frombuffer(memory, dtype=array.dtype).reshape(array.shape)


def _contiguous(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array)


# ------------------------------------------------------------------ reductions


def _reduction(ctx: CollectiveContext, op: Op, value: Any) -> Native | None:
    comm, mpi_op = ctx.channel.comm, _mpi_op(ctx, op, value)  # type: ignore[attr-defined]
    if mpi_op is None:
        return None
    send = _contiguous(value)

    def run() -> Native:
        out = _like(ctx, send)
        if ctx.op == "allreduce":
            yield [comm.Iallreduce(send, out, mpi_op)]
            return out
        if ctx.op == "scan":
            yield [comm.Iscan(send, out, mpi_op)]
            return out
        yield [comm.Iexscan(send, out, mpi_op)]
        return None if ctx.rank == 0 else out

    return run()


def _fallback() -> Native:
    return None
    yield []  # a generator that posts nothing


async def _native_or(
    ctx: CollectiveContext, value: Any, op: Op, otherwise: Callable[[], Awaitable[Any]]
) -> Any:
    """MPI's reduction of ``value`` where it folds as numpy does, else ``otherwise()``
    (a direct algorithm, after this step's empty native part keeps the ranks in step)."""
    gen = _reduction(ctx, op, value)
    if gen is None:
        await _run(ctx, _fallback())
        return await otherwise()
    return await _run(ctx, gen)


@algorithm("mpi", "allreduce", "native", needs=(Need.ARRAY, Need.ELEMENTWISE))
async def allreduce_native(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """``MPI_Iallreduce`` (dtypes MPI folds as numpy does; others recursive doubling)."""
    return await _native_or(
        ctx, value, op, lambda: direct.allreduce_recursive_doubling(ctx, value, op)
    )


@algorithm("mpi", "scan", "native", needs=(Need.ARRAY, Need.ELEMENTWISE))
async def scan_native(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """``MPI_Iscan`` (dtypes MPI cannot fold as numpy does: recursive doubling)."""
    return await _native_or(ctx, value, op, lambda: direct.scan(ctx, value, op))


@algorithm("mpi", "exscan", "native", needs=(Need.ARRAY, Need.ELEMENTWISE))
async def exscan_native(ctx: CollectiveContext, value: Any, op: Op) -> Any:
    """``MPI_Iexscan``; peer 0 gets None (dtypes MPI cannot fold: recursive doubling)."""
    return await _native_or(ctx, value, op, lambda: direct.exscan(ctx, value, op))


@algorithm("mpi", "reduce", "native", needs=(Need.ARRAY, Need.ELEMENTWISE))
async def reduce_native(ctx: CollectiveContext, value: Any, op: Op, root: int) -> Any:
    """``MPI_Ireduce`` to ``root`` (dtypes MPI cannot fold: gather and fold)."""
    comm, mpi_op = ctx.channel.comm, _mpi_op(ctx, op, value)  # type: ignore[attr-defined]
    if mpi_op is None:
        await _run(ctx, _fallback())
        return await direct.reduce_linear(ctx, value, op, root)
    send = _contiguous(value)

    def run() -> Native:
        out = _like(ctx, send) if ctx.rank == root else None
        yield [comm.Ireduce(send, out, mpi_op, root)]
        return out

    return await _run(ctx, run())


@algorithm(
    "mpi",
    "reduce_scatter",
    "native",
    needs=(Need.ARRAY, Need.ELEMENTWISE, Need.PART_PER_PEER),
)
async def reduce_scatter_native(ctx: CollectiveContext, parts: list[Any], op: Op) -> Any:
    """``MPI_Ireduce_scatter`` of the parts (``numpy.array_split`` of the array)."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    mpi_op = _mpi_op(ctx, op, parts[0])
    if mpi_op is None:
        await _run(ctx, _fallback())
        return await direct.reduce_scatter(ctx, parts, op)
    send = _contiguous(np.concatenate(parts))
    counts = [int(p.size) for p in parts]
    mine = parts[ctx.rank]

    def run() -> Native:
        out = np.empty(mine.shape, dtype=send.dtype)
        yield [comm.Ireduce_scatter(send, out, counts, mpi_op)]
        return out

    return await _run(ctx, run())


# ------------------------------------------------------------------ moving values


def _blob(ctx: CollectiveContext, value: Any) -> np.ndarray:
    """``value`` serialized into one contiguous buffer: sizes, header, buffers."""
    payload = dumps(value, ctx.serializer)
    buffers = [memoryview(b).cast("B") for b in payload.buffers]
    sizes = [len(payload.header), *(len(b) for b in buffers)]
    head = struct.pack(f"<I{len(sizes)}Q", len(buffers), *sizes)
    kind = payload.serializer.encode()
    out = np.empty(1 + len(kind) + len(head) + sum(sizes), dtype=np.uint8)
    at = 0
    parts: list[Any] = [bytes([len(kind)]), kind, head, payload.header, *buffers]
    for part in parts:
        n = len(part)
        out[at : at + n] = np.frombuffer(part, dtype=np.uint8)
        at += n
    return out


def _unblob(blob: memoryview) -> Any:
    """The value :func:`_blob` serialized (buffers stay views of ``blob``)."""
    n = blob[0]
    serializer = bytes(blob[1 : 1 + n]).decode()
    at = 1 + n
    (count,) = struct.unpack_from("<I", blob, at)
    at += 4
    sizes = struct.unpack_from(f"<{count + 1}Q", blob, at)
    at += 8 * (count + 1)
    header = bytes(blob[at : at + sizes[0]])
    at += sizes[0]
    buffers = []
    for size in sizes[1:]:
        buffers.append(blob[at : at + size])
        at += size
    return loads(Payload(header, tuple(buffers), serializer))


def _split(data: np.ndarray, counts: list[int]) -> list[Any]:
    view = data.data.cast("B")
    out, at = [], 0
    for count in counts:
        out.append(_unblob(view[at : at + count]))
        at += count
    return out


def _BYTE(ctx: CollectiveContext) -> Any:
    return ctx.channel.MPI.BYTE  # type: ignore[attr-defined]


def _offsets(counts: list[int]) -> list[int]:
    out, at = [], 0
    for count in counts:
        out.append(at)
        at += count
    return out


@algorithm("mpi", "barrier", "native")
async def barrier_native(ctx: CollectiveContext) -> None:
    """``MPI_Ibarrier``."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]

    def run() -> Native:
        yield [comm.Ibarrier()]
        return None

    await _run(ctx, run())


@algorithm("mpi", "bcast", "native")
async def bcast_native(ctx: CollectiveContext, value: Any, root: int) -> Any:
    """``MPI_Ibcast`` of a 1 KiB block describing the value (holding it whole when small),
    then of each of its buffers straight from the root's memory (numpy arrays are not
    copied), received into memory that is reused once the user drops it."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    meta = b""
    buffers: list[memoryview] = []
    if ctx.rank == root:
        payload = dumps(value, ctx.serializer)
        # MPI's bcast buffer is read and written: a read-only one (bytes, a frozen
        # array) is copied at the root.
        buffers = [_writable(memoryview(b).cast("B")) for b in payload.buffers]
        if sum(len(b) for b in buffers) <= _INLINE:
            meta = msgpack.packb([payload.serializer, payload.header, [bytes(b) for b in buffers]])
            buffers = []
        else:
            sizes = [len(b) for b in buffers]
            meta = msgpack.packb([payload.serializer, payload.header, sizes])

    def run() -> Native:
        block = np.zeros(_BLOCK, dtype=np.uint8)
        if ctx.rank == root:
            block[:8] = np.frombuffer(struct.pack("<Q", len(meta)), dtype=np.uint8)
            if len(meta) <= _BLOCK - 8:
                block[8 : 8 + len(meta)] = np.frombuffer(meta, dtype=np.uint8)
        yield [comm.Ibcast(block, root)]
        if ctx.rank == root:
            if len(meta) > _BLOCK - 8:
                yield [comm.Ibcast(bytearray(meta), root)]
            if buffers:
                yield [comm.Ibcast(b, root) for b in buffers]
            return value
        (size,) = struct.unpack_from("<Q", block.data)
        if size <= _BLOCK - 8:
            raw = bytes(block.data[8 : 8 + size])
        else:
            data = np.empty(size, dtype=np.uint8)
            yield [comm.Ibcast(data, root)]
            raw = data.tobytes()
        serializer, header, parts = msgpack.unpackb(raw)
        if parts and isinstance(parts[0], int):  # sizes: the buffers follow
            views = [_memory(ctx, n) for n in parts]
            yield [comm.Ibcast(v, root) for v in views]
            parts = views
        return loads(Payload(header, tuple(parts), serializer))

    return await _run(ctx, run())


def _writable(view: memoryview) -> memoryview:
    return memoryview(bytearray(view)) if view.readonly else view


def _memory(ctx: CollectiveContext, nbytes: int) -> memoryview:
    """Memory for received bytes: reused from the channel's pool when large."""
    return ctx.channel.recycler.allocate(nbytes)  # type: ignore[attr-defined, no-any-return]


@algorithm("mpi", "gather", "native")
async def gather_native(ctx: CollectiveContext, value: Any, root: int) -> Any:
    """``MPI_Igather`` of the sizes, then ``MPI_Igatherv`` of the serialized values."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    blob = _blob(ctx, value)

    def run() -> Native:
        size = np.array([blob.size], dtype=np.int64)
        sizes = np.empty(ctx.size, dtype=np.int64) if ctx.rank == root else None
        yield [comm.Igather(size, sizes, root)]
        if ctx.rank != root:
            yield [comm.Igatherv(blob, None, root)]
            return None
        counts = [int(n) for n in sizes]  # type: ignore[union-attr]
        data = np.empty(sum(counts), dtype=np.uint8)
        yield [comm.Igatherv(blob, [data, counts, _offsets(counts), _BYTE(ctx)], root)]
        return _split(data, counts)

    return await _run(ctx, run())


@algorithm("mpi", "allgather", "native")
async def allgather_native(ctx: CollectiveContext, value: Any) -> Any:
    """``MPI_Iallgather`` of the sizes, then ``MPI_Iallgatherv`` of the serialized values."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    blob = _blob(ctx, value)

    def run() -> Native:
        sizes = np.empty(ctx.size, dtype=np.int64)
        yield [comm.Iallgather(np.array([blob.size], dtype=np.int64), sizes)]
        counts = [int(n) for n in sizes]
        data = np.empty(sum(counts), dtype=np.uint8)
        yield [comm.Iallgatherv(blob, [data, counts, _offsets(counts), _BYTE(ctx)])]
        return _split(data, counts)

    return await _run(ctx, run())


@algorithm("mpi", "scatter", "native")
async def scatter_native(ctx: CollectiveContext, values: list[Any] | None, root: int) -> Any:
    """``MPI_Iscatter`` of the sizes, then ``MPI_Iscatterv`` of the serialized items."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    blobs = [_blob(ctx, v) for v in values] if ctx.rank == root and values is not None else None

    def run() -> Native:
        mine = np.empty(1, dtype=np.int64)
        sizes = np.array([b.size for b in blobs], dtype=np.int64) if blobs else None
        yield [comm.Iscatter(sizes, mine, root)]
        data = np.empty(int(mine[0]), dtype=np.uint8)
        if blobs:
            counts = [b.size for b in blobs]
            send = np.concatenate(blobs)
            yield [comm.Iscatterv([send, counts, _offsets(counts), _BYTE(ctx)], data, root)]
        else:
            yield [comm.Iscatterv(None, data, root)]
        return _unblob(data.data.cast("B"))

    return await _run(ctx, run())


@algorithm("mpi", "alltoall", "native")
async def alltoall_native(ctx: CollectiveContext, values: list[Any]) -> Any:
    """``MPI_Ialltoall`` of the sizes, then ``MPI_Ialltoallv`` of the serialized items."""
    comm = ctx.channel.comm  # type: ignore[attr-defined]
    blobs = [_blob(ctx, v) for v in values]

    def run() -> Native:
        counts_out = [b.size for b in blobs]
        counts_in = np.empty(ctx.size, dtype=np.int64)
        yield [comm.Ialltoall(np.array(counts_out, dtype=np.int64), counts_in)]
        incoming = [int(n) for n in counts_in]
        data = np.empty(sum(incoming), dtype=np.uint8)
        send = np.concatenate(blobs)
        yield [
            comm.Ialltoallv(
                [send, counts_out, _offsets(counts_out), _BYTE(ctx)],
                [data, incoming, _offsets(incoming), _BYTE(ctx)],
            )
        ]
        return _split(data, incoming)

    return await _run(ctx, run())
