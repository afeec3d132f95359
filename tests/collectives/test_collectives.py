"""The collective suite: every collective, every group size, every root,
commutative, non-commutative and non-associative operators, scalars, Python
objects and numpy arrays, on every direct channel, against a sequential
reference (tests/reference.py).  One test body per collective runs across all
channels and sizes (the mpi4py ``test_cco_obj`` pattern)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from tests.reference import REDUCTIONS, assert_same, reference_fold, value

SIZES = [1, 2, 3, 4, 5, 8, 16]
KINDS = ["scalar", "object", "array"]
OBJECTS = {
    "scalar": lambda r: r * 11 - 4,
    "object": lambda r: {"rank": r, "tag": ("t", r), "blob": bytes([r]) * (r + 1), "none": None},
    "array": lambda r: np.linspace(0, 1, 5 + r, dtype=np.float32) + r,
}

pytestmark = [pytest.mark.timeout(300), pytest.mark.both_loops]


async def each(comms: list[fmi.Communicator], fn: Any) -> list[Any]:
    return list(await asyncio.gather(*(fn(c) for c in comms)))


@pytest.mark.parametrize("size", SIZES)
async def test_bcast(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for root in range(size):
            for kind in KINDS:
                want = OBJECTS[kind](root)
                got = await each(
                    comms, lambda c: c.bcast(want if c.rank == root else None, root=root)
                )
                for r, g in enumerate(got):
                    assert_same(g, want, f"bcast root={root} kind={kind} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_gather(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for root in range(size):
            for kind in KINDS:
                want = [OBJECTS[kind](r) for r in range(size)]
                got = await each(comms, lambda c: c.gather(OBJECTS[kind](c.rank), root=root))
                for r, g in enumerate(got):
                    assert_same(g, want if r == root else None, f"gather root={root} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_scatter(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for root in range(size):
            for kind in KINDS:
                items = [OBJECTS[kind](r + 100) for r in range(size)]
                got = await each(
                    comms, lambda c: c.scatter(items if c.rank == root else None, root=root)
                )
                for r, g in enumerate(got):
                    assert_same(g, items[r], f"scatter root={root} kind={kind} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_allgather(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for kind in KINDS:
            want = [OBJECTS[kind](r) for r in range(size)]
            got = await each(comms, lambda c: c.allgather(OBJECTS[kind](c.rank)))
            for r, g in enumerate(got):
                assert_same(g, want, f"allgather kind={kind} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_alltoall(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for kind in KINDS:
            send = {r: [OBJECTS[kind](r * size + j) for j in range(size)] for r in range(size)}
            got = await each(comms, lambda c: c.alltoall(send[c.rank]))
            for r, g in enumerate(got):
                assert_same(g, [send[s][r] for s in range(size)], f"alltoall {kind} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_reduce(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for root in range(size):
            for case, (kind, op) in REDUCTIONS.items():
                values = [value(kind, r) for r in range(size)]
                want = reference_fold(op, values)
                got = await each(comms, lambda c: c.reduce(values[c.rank], op=op, root=root))
                for r, g in enumerate(got):
                    assert_same(g, want if r == root else None, f"reduce {case} root={root} r={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_allreduce(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for case, (kind, op) in REDUCTIONS.items():
            values = [value(kind, r) for r in range(size)]
            want = reference_fold(op, values)
            got = await each(comms, lambda c: c.allreduce(values[c.rank], op=op))
            for r, g in enumerate(got):
                assert_same(g, want, f"allreduce {case} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_allreduce_ring(group, size: int) -> None:
    """The ring algorithm, forced on small and odd-length arrays, and chosen for large ones."""
    async with group(size, timeout=30) as comms:
        for n in (1, size + 3, 1000):
            values = [np.arange(n, dtype=np.int64) * (r + 1) - r for r in range(size)]
            want = reference_fold(fmi.SUM, values)
            got = await each(
                comms,
                lambda c: c.allreduce(
                    values[c.rank], op=fmi.MAX if n == 1 else fmi.SUM, algorithm="ring"
                ),
            )
            ref = reference_fold(fmi.MAX, values) if n == 1 else want
            for r, g in enumerate(got):
                assert_same(g, ref, f"ring n={n} rank={r}")
        # An operator whose result has another dtype (int -> bool) is reduced out of place.
        ints = [np.arange(2 * size + 1) % (r + 2) for r in range(size)]
        got = await each(comms, lambda c: c.allreduce(ints[c.rank], op=fmi.LAND, algorithm="ring"))
        for r, g in enumerate(got):
            assert_same(g, reference_fold(fmi.LAND, ints), f"ring LAND rank={r}")
        # 2-D inputs, contiguous or not, keep their shape, and no peer's input is written to.
        mats = [
            np.arange(12.0).reshape(3, 4) * (r + 1)
            if r % 2
            else (np.arange(12.0).reshape(4, 3) * (r + 1)).T
            for r in range(size)
        ]
        before = [m.copy() for m in mats]
        got = await each(comms, lambda c: c.allreduce(mats[c.rank], algorithm="ring"))
        for r, g in enumerate(got):
            assert_same(g, reference_fold(fmi.SUM, before), f"ring 2-D rank={r}")
        for m, b in zip(mats, before, strict=True):
            assert_same(m, b, "ring input unchanged")
        big = [np.full(70_000, r + 0.5, dtype=np.float64) for r in range(size)]  # > threshold
        got = await each(comms, lambda c: c.allreduce(big[c.rank]))
        want = np.full(70_000, sum(r + 0.5 for r in range(size)))
        for g in got:
            np.testing.assert_allclose(g, want)
            assert np.array_equal(g, got[0]), "every peer must hold the identical result"
        if size > 2:
            assert any(k.endswith("direct:ring") for k in comms[0].stats()["collectives"])


@pytest.mark.parametrize("size", SIZES)
async def test_scan_exscan(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for case, (kind, op) in REDUCTIONS.items():
            values = [value(kind, r) for r in range(size)]
            got = await each(comms, lambda c: c.scan(values[c.rank], op=op))
            for r, g in enumerate(got):
                assert_same(g, reference_fold(op, values[: r + 1]), f"scan {case} rank={r}")
            got = await each(comms, lambda c: c.exscan(values[c.rank], op=op))
            for r, g in enumerate(got):
                want = None if r == 0 else reference_fold(op, values[:r])
                assert_same(g, want, f"exscan {case} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_reduce_scatter(group, size: int) -> None:
    async with group(size, timeout=20) as comms:
        for case, (kind, op) in REDUCTIONS.items():
            if kind in ("array", "matrix"):
                # Arrays are split along axis 0 (uneven lengths allowed).
                arrays = [np.stack([value(kind, r)] * (size + 1)) + r for r in range(size)]
                got = await each(comms, lambda c: c.reduce_scatter(arrays[c.rank], op=op))
                for r, g in enumerate(got):
                    parts = [np.array_split(a, size)[r] for a in arrays]
                    # matmul on stacked (k, 3, 3) parts is batched, still exact.
                    want = reference_fold(op, parts)
                    assert_same(g, want, f"reduce_scatter {case} rank={r}")
            else:
                lists = [[value(kind, r * size + j) for j in range(size)] for r in range(size)]
                got = await each(comms, lambda c: c.reduce_scatter(lists[c.rank], op=op))
                for r, g in enumerate(got):
                    want = reference_fold(op, [lists[s][r] for s in range(size)])
                    assert_same(g, want, f"reduce_scatter {case} rank={r}")


@pytest.mark.parametrize("size", SIZES)
async def test_barrier(group, size: int) -> None:
    """No peer leaves the barrier before every peer has entered it."""
    rng = random.Random(size)
    async with group(size, timeout=20) as comms:
        for _ in range(3):
            entered: list[float] = []
            left: list[float] = []
            loop = asyncio.get_running_loop()

            async def one(c: fmi.Communicator, delay: float) -> None:
                await asyncio.sleep(delay)
                entered.append(loop.time())
                await c.barrier()
                left.append(loop.time())

            await asyncio.gather(*(one(c, rng.random() * 0.02) for c in comms))
            assert len(left) == size
            assert min(left) >= max(entered)
