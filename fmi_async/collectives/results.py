"""Memory for the results of array collectives: the caller's ``out=``, or a pool.

Two things decide how fast a large array collective is on a virtual machine
besides the network: whether its result lands in memory that is already
paged in, and how many times its bytes are copied.  Memory the process has
not touched yet costs a page fault per page on first write (one 16 MiB
result: about 4000 faults, 20-40 ms on the machines measured, more than the
transfer itself), and whether ``malloc`` hands back recently freed memory or
fresh pages from the kernel depends on the allocator's state -- which made
the times of a loop of large allreduces bimodal.  So:

* a caller's ``out=`` array (like mpi4py's uppercase methods) is where the
  algorithm writes its result; the collective returns it;
* otherwise results come from a :class:`~fmi_async.wire.BufferRecycler` of
  the channel: a result the caller has dropped is handed out again (a
  training loop's ``g = await comm.allreduce(g)`` alternates between two).

The ``out=`` array travels from the call to the algorithm in a context
variable (:func:`writing_into`), tagged with the collective's name, so a
collective an algorithm runs inside another (``allreduce_linear`` runs
``reduce`` and ``bcast``) never writes into it.  Algorithms that do not ask
for it still work: :func:`writing_into` copies their result into ``out``.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from ..channels.base import Channel
from ..errors import ArgumentError
from ..ops import Op, fold
from ..wire import BufferRecycler

__all__ = [
    "RESULT_SLOTS",
    "check_out",
    "combine",
    "expected_out",
    "fold_into",
    "folds_into",
    "keeps_dtype",
    "out_for",
    "result_array",
    "with_check",
    "writing_into",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESULT_SLOTS = 3
"""Large results a channel keeps for reuse: the one a caller still holds, the one
being computed, and one spare for a caller that keeps two."""

_OUT: contextvars.ContextVar[tuple[str, np.ndarray] | None] = contextvars.ContextVar(
    "fmi_out", default=None
)
_pools: weakref.WeakKeyDictionary[Channel, BufferRecycler] = weakref.WeakKeyDictionary()


def check_out(
    op: str, out: Any, shape: tuple[int, ...] | None, dtype: np.dtype[Any] | None
) -> None:
    """Raise :class:`ArgumentError` unless ``out`` can hold the result of ``op``.

    ``out`` must be a writeable, C-contiguous numpy array; ``shape`` and
    ``dtype`` are checked where this peer knows them (``None``: not known
    here, a non-root of ``bcast`` say).
    """
    if not isinstance(out, np.ndarray):
        raise ArgumentError(f"{op}: out= must be a numpy array, got {type(out).__name__}")
    if not out.flags.c_contiguous:
        raise ArgumentError(f"{op}: out= must be C-contiguous (use numpy.ascontiguousarray)")
    if not out.flags.writeable:
        raise ArgumentError(f"{op}: out= is read-only")
    if out.dtype.hasobject:
        raise ArgumentError(f"{op}: out= cannot have dtype object")
    if shape is not None and out.shape != shape:
        raise ArgumentError(f"{op}: out= has shape {out.shape}, the result has shape {shape}")
    if dtype is not None and out.dtype != dtype:
        raise ArgumentError(f"{op}: out= has dtype {out.dtype}, the result has dtype {dtype}")


def expected_out(
    op: str, value: Any, out: Any, peers: int, rank: int, *, known: bool = True
) -> None:
    """Check ``out=`` of collective ``op`` on this peer before anything is sent.

    ``value`` is this peer's input (a numpy array where ``known``; a non-root
    of ``bcast`` does not know the root's, ``known=False``).  The result's
    shape and dtype, by collective: ``value``'s (allreduce, reduce, bcast),
    ``(peers, *value.shape)`` (allgather), the shape of this peer's part of
    ``numpy.array_split(value, peers)`` (reduce_scatter).  Raises
    :class:`ArgumentError`.
    """
    if not known:
        check_out(op, out, None, None)
        return
    if not isinstance(value, np.ndarray):
        raise ArgumentError(
            f"{op}: out= needs a numpy array value on this peer, got {type(value).__name__}"
        )
    shape: tuple[int, ...] = value.shape
    if op == "allgather":
        shape = (peers, *value.shape)
    elif op == "reduce_scatter":
        if value.ndim == 0:
            raise ArgumentError(f"{op}: out= needs an array with at least one axis")
        rows, extra = divmod(value.shape[0], peers)
        shape = (rows + (1 if rank < extra else 0), *value.shape[1:])
    check_out(op, out, shape, value.dtype)


def with_check(prepare: Callable[[], T], check: Callable[[], None]) -> Callable[[], T]:
    """``prepare`` that also runs ``check`` (its failure is announced like any check's)."""

    def both() -> T:
        call = prepare()
        check()
        return call

    return both


async def writing_into(op: str, out: np.ndarray, work: Awaitable[Any]) -> Any:
    """Run ``work`` (the collective ``op``) with ``out`` offered to its algorithm;
    ``out`` holding the result, or the result itself where it is ``None`` (a
    non-root of ``reduce``).

    Raises :class:`ArgumentError` if the result cannot be stored in ``out``
    (a peer's array of another shape in ``allgather`` or ``bcast``, which only
    shows once it arrived); the collective itself completed on every peer.
    """
    token = _OUT.set((op, out))
    try:
        result = await work
    finally:
        _OUT.reset(token)
    if result is None or result is out:
        return result
    if isinstance(result, list):  # allgather: one array per peer, stacked
        if len(result) != out.shape[0]:
            raise ArgumentError(f"{op}: out= has {out.shape[0]} rows for {len(result)} values")
        for i, item in enumerate(result):
            _store(op, out[i], item, f" (the value of peer {i})")
        return out
    _store(op, out, result, "")
    return out


def _store(op: str, dest: np.ndarray, value: Any, whose: str) -> None:
    arr = np.asarray(value)
    if arr.shape != dest.shape:
        raise ArgumentError(
            f"{op}: out= cannot hold the result{whose}: shape {arr.shape}, "
            f"out= expects {dest.shape}"
        )
    try:
        np.copyto(dest, arr, casting="same_kind")
    except TypeError as exc:
        raise ArgumentError(
            f"{op}: out= of dtype {dest.dtype} cannot hold the result{whose} "
            f"of dtype {arr.dtype}: {exc}"
        ) from None


def out_for(op: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray | None:
    """The caller's ``out=`` of collective ``op`` if it fits ``shape`` and ``dtype``."""
    offered = _OUT.get()
    if offered is None or offered[0] != op:
        return None
    out = offered[1]
    if out.shape != shape or out.dtype != dtype:
        return None
    return out


def result_array(
    channel: Channel, op: str, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> np.ndarray:
    """Memory for the result of ``op``: the caller's ``out=``, else a pooled array.

    Never zero-filled; the caller writes every element.  A pooled array comes
    back once nothing outside the pool refers to it (see
    :class:`~fmi_async.wire.BufferRecycler`).
    """
    out = out_for(op, shape, dtype)
    if out is not None:
        return out
    pool = _pools.get(channel)
    if pool is None:
        pool = _pools[channel] = BufferRecycler(slots=RESULT_SLOTS)
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return np.empty(shape, dtype=dtype)
    raw = pool.allocate(count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def folds_into(op: Op, a: Any, b: Any, dest: np.ndarray) -> bool:
    """Whether ``op.ufunc(a, b, out=dest)`` is exactly ``op(a, b)``: a built-in
    operator on arrays of ``dest``'s shape whose ufunc keeps ``dest``'s dtype."""
    if op.ufunc is None or not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        return False
    if dest.ndim == 0:
        return False  # numpy folds 0-d arrays into a scalar, and so do the collectives
    if a.shape != dest.shape or b.shape != dest.shape:
        return False
    if a.dtype != dest.dtype or b.dtype != dest.dtype:
        return False
    return keeps_dtype(op, dest.dtype)


def keeps_dtype(op: Op, dtype: np.dtype[Any]) -> bool:
    """Whether ``op`` is a ufunc whose result on two ``dtype`` arrays has ``dtype``."""
    if op.ufunc is None:
        return False
    return bool(op.ufunc.resolve_dtypes((dtype, dtype, None))[-1] == dtype)


def combine(op: Op, a: Any, b: Any, dest: np.ndarray | None) -> Any:
    """``op(a, b)`` (``a`` from the lower ranks), written into ``dest`` where that
    gives the same value; ``dest`` may be ``a`` or ``b`` (an in-place fold)."""
    if dest is not None and folds_into(op, a, b, dest):
        assert op.ufunc is not None
        op.ufunc(a, b, out=dest)
        return dest
    return op(a, b)


def fold_into(op: Op, values: list[Any], dest: np.ndarray | None) -> Any:
    """Left fold of ``values`` in order, like :func:`fmi_async.ops.fold`, into ``dest``
    where every step can be written there."""
    if len(values) < 2 or dest is None:
        return fold(op, values)
    acc = combine(op, values[0], values[1], dest)
    for item in values[2:]:
        acc = combine(op, acc, item, dest if acc is dest else None)
    return acc
