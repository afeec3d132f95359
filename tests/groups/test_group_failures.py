"""Sub-communicators that cannot be formed, seen from every peer's side: a peer
that never calls split or create_group (named on every peer that did), bad
arguments on one peer (an ArgumentError there, an abort naming it on the
others, quickly), rank lists that are not a subset or differ in order, peers
that call different operations; and the parent usable after each failure."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import pytest

import fmi_async as fmi
from fmi_async.errors import (
    AbortedError,
    ArgumentError,
    CommTimeout,
    FMIError,
    PlanMismatchError,
)
from tests.groups import CHANNELS, Net, each, net_for, outcomes

pytestmark = pytest.mark.timeout(120)

SHORT = 1.5
"""The timeout of the calls a peer never joins: the callers fail after it."""
QUICK = 5.0
"""An abort reaches the other peers well within this (their timeout is 30 s)."""
FLIGHT = 0.5
"""Time for the aborts of the peers that gave up to reach a late peer.  A peer
that comes within that flight time finds every other peer's value and forms
a group the others do not have (an agreement in one round cannot tell "late"
from "just in time"); its first collective there then times out."""


@pytest.fixture(params=CHANNELS)
def net(request: pytest.FixtureRequest) -> Net:
    return net_for(request, request.param)


async def parent_still_works(comms: list[fmi.Communicator]) -> None:
    """A collective on every peer of the parent, and a split that works, after a failure."""
    n = len(comms)
    assert await each(comms, lambda c: c.allreduce(c.rank + 1)) == [n * (n + 1) // 2] * n
    subs = await each(comms, lambda c: c.split(0, key=-c.rank))
    got = await each(subs, lambda s: s.allgather(s.rank))  # type: ignore[union-attr]
    assert got == [list(range(n))] * n
    assert [s.rank for s in subs] == [n - 1 - r for r in range(n)]  # type: ignore[union-attr]


# ---------------------------------------------------------------- a peer never calls


def assert_names_missing(got: Any, missing: list[int], rank: int) -> None:
    """A caller's error names the peers that never came.

    Its own CommTimeout, or -- when another caller's deadline fired first and
    that caller's abort arrived before this one's own timer -- that abort,
    whose cause is the other caller's CommTimeout naming the same peers.
    """
    # create_group names them by their ranks in the parent, and says so
    named = re.compile(rf"peer\(s\) {re.escape(str(missing))}( of the parent)? did not take part")
    if isinstance(got, AbortedError):
        assert got.cause == "CommTimeout" and named.search(str(got)), f"peer {rank}: {got!r}"
        return
    assert isinstance(got, CommTimeout), f"peer {rank}: {got!r}"
    assert named.search(str(got)), str(got)
    assert re.search(rf"on peer {rank}( of the parent)?:", str(got)), str(got)


MISSING = [
    pytest.param("memory", (0,), id="memory-first"),
    pytest.param("memory", (1, 3), id="memory-two"),
    pytest.param("tcp", (3,), id="tcp-last"),
    pytest.param("redis", (0,), id="redis-first"),
    pytest.param("s3", (2,), id="s3-last"),
]


@pytest.mark.parametrize(("channel", "missing"), MISSING)
async def test_a_split_some_peer_never_calls_names_it_on_every_caller(
    request: pytest.FixtureRequest, channel: str, missing: tuple[int, ...]
) -> None:
    net = net_for(request, channel)
    n = 3 if net.slow else 4
    async with net.group(n, timeout=30) as comms:
        callers = [c for c in comms if c.rank not in missing]
        start = time.perf_counter()
        got = await outcomes(callers, lambda c: c.split(c.rank % 2, timeout=SHORT))
        took = time.perf_counter() - start
        for c, g in zip(callers, got, strict=True):
            assert_names_missing(g, list(missing), c.rank)
        assert any(isinstance(g, CommTimeout) for g in got), got
        assert SHORT * 0.9 <= took < SHORT + QUICK, took
        # The missing peers come late: they get the callers' abort, not a group.
        await asyncio.sleep(FLIGHT)
        late = [c for c in comms if c.rank in missing]
        got = await outcomes(late, lambda c: c.split(c.rank % 2, timeout=SHORT))
        for c, g in zip(late, got, strict=True):
            assert isinstance(g, AbortedError), f"late peer {c.rank}: {g!r}"
            assert g.cause == "CommTimeout" and g.peer not in missing, g
        await parent_still_works(comms)


@pytest.mark.parametrize("channel", ["memory", "redis", "s3"])
async def test_a_create_group_some_member_never_calls_names_it(
    request: pytest.FixtureRequest, channel: str
) -> None:
    net = net_for(request, channel)
    n, ranks, absent = (3, [2, 0], 0) if net.slow else (4, [3, 1, 0], 0)
    async with net.group(n, timeout=30) as comms:
        callers = [comms[r] for r in ranks if r != absent]
        start = time.perf_counter()
        got = await outcomes(callers, lambda c: c.create_group(ranks, timeout=SHORT))
        for c, g in zip(callers, got, strict=True):
            assert_names_missing(g, [absent], c.rank)  # named by their ranks in the parent
        assert any(isinstance(g, CommTimeout) for g in got), got
        assert time.perf_counter() - start < SHORT + QUICK
        await asyncio.sleep(FLIGHT)
        got = await outcomes([comms[absent]], lambda c: c.create_group(ranks, timeout=SHORT))
        assert isinstance(got[0], AbortedError) and got[0].cause == "CommTimeout", got
        # Every member has failed once: the next create_group of the same ranks works.
        members = [comms[r] for r in ranks]
        subs = await each(members, lambda c: c.create_group(ranks, timeout=10))
        assert [s.rank for s in subs] == list(range(len(ranks)))
        assert await each(subs, lambda s: s.allgather(ranks[s.rank])) == [ranks] * len(ranks)
        await parent_still_works(comms)


# ---------------------------------------------------------------- bad arguments


BAD_SPLITS: list[tuple[str, dict[str, Any]]] = [
    ("negative color", {"color": -1}),
    ("str color", {"color": "red"}),
    ("bool color", {"color": True}),
    ("float key", {"color": 0, "key": 1.5}),
    ("None key", {"color": 0, "key": None}),
    ("infinite timeout", {"color": 0, "timeout": math.inf}),
]


async def test_a_bad_color_or_key_fails_there_and_aborts_the_others_quickly(net: Net) -> None:
    n = 3 if net.slow else 4
    cases = BAD_SPLITS if net.name == "memory" else BAD_SPLITS[:1]
    async with net.group(n, timeout=30) as comms:
        for i, (case, bad) in enumerate(cases):
            culprit = (i + 1) % n

            async def call(c: fmi.Communicator) -> Any:
                if c.rank == culprit:
                    return await c.split(**bad)
                return await c.split(0, key=c.rank)

            start = time.perf_counter()
            got = await outcomes(comms, call)
            assert time.perf_counter() - start < QUICK, f"{case}: the abort came late"
            for r, g in enumerate(got):
                if r == culprit:
                    assert isinstance(g, ArgumentError), f"{case}: peer {r}: {g!r}"
                else:
                    assert isinstance(g, AbortedError), f"{case}: peer {r}: {g!r}"
                    assert (g.peer, g.cause) == (culprit, "ArgumentError"), f"{case}: {g!r}"
                    assert f"aborted by peer {culprit}" in str(g)
        await parent_still_works(comms)


@pytest.mark.parametrize("channel", ["memory", "redis"])
async def test_create_group_with_a_bad_list_fails_locally(
    request: pytest.FixtureRequest, channel: str
) -> None:
    """Out of range, negative, twice, without the caller, not ints, not a list: an
    ArgumentError before anything is sent, so the parent stays aligned."""
    net = net_for(request, channel)
    bad: list[Any] = [[1, 4], [1, -1], [1, 1, 3], [0, 2], ["1"], [True, 1], [1.0], "01", 1, None]
    async with net.group(4, timeout=30) as comms:
        caller = comms[1]
        for ranks in bad:
            start = time.perf_counter()
            with pytest.raises(ArgumentError) as info:
                await caller.create_group(ranks, timeout=5)
            assert time.perf_counter() - start < 0.5, ranks
            assert "create_group" in str(info.value), str(info.value)
        await parent_still_works(comms)
        subs = await each(comms[:3], lambda c: c.create_group([2, 1, 0]))
        assert [s.rank for s in subs] == [2, 1, 0]


# ---------------------------------------------------------------- peers that disagree


async def test_create_group_in_different_orders_is_a_plan_mismatch_on_every_member(
    net: Net,
) -> None:
    orders = {0: [0, 1, 2], 1: [2, 1, 0], 2: [0, 1, 2]}
    async with net.group(3, timeout=30) as comms:
        start = time.perf_counter()
        got = await outcomes(comms, lambda c: c.create_group(orders[c.rank], timeout=10))
        assert time.perf_counter() - start < QUICK
        for r, g in enumerate(got):
            assert isinstance(g, PlanMismatchError), f"peer {r}: {g!r}"
            assert "[2, 1, 0]" in str(g) and "[0, 1, 2]" in str(g), str(g)
        # Nothing is left half-formed: the same ranks in one order work next.
        subs = await each(comms, lambda c: c.create_group([1, 2, 0], timeout=10))
        assert [s.rank for s in subs] == [2, 0, 1]
        assert await each(subs, lambda s: s.allreduce(s.rank)) == [3, 3, 3]
        await parent_still_works(comms)


async def test_a_subset_in_different_orders_is_a_plan_mismatch_on_both() -> None:
    async with fmi.local_peers(4, timeout=10) as comms:
        orders = {1: [3, 1], 3: [1, 3]}
        got = await outcomes(
            [comms[1], comms[3]], lambda c: c.create_group(orders[c.rank], timeout=5)
        )
        assert all(isinstance(g, PlanMismatchError) for g in got), got
        await parent_still_works(comms)


@pytest.mark.parametrize("channel", ["memory", "redis"])
async def test_peers_calling_different_operations_all_fail(
    request: pytest.FixtureRequest, channel: str
) -> None:
    """One peer calls dup (or a collective) where the others call split: every peer
    raises, well before the deadline, and the parent is usable again."""
    net = net_for(request, channel)
    odd_ones: dict[str, Any] = {
        "dup": lambda c: c.dup(),
        "allreduce": lambda c: c.allreduce(1),
        "create_group": lambda c: c.create_group(list(range(c.size)), timeout=SHORT),
    }
    async with net.group(3, timeout=30) as comms:
        for what, odd in odd_ones.items():

            async def call(c: fmi.Communicator) -> Any:
                if c.rank == 2:
                    return await odd(c)
                return await c.split(0, timeout=SHORT if what == "create_group" else 10)

            start = time.perf_counter()
            got = await outcomes(comms, call)
            took = time.perf_counter() - start
            assert all(isinstance(g, FMIError) for g in got), (what, got)
            if what != "create_group":  # the same collective number, another plan
                assert any(isinstance(g, PlanMismatchError) for g in got), (what, got)
                assert took < QUICK, (what, took)
            else:
                # create_group is no collective of the parent: the others' split
                # names peer 2 as missing, and its group times out.
                for r, g in enumerate(got[:2]):
                    assert_names_missing(g, [2], r)
            if what == "create_group":
                # Peer 2 never called split: it does now (late), and gets the abort.
                await asyncio.sleep(FLIGHT)
                late = await outcomes([comms[2]], lambda c: c.split(0, timeout=SHORT))
                assert isinstance(late[0], AbortedError), late
        await parent_still_works(comms)
