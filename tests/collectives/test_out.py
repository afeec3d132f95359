"""``out=`` on allreduce, reduce, bcast, allgather and reduce_scatter.

The result is written into the caller's array and that array is returned;
a wrong ``out`` fails on its peer with ArgumentError before anything is sent
and the other peers learn of it (AbortedError naming that peer); with ``out``
given, a repeated call allocates no result memory.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.errors import AbortedError, ArgumentError
from tests.helpers import tcp_group
from tests.reference import assert_same, reference_fold

GROUPS = {"memory": fmi.local_peers, "tcp": tcp_group}
SIZES = [1, 3, 4]
LENGTHS = [1, 7, 1000, 70_000]  # 70_000 float64s pass the pooled-memory threshold


async def each(comms: list[fmi.Communicator], fn: Any) -> list[Any]:
    return list(await asyncio.gather(*(fn(c) for c in comms)))


async def outcomes(comms: list[fmi.Communicator], fn: Any) -> list[Any]:
    return list(await asyncio.gather(*(fn(c) for c in comms), return_exceptions=True))


def inputs(size: int, n: int, dtype: Any = np.float64) -> list[np.ndarray]:
    return [(np.arange(n) % 13 * (r + 1) + r).astype(dtype) for r in range(size)]


@pytest.mark.parametrize("channel", sorted(GROUPS))
@pytest.mark.parametrize("size", SIZES)
async def test_allreduce_writes_into_out(channel: str, size: int) -> None:
    async with GROUPS[channel](size, timeout=30) as comms:
        for n in LENGTHS:
            values = inputs(size, n)
            want = reference_fold(fmi.SUM, values)
            for algorithm in (None, "ring", "recursive_doubling", "ring_pipelined", "linear"):
                outs = [np.full(n, -1.0) for _ in range(size)]
                got = await each(
                    comms,
                    lambda c: c.allreduce(values[c.rank], out=outs[c.rank], algorithm=algorithm),
                )
                for r in range(size):
                    assert got[r] is outs[r], (n, algorithm, r)
                    assert_same(got[r], want, f"n={n} {algorithm} rank={r}")
            # in place: out is the input
            mine = [v.copy() for v in values]
            got = await each(comms, lambda c: c.allreduce(mine[c.rank], out=mine[c.rank]))
            for r in range(size):
                assert got[r] is mine[r]
                assert_same(mine[r], want, f"in place n={n} rank={r}")
        # another operator, 2-D ints
        mats = [np.arange(12).reshape(3, 4) * (r + 2) % 5 for r in range(size)]
        outs = [np.empty((3, 4), dtype=mats[0].dtype) for _ in range(size)]
        got = await each(comms, lambda c: c.allreduce(mats[c.rank], fmi.MAX, out=outs[c.rank]))
        for r in range(size):
            assert got[r] is outs[r]
            assert_same(got[r], reference_fold(fmi.MAX, mats), f"MAX rank={r}")


@pytest.mark.parametrize("channel", sorted(GROUPS))
@pytest.mark.parametrize("size", SIZES)
async def test_reduce_bcast_allgather_reduce_scatter_write_into_out(
    channel: str, size: int
) -> None:
    async with GROUPS[channel](size, timeout=30) as comms:
        for n in (1, 7, 70_000):
            values = inputs(size, n)
            for root in sorted({0, size - 1}):
                # reduce: the root's out holds the result; the others' are left alone
                outs = [np.full(n, -1.0) for _ in range(size)]
                got = await each(
                    comms,
                    lambda c: c.reduce(values[c.rank], fmi.SUM, root=root, out=outs[c.rank]),
                )
                for r in range(size):
                    if r == root:
                        assert got[r] is outs[r]
                        assert_same(got[r], reference_fold(fmi.SUM, values), f"reduce r={r}")
                    else:
                        assert got[r] is None
                        assert np.all(outs[r] == -1.0), "a non-root's out is not written"
                # bcast: every peer's out holds the root's value
                outs = [np.full(n, -1.0) for _ in range(size)]
                got = await each(
                    comms,
                    lambda c: c.bcast(
                        values[root] if c.rank == root else None, root, out=outs[c.rank]
                    ),
                )
                for r in range(size):
                    assert got[r] is outs[r]
                    assert_same(got[r], values[root], f"bcast root={root} r={r}")
            # allgather: row i is peer i's value
            outs = [np.empty((size, n)) for _ in range(size)]
            got = await each(comms, lambda c: c.allgather(values[c.rank], out=outs[c.rank]))
            for r in range(size):
                assert got[r] is outs[r]
                assert_same(got[r], np.stack(values), f"allgather r={r}")
            # reduce_scatter: this peer's part of the sum
            total = reference_fold(fmi.SUM, values)
            parts = np.array_split(total, size)
            outs = [np.empty_like(parts[r]) for r in range(size)]
            got = await each(
                comms, lambda c: c.reduce_scatter(values[c.rank], fmi.SUM, out=outs[c.rank])
            )
            for r in range(size):
                assert got[r] is outs[r]
                assert_same(got[r], parts[r], f"reduce_scatter n={n} r={r}")


# (collective, a call with a given out, a good out for it, bad outs)
def _calls(size: int, rank: int) -> dict[str, Any]:
    x = np.arange(10, dtype=np.float64) + rank
    part = np.array_split(x, size)[rank]
    return {
        "allreduce": (lambda c, out: c.allreduce(x, out=out), np.empty(10)),
        "reduce": (lambda c, out: c.reduce(x, root=0, out=out), np.empty(10)),
        "bcast": (lambda c, out: c.bcast(x if c.rank == 0 else None, 0, out=out), np.empty(10)),
        "allgather": (lambda c, out: c.allgather(x, out=out), np.empty((size, 10))),
        "reduce_scatter": (lambda c, out: c.reduce_scatter(x, out=out), np.empty_like(part)),
    }


def _bad_outs(good: np.ndarray) -> dict[str, Any]:
    readonly = good.copy()
    readonly.flags.writeable = False
    return {
        "shape": np.empty(good.size + 1),
        "dtype": good.astype(np.float32),
        "strided": np.empty((*good.shape[:-1], 2 * good.shape[-1]))[..., ::2],
        "readonly": readonly,
        "list": good.tolist(),
    }


@pytest.mark.parametrize("channel", sorted(GROUPS))
async def test_a_wrong_out_on_one_peer_fails_there_and_aborts_the_others(channel: str) -> None:
    size = 3
    async with GROUPS[channel](size, timeout=20) as comms:
        for i, op in enumerate(_calls(size, 0)):
            bad = i % size
            if op == "bcast" and bad != 0:
                bad = 0  # a non-root cannot check shape and dtype before the value arrives
            for what, wrong in _bad_outs(_calls(size, bad)[op][1]).items():

                def call(c: fmi.Communicator) -> Any:
                    fn, good = _calls(size, c.rank)[op]
                    return fn(c, wrong if c.rank == bad else good.copy())

                start = time.monotonic()
                results = await outcomes(comms, call)
                assert isinstance(results[bad], ArgumentError), (op, what, results)
                assert "out=" in str(results[bad])
                for r, result in enumerate(results):
                    if r == bad or (result is None and op == "reduce"):
                        continue
                    assert isinstance(result, AbortedError), (op, what, r, result)
                    assert result.peer == bad and result.cause == "ArgumentError"
                assert time.monotonic() - start < 10
                # still in step
                sums = await each(comms, lambda c: c.allreduce(np.ones(3), out=np.empty(3)))
                assert all(np.all(s == size) for s in sums)


@pytest.mark.parametrize("channel", sorted(GROUPS))
async def test_a_wrong_out_on_every_peer_fails_everywhere(channel: str) -> None:
    async with GROUPS[channel](4, timeout=20) as comms:
        results = await outcomes(
            comms, lambda c: c.allreduce(np.ones(5), out=np.empty(5, dtype=np.int64))
        )
        assert all(isinstance(r, ArgumentError) for r in results), results
        results = await outcomes(comms, lambda c: c.allreduce(3.0, out=np.empty(1)))
        assert all(isinstance(r, ArgumentError) and "numpy array" in str(r) for r in results)
        sums = await each(comms, lambda c: c.allreduce(c.rank))
        assert sums == [6] * 4


async def test_a_non_root_out_that_cannot_hold_the_broadcast_value() -> None:
    """Only once the value arrived does a non-root know its shape: that peer raises,
    the collective itself completed everywhere and the group stays in step."""
    async with fmi.local_peers(3) as comms:
        outs = [np.empty(4), np.empty(5), np.empty(4)]
        results = await outcomes(
            comms, lambda c: c.bcast(np.arange(4.0) if c.rank == 0 else None, out=outs[c.rank])
        )
        assert isinstance(results[1], ArgumentError) and "shape" in str(results[1])
        assert results[0] is outs[0] and results[2] is outs[2]
        assert_same(results[2], np.arange(4.0))
        assert await each(comms, lambda c: c.allreduce(1)) == [3] * 3


@pytest.mark.parametrize("channel", sorted(GROUPS))
async def test_out_allocates_no_result(channel: str) -> None:
    """4 MiB allreduces with out=: after a warm-up, a call allocates far less than one
    result (the fold writes into out; received buffers come back from the pools).
    What remains is transient: msgpack's packer takes a working buffer of about
    512 KiB per message it packs."""
    n = 1 << 19  # float64s: 4 MiB
    async with GROUPS[channel](2, timeout=30) as comms:
        values = inputs(2, n)
        outs = [np.empty(n) for _ in range(2)]
        for algorithm in ("ring", "recursive_doubling"):
            for _ in range(3):  # warm: pools, connections, plans
                await each(
                    comms,
                    lambda c: c.allreduce(values[c.rank], out=outs[c.rank], algorithm=algorithm),
                )
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                for _ in range(3):
                    await each(
                        comms,
                        lambda c: c.allreduce(
                            values[c.rank], out=outs[c.rank], algorithm=algorithm
                        ),
                    )
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert peak < n * 8 // 4, (algorithm, peak)
            assert_same(outs[0], reference_fold(fmi.SUM, values))


def test_sent_arrays_are_released_without_the_garbage_collector() -> None:
    """A serialized array is referenced by its payload only: no reference cycle
    keeps it (and a pooled result) alive until the cyclic GC runs."""
    import gc
    import sys

    from fmi_async.wire.serialize import dumps

    a = np.ones(100)
    before = sys.getrefcount(a)
    gc.disable()
    try:
        payload = dumps(["plan", (a, {"x": a})])
        assert sys.getrefcount(a) > before
        del payload
        assert sys.getrefcount(a) == before
    finally:
        gc.enable()
