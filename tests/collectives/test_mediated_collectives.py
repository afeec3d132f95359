"""Storage-native collectives on every storage channel, against the sequential reference.

One test body per collective runs on Redis, S3 and DynamoDB (real servers,
see tests/storage_servers.py) and several group sizes.  The collectives are
driven through :class:`CollectiveContext` objects built here, one per peer and
call, exactly as the communicator builds them.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.registry import channel_class
from fmi_async.channels.storage import StorageChannel
from fmi_async.collectives import mediated, registry
from fmi_async.collectives.base import CollectiveContext
from fmi_async.config import Config
from fmi_async.errors import ArgumentError, CommTimeout
from tests.reference import REDUCTIONS, assert_same, reference_fold, value

Backend = tuple[str, Config]
# The moto server answers a few hundred requests a second on a small machine:
# the AWS-backed channels run the smaller groups and fewer operator cases,
# Redis runs everything.
SIZES = {"redis": [1, 2, 3, 4, 5, 8, 16], "s3": [2, 3, 5], "dynamodb": [2, 3, 5]}
# Left to --slow (tests/conftest.py): the algorithms are the same code on every
# store, so the default run gives Redis every size up to 8 and the AWS-backed
# stores one group that folds (3); P = 16 on Redis and P = 2 and 5 on moto
# take half of this module's time.
SLOW = {("redis", 16), ("s3", 2), ("s3", 5), ("dynamodb", 2), ("dynamodb", 5)}
AWS_CASES = ("scalar-sum", "scalar-affine", "scalar-minus", "array-matmul")
OBJECTS: dict[str, Callable[[int], Any]] = {
    "scalar": lambda r: r * 11 - 4,
    "object": lambda r: {"rank": r, "tag": ("t", r), "blob": bytes([r]) * (r + 1), "none": None},
    "array": lambda r: np.linspace(0, 1, 5 + r, dtype=np.float32) + r,
}

pytestmark = pytest.mark.timeout(180)


class Group:
    """``size`` storage channels of one run, and a way to run one collective on all."""

    def __init__(self, chans: list[StorageChannel]) -> None:
        self.chans = chans
        self.size = len(chans)
        self._seq = itertools.count(1)

    async def run(
        self,
        op: str,
        body: Callable[[CollectiveContext, int], Coroutine[Any, Any, Any]],
        timeout: float = 20,
    ) -> list[Any]:
        seq = next(self._seq)
        deadline = asyncio.get_running_loop().time() + timeout
        ctxs = [
            CollectiveContext(
                rank=c.peer_id,
                size=self.size,
                seq=seq,
                op=op,
                plan=f"{op}/test",
                channel=c,
                deadline=deadline,
            )
            for c in self.chans
        ]
        return list(await asyncio.gather(*(body(ctx, ctx.rank) for ctx in ctxs)))


@asynccontextmanager
async def storage_group(backend: Backend, size: int) -> AsyncIterator[Group]:
    name, config = backend
    run = uuid.uuid4().hex[:12]
    cls = channel_class(name)
    chans: list[Any] = [
        cls(ChannelContext(i, size, "coll", run, config, Mailbox(i))) for i in range(size)
    ]
    await asyncio.gather(*(c.open() for c in chans))
    try:
        yield Group(chans)
    finally:
        await asyncio.gather(*(c.close() for c in chans))


@pytest.fixture(
    params=[
        pytest.param((name, n), marks=[pytest.mark.slow] if (name, n) in SLOW else [])
        for name, sizes in SIZES.items()
        for n in sizes
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def sized(request: pytest.FixtureRequest) -> tuple[Backend, int]:
    """``((channel name, Config), group size)``: every size on Redis, the small ones on AWS."""
    name, n = request.param
    config: Config = request.getfixturevalue(f"{name}_config")
    return (name, config), n


def reductions(backend: Backend) -> dict[str, Any]:
    if backend[0] == "redis":
        return REDUCTIONS
    return {case: REDUCTIONS[case] for case in AWS_CASES}


async def test_bcast_scatter_gather_every_root(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        roots = range(size) if mediated_backend[0] == "redis" else sorted({0, size - 1})
        for root in roots:
            for kind, make in OBJECTS.items():
                want = make(root)
                got = await g.run(
                    "bcast", lambda ctx, r: mediated.bcast(ctx, want if r == root else None, root)
                )
                for r, v in enumerate(got):
                    assert_same(v, want, f"bcast root={root} {kind} rank={r}")
                items = [make(r + 100) for r in range(size)]
                got = await g.run(
                    "scatter",
                    lambda ctx, r: mediated.scatter(ctx, items if r == root else None, root),
                )
                for r, v in enumerate(got):
                    assert_same(v, items[r], f"scatter root={root} {kind} rank={r}")
                got = await g.run("gather", lambda ctx, r: mediated.gather(ctx, make(r), root))
                want_list = [make(r) for r in range(size)]
                for r, v in enumerate(got):
                    assert_same(v, want_list if r == root else None, f"gather root={root} r={r}")


async def test_reduce_and_allreduce_match_the_reference(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        for case, (kind, op) in reductions(mediated_backend).items():
            values = [value(kind, r) for r in range(size)]
            want = reference_fold(op, values)
            for root in {0, size - 1}:
                got = await g.run(
                    "reduce", lambda ctx, r: mediated.reduce(ctx, values[r], op, root)
                )
                for r, v in enumerate(got):
                    assert_same(v, want if r == root else None, f"reduce {case} root={root}")
            got = await g.run("allreduce", lambda ctx, r: mediated.allreduce(ctx, values[r], op))
            for r, v in enumerate(got):
                assert_same(v, want, f"allreduce {case} rank={r}")


async def test_split_allreduce_small_forced_and_large_automatic(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        values = [np.arange(size + 3, dtype=np.int64) * (r + 1) - r for r in range(size)]
        got = await g.run(
            "allreduce", lambda ctx, r: mediated.allreduce(ctx, values[r], fmi.MAX, "split")
        )
        for v in got:
            assert_same(v, reference_fold(fmi.MAX, values))
        big = [np.full((300, 500), r + 1, dtype=np.int64) for r in range(size)]  # 1.2 MB
        got = await g.run("allreduce", lambda ctx, r: mediated.allreduce(ctx, big[r], fmi.SUM))
        for v in got:
            assert_same(v, reference_fold(fmi.SUM, big))
        if size > 1:
            sent = sum(c.stats.messages_sent for c in g.chans)
            # split: P-1 parts and one reduced part per peer, for each of the two calls;
            # plus at most one plan-probe object per peer and call, stored when a wait
            # outlasts PLAN_PROBE_AFTER on a loaded host (collectives/base.py)
            assert 2 * size * size <= sent <= 2 * size * size + 2 * size


async def test_split_allreduce_refuses_what_it_cannot_split(mediated_backend: Backend) -> None:
    async with storage_group(mediated_backend, 2) as g:
        with pytest.raises(ArgumentError):
            await g.run("allreduce", lambda ctx, r: mediated.allreduce(ctx, r, fmi.SUM, "split"))


async def test_allgather_alltoall(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        for kind, make in OBJECTS.items():
            got = await g.run("allgather", lambda ctx, r: mediated.allgather(ctx, make(r)))
            for r, v in enumerate(got):
                assert_same(v, [make(s) for s in range(size)], f"allgather {kind} rank={r}")
            send = {r: [make(r * size + j) for j in range(size)] for r in range(size)}
            got = await g.run("alltoall", lambda ctx, r: mediated.alltoall(ctx, send[r]))
            for r, v in enumerate(got):
                assert_same(v, [send[s][r] for s in range(size)], f"alltoall {kind} rank={r}")


async def test_reduce_scatter(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        for case, (kind, op) in reductions(mediated_backend).items():
            lists = [[value(kind, r * size + j) for j in range(size)] for r in range(size)]
            got = await g.run(
                "reduce_scatter", lambda ctx, r: mediated.reduce_scatter(ctx, lists[r], op)
            )
            for r, v in enumerate(got):
                want = reference_fold(op, [lists[s][r] for s in range(size)])
                assert_same(v, want, f"reduce_scatter {case} rank={r}")


async def test_scan_exscan_without_quadratic_traffic(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    async with storage_group(mediated_backend, size) as g:
        for case, (kind, op) in reductions(mediated_backend).items():
            values = [value(kind, r) for r in range(size)]
            before = sum(c.stats.messages_sent for c in g.chans)
            got = await g.run("scan", lambda ctx, r: mediated.scan(ctx, values[r], op))
            for r, v in enumerate(got):
                assert_same(v, reference_fold(op, values[: r + 1]), f"scan {case} rank={r}")
            # Work-efficient: at most 2(P-1) stored messages, never P^2/2.
            assert sum(c.stats.messages_sent for c in g.chans) - before <= 2 * (size - 1)
            got = await g.run("exscan", lambda ctx, r: mediated.exscan(ctx, values[r], op))
            for r, v in enumerate(got):
                want = None if r == 0 else reference_fold(op, values[:r])
                assert_same(v, want, f"exscan {case} rank={r}")


async def test_barrier_holds_everyone_until_the_last_arrives(sized: tuple[Backend, int]) -> None:
    mediated_backend, size = sized
    loop = asyncio.get_running_loop()
    async with storage_group(mediated_backend, size) as g:
        for round_ in range(2):
            entered: list[float] = []
            left: list[float] = []

            async def one(ctx: CollectiveContext, r: int, round_: int = round_) -> None:
                await asyncio.sleep(0.15 if r == (round_ % size) else 0)
                entered.append(loop.time())
                await mediated.barrier(ctx)
                left.append(loop.time())

            await g.run("barrier", one)
            assert len(left) == size and min(left) >= max(entered)


async def test_a_missing_peer_times_out_with_the_collective_named(
    mediated_backend: Backend,
) -> None:
    async with storage_group(mediated_backend, 3) as g:

        async def body(ctx: CollectiveContext, r: int) -> Any:
            if r == 2:  # this peer never joins
                return None
            return await mediated.bcast(ctx, None, 2)

        with pytest.raises(CommTimeout, match=r"bcast \(collective #1\)"):
            await g.run("bcast", body, timeout=0.5)


def test_every_collective_has_a_registered_storage_algorithm() -> None:
    for op in registry.COLLECTIVES:
        entries = registry.algorithms("mediated", op)
        assert entries, op
        for entry in entries:
            assert entry.fn.__module__ == mediated.__name__
            assert entry.fn.__name__ in mediated.__all__
