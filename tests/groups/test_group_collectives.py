"""The collective suite on sub-communicators: from split (several colors and
keys, uneven groups, a singleton, keys that reorder), from dup, from
create_group (an order that is not sorted), and a child of a child, on
memory, tcp, redis and s3, against the reference over each child's members.
Sibling children run their suites at the same time, so their messages are in
flight together."""

from __future__ import annotations

import asyncio

import pytest

import fmi_async as fmi
from fmi_async.errors import AbortedError, ArgumentError
from fmi_async.groups import EXCHANGE_MAX
from tests.groups import (
    CASES,
    CHANNELS,
    FULL,
    LIGHT,
    SLOW_ON_S3,
    Net,
    Suite,
    children,
    each,
    net_for,
    outcomes,
    run_suite,
    sorted_members,
    split_all,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=CHANNELS)
def net(request: pytest.FixtureRequest) -> Net:
    return net_for(request, request.param)


# s3 (through the moto server) runs the split and create_group shapes by default;
# dup and the child of a child there only with --slow.


async def test_split_several_colors_and_keys(net: Net) -> None:
    """Uneven groups, a singleton, equal keys (rank order breaks the tie), keys
    that reverse the order, and a peer that takes no part (color None)."""
    if net.slow:
        colors: list[int | None] = [0, 1, 0]
        keys = [1, 0, 0]  # color 0: [2, 0] (reordered); color 1: [1] (a singleton)
        suite = LIGHT
    else:
        colors = [2, 0, 2, None, 0, 1]
        keys = [0, 5, -1, 0, 5, 0]  # color 2: [2, 0]; color 0: [1, 4] (tie); color 1: [5]
        suite = FULL
    n = len(colors)
    async with net.group(n, timeout=30) as comms:
        groups = await split_all(comms, colors, keys)
        members = sorted_members(colors, keys)
        assert sorted(map(len, members)) == ([1, 2] if net.slow else [1, 2, 2])
        ran = await asyncio.gather(
            *(run_suite(g, m, suite) for g, m in zip(groups, members, strict=True))
        )
        assert all(ran)
        if not net.slow:
            # A second split of the same parent: 4 + 2, every key reversing the order.
            colors2: list[int | None] = [0, 0, 0, 0, 1, 1]
            keys2 = [-r for r in range(n)]
            groups2 = await split_all(comms, colors2, keys2)
            assert sorted_members(colors2, keys2) == [[3, 2, 1, 0], [5, 4]]
            await asyncio.gather(
                *(
                    run_suite(g, m, LIGHT)
                    for g, m in zip(groups2, sorted_members(colors2, keys2), strict=True)
                )
            )
        # The parent still runs its own collectives correctly after all that.
        got = await each(comms, lambda c: c.allreduce(c.rank + 1))
        assert got == [n * (n + 1) // 2] * n


@pytest.mark.parametrize("net", SLOW_ON_S3, indirect=True)
async def test_dup(net: Net) -> None:
    n = 3 if net.slow else 4
    async with net.group(n, timeout=30) as comms:
        twins = await each(comms, lambda c: c.dup())
        group = children(comms, twins, list(range(n)))
        assert all(t.comm_name != c.comm_name for t, c in zip(twins, comms, strict=True))
        await run_suite(group, list(range(n)), LIGHT if net.slow else FULL)


async def test_create_group_in_an_unsorted_order(net: Net) -> None:
    """Members ranked in the order given; the other peers form a group of their own
    at the same time (two create_group calls in flight on one parent)."""
    if net.slow:
        n, first, second = 3, [2, 0], None
    else:
        n, first, second = 5, [3, 0, 4], [2, 1]

    async def form(c: fmi.Communicator) -> fmi.Communicator | None:
        for ranks in (first, second):
            if ranks is not None and c.rank in ranks:
                return await c.create_group(ranks)
        return None

    async with net.group(n, timeout=30) as comms:
        subs = await each(comms, form)
        jobs = []
        for ranks in (first, second):
            if ranks is not None:
                jobs.append(
                    run_suite(children(comms, subs, ranks), ranks, LIGHT if net.slow else FULL)
                )
        await asyncio.gather(*jobs)
        if net.slow:
            assert subs[1] is None


@pytest.mark.parametrize("net", SLOW_ON_S3, indirect=True)
async def test_child_of_a_child(net: Net) -> None:
    """A split of a split: ranks map through two levels; both levels stay usable."""
    n = 3 if net.slow else 6
    async with net.group(n, timeout=30) as comms:
        # Level one: even and odd ranks, reversed by key.
        colors1: list[int | None] = [r % 2 for r in range(n)]
        keys1 = [-r for r in range(n)]
        level1 = await split_all(comms, colors1, keys1)
        members1 = sorted_members(colors1, keys1)
        # Level two inside each child: its first two ranks, reordered, and the rest.
        grand_members: list[list[int]] = []
        jobs = []
        for group, members in zip(level1, members1, strict=True):
            colors2: list[int | None] = [0 if r < 2 else 1 for r in range(len(group))]
            keys2 = [-r for r in range(len(group))]
            level2 = await split_all(group, colors2, keys2)
            for grand, inner in zip(level2, sorted_members(colors2, keys2), strict=True):
                top = [members[i] for i in inner]  # ranks in the root communicator
                grand_members.append(top)
                for g, root_rank in zip(grand, top, strict=True):
                    assert g.parent is not None and g.parent.parent is comms[root_rank]
                jobs.append(run_suite(grand, top, LIGHT))
            if not net.slow:
                jobs.append(run_suite(group, members, Suite(roots=(0,))))
        await asyncio.gather(*jobs)
        assert sorted(map(len, grand_members)) == ([1, 2] if net.slow else [1, 1, 2, 2])


@pytest.mark.slow
@pytest.mark.parametrize("channel", ["memory", "tcp", "redis"])
async def test_rows_and_columns_of_a_4x4_grid_at_once(
    request: pytest.FixtureRequest, channel: str
) -> None:
    """Sixteen peers, each in a row (reversed by key) and a column; every row and
    every column runs its suite at the same time."""
    net = net_for(request, channel)
    n, side = 16, 4
    async with net.group(n, timeout=60) as comms:
        row_colors: list[int | None] = [r // side for r in range(n)]
        row_keys = [-(r % side) for r in range(n)]
        col_colors: list[int | None] = [r % side for r in range(n)]
        col_keys = [r // side for r in range(n)]
        rows = await split_all(comms, row_colors, row_keys)
        cols = await split_all(comms, col_colors, col_keys)
        members = sorted_members(row_colors, row_keys) + sorted_members(col_colors, col_keys)
        assert members[0] == [3, 2, 1, 0] and members[side] == [0, 4, 8, 12]
        suite = Suite(roots=(0, -1), cases=CASES)
        await asyncio.gather(
            *(run_suite(g, m, suite) for g, m in zip(rows + cols, members, strict=True))
        )


@pytest.mark.slow
async def test_a_group_above_the_exchange_limit_agrees_by_allgather() -> None:
    """More peers than EXCHANGE_MAX: the agreement is the planned allgather; the
    children are the same as MPI's, and a bad color still aborts the others."""
    n = EXCHANGE_MAX + 2
    async with fmi.local_peers(n, timeout=60) as comms:
        colors: list[int | None] = [r % 3 if r != 5 else None for r in range(n)]
        keys = [-r for r in range(n)]
        groups = await split_all(comms, colors, keys)
        suite = Suite(roots=(0,), cases=("array-sum",))
        await asyncio.gather(
            *(
                run_suite(g, m, suite)
                for g, m in zip(groups, sorted_members(colors, keys), strict=True)
            )
        )
        got = await outcomes(comms, lambda c: c.split(-1 if c.rank == 7 else 0))
        assert isinstance(got[7], ArgumentError), got[7]
        others = [g for r, g in enumerate(got) if r != 7]
        assert all(isinstance(g, AbortedError) and g.peer == 7 for g in others), others[:3]
        assert await each(comms, lambda c: c.allreduce(1)) == [n] * n
