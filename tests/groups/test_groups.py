"""Sub-communicators: isolation from their parent and siblings, life cycle
(closing a child, the parent's close, a broken parent), hint() and stats()
on a child, storage-native collectives on children, and the single-peer
communicator; on memory, tcp, redis and s3."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.errors import BrokenCommunicatorError, ClosedError, CommTimeout, LeaseLostError
from tests.channels.test_storage_channels import stored
from tests.groups import (
    CHANNELS,
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
from tests.reference import assert_same

pytestmark = pytest.mark.timeout(120)

MEDIATED = {
    "bcast": "mediated:put_get",
    "scatter": "mediated:store",
    "gather": "mediated:fetch",
    "reduce": "mediated:fetch_fold",
    "allreduce": "mediated:root",
    "allgather": "mediated:put_get",
    "alltoall": "mediated:store",
    "reduce_scatter": "mediated:fetch_fold",
    "barrier": "mediated:gather_release",
    "scan": "mediated:tree",
    "exscan": "mediated:tree",
}
"""A storage-native algorithm for every collective (forced on a child)."""


@pytest.fixture(params=CHANNELS)
def net(request: pytest.FixtureRequest) -> Net:
    return net_for(request, request.param)


# ---------------------------------------------------------------- isolation


async def family(
    comms: list[fmi.Communicator],
) -> tuple[list[fmi.Communicator], list[int], list[fmi.Communicator], list[fmi.Communicator]]:
    """On every peer: a child holding parent ranks 0 and 2 (its members are returned)
    and two dups of the parent."""
    n = len(comms)
    if n == 3:  # one child of everyone, reversed
        colors: list[int | None] = [0, 0, 0]
        members = [2, 1, 0]
    else:  # even and odd ranks, each reversed: [2, 0] and [3, 1]
        colors = [r % 2 for r in range(n)]
        members = [2, 0]
    keys = [-r for r in range(n)]
    groups = await split_all(comms, colors, keys)
    child: dict[int, fmi.Communicator] = {}
    for group, ranks in zip(groups, sorted_members(colors, keys), strict=True):
        child.update(zip(ranks, group, strict=True))
    d1 = await each(comms, lambda c: c.dup())
    d2 = await each(comms, lambda c: c.dup())
    return [child[r] for r in range(n)], members, d1, d2


async def test_same_tags_and_collectives_in_flight_on_parent_child_and_dups(net: Net) -> None:
    n = 3 if net.slow else 4
    async with net.group(n, timeout=30) as comms:
        child, _, d1, d2 = await family(comms)
        labels = {"parent": comms, "child": child, "dup1": d1, "dup2": d2}

        async def ring(label: str, x: fmi.Communicator) -> list[Any]:
            nxt, prev = (x.rank + 1) % x.size, (x.rank - 1) % x.size
            sends = [x.send([label, x.rank, k], nxt, tag=7) for k in range(2)]
            recvs = [x.recv(prev, tag=7) for _ in range(2)]
            got = await asyncio.gather(*recvs, *sends)
            return list(got[:2])

        async def collectives(label: str, x: fmi.Communicator) -> list[Any]:
            offset = 100 * list(labels).index(label)
            total = await x.allreduce(x.rank + offset)
            everyone = await x.allgather(x.rank + offset)
            root = x.size - 1
            told = await x.bcast([label, root] if x.rank == root else None, root=root)
            folded = await x.scan(np.full(3, x.rank + offset, dtype=np.int64))
            return [total, everyone, told, folded]

        async def peer(i: int, body: Callable[[str, fmi.Communicator], Awaitable[Any]]) -> Any:
            order = list(labels) if i % 2 == 0 else list(reversed(labels))
            got = await asyncio.gather(*(body(label, labels[label][i]) for label in order))
            return dict(zip(order, got, strict=True))

        for round_ in range(1 if net.slow else 2):  # again on warm connections
            results = await each(range(n), lambda i: peer(i, ring))
            for i, res in enumerate(results):
                for label, got in res.items():
                    x = labels[label][i]
                    prev = (x.rank - 1) % x.size
                    assert got == [[label, prev, 0], [label, prev, 1]], (round_, i, label, got)
            results = await each(range(n), lambda i: peer(i, collectives))
            for i, res in enumerate(results):
                for label, got in res.items():
                    x = labels[label][i]
                    offset = 100 * list(labels).index(label)
                    size = x.size
                    assert got[0] == size * (size - 1) // 2 + size * offset, (label, got)
                    assert got[1] == [r + offset for r in range(size)], (label, got)
                    assert got[2] == [label, size - 1], (label, got)
                    want = np.full(3, sum(range(x.rank + 1)) + (x.rank + 1) * offset)
                    assert_same(got[3], want.astype(np.int64), f"{label} scan peer {i}")


@pytest.mark.parametrize("net", SLOW_ON_S3, indirect=True)
async def test_a_message_never_crosses_between_parent_child_and_dups(net: Net) -> None:
    """Peer 0 sends to peer 2 on one communicator; peer 2 waits for that tag from
    peer 0 on each of the others in vain, then gets it on the right one."""
    n = 3 if net.slow else 4
    async with net.group(n, timeout=30) as comms:
        child, members, d1, d2 = await family(comms)
        # (communicators, the ranks there of parent peers 0 and 2)
        comms_of = {
            "parent": (comms, 0, 2),
            "child": (child, members.index(0), members.index(2)),
            "dup1": (d1, 0, 2),
            "dup2": (d2, 0, 2),
        }
        for sender_label, (senders, src, dst) in comms_of.items():
            await senders[0].send(["via", sender_label], dst, tag=3)
            others = [(lbl, c) for lbl, c in comms_of.items() if lbl != sender_label]
            got = await outcomes(others, lambda o: o[1][0][2].recv(o[1][1], tag=3, timeout=0.3))
            for (label, _), g in zip(others, got, strict=True):
                assert isinstance(g, CommTimeout), f"{sender_label} -> {label}: {g!r}"
            got_right = await senders[2].recv(src, tag=3, timeout=10)
            assert got_right == ["via", sender_label]
        # The reverse direction (peer 2 to peer 0) on the child, with a collective of
        # the parent in between: still only the child's receive gets it.
        await child[2].send("back", members.index(0), tag=3)
        assert await each(comms, lambda c: c.allreduce(1)) == [n] * n
        with pytest.raises(CommTimeout):
            await comms[0].recv(2, tag=3, timeout=0.3)
        assert await child[0].recv(members.index(2), tag=3, timeout=10) == "back"


# ---------------------------------------------------------------- life cycle


async def closed_calls(sub: fmi.Communicator, exc: type[BaseException]) -> list[str]:
    """Every kind of call on ``sub``; each must raise ``exc`` at once (the failures)."""
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "send": lambda: sub.send(1, 0, tag=1),
        "recv": lambda: sub.recv(0, tag=1, timeout=5),
        "bcast": lambda: sub.bcast(1, root=0),
        "allreduce": lambda: sub.allreduce(1),
        "barrier": lambda: sub.barrier(),
        "split": lambda: sub.split(0),
        "dup": lambda: sub.dup(),
        "create_group": lambda: sub.create_group([sub.rank]),
    }
    wrong = []
    for name, call in calls.items():
        start = time.perf_counter()
        try:
            await call()
        except exc:
            if time.perf_counter() - start > 1.0:
                wrong.append(f"{name}: raised only after {time.perf_counter() - start:.2f}s")
        except BaseException as other:
            wrong.append(f"{name}: {other!r}")
        else:
            wrong.append(f"{name}: returned")
    return wrong


async def test_closing_a_child_leaves_the_parent_and_other_children(net: Net) -> None:
    n = 3
    async with net.group(n, timeout=30) as comms:
        child = await each(comms, lambda c: c.split(0, key=-c.rank))
        other = await each(comms, lambda c: c.dup())
        grand = await each(child, lambda s: s.dup())  # type: ignore[union-attr]
        # A receive waiting on the child when it closes fails with ClosedError at once.
        pending = [
            asyncio.ensure_future(s.recv((s.rank + 1) % n, tag=9, timeout=20))  # type: ignore[union-attr]
            for s in child
        ]
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        await each(child, lambda s: s.close())  # type: ignore[union-attr]
        got = await outcomes(pending, lambda p: p)
        assert all(isinstance(g, ClosedError) for g in got), got
        assert time.perf_counter() - start < 3, "pending receives waited past the close"
        await each(child, lambda s: s.close())  # type: ignore[union-attr]  # idempotent
        for sub in [*child, *grand]:
            assert sub is not None
            assert await closed_calls(sub, ClosedError) == []
            assert "closed" in repr(sub)
        # The parent and its other child are untouched, and a new split works.
        assert await each(comms, lambda c: c.allreduce(c.rank)) == [3] * n
        assert await each(other, lambda d: d.allgather(d.rank)) == [[0, 1, 2]] * n
        again = await each(comms, lambda c: c.split(0, key=c.rank))
        assert await each(again, lambda s: s.allgather(s.rank * 2)) == [[0, 2, 4]] * n  # type: ignore[union-attr]
        await each(comms, lambda c: c.send(f"from {c.rank}", (c.rank + 1) % n, tag=9))
        got = await each(comms, lambda c: c.recv((c.rank - 1) % n, tag=9, timeout=10))
        assert got == [f"from {(r - 1) % n}" for r in range(n)]


@pytest.mark.parametrize("net", SLOW_ON_S3, indirect=True)
async def test_the_parents_close_closes_its_children(net: Net) -> None:
    n = 3
    async with net.group(n, timeout=30) as comms:
        child = await each(comms, lambda c: c.split(c.rank % 2, key=-c.rank))
        twin = await each(comms, lambda c: c.dup())
        grand = await each(twin, lambda t: t.split(0))
        pending = [
            asyncio.ensure_future(g.recv((g.rank + 1) % n, tag=4, timeout=20))  # type: ignore[union-attr]
            for g in grand
        ]
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        await each(comms, lambda c: c.close())
        got = await outcomes(pending, lambda p: p)
        assert all(isinstance(g, ClosedError) for g in got), got
        assert time.perf_counter() - start < 5, "pending receives waited past the close"
        for sub in [*child, *twin, *grand]:
            assert sub is not None
            assert await closed_calls(sub, ClosedError) == []
            assert "closed" in repr(sub)


async def test_a_child_of_a_broken_parent_is_broken() -> None:
    """The job's lease lost (what the lease's on_lost callback does): every child and
    grandchild is broken with it; a broken parent cannot form a child."""
    async with fmi.local_peers(3, timeout=10) as comms:
        child = await each(comms, lambda c: c.split(0))
        grand = await each(child, lambda s: s.dup())  # type: ignore[union-attr]
        pending = [
            asyncio.ensure_future(g.recv((g.rank + 1) % 3, tag=4, timeout=20))  # type: ignore[union-attr]
            for g in grand
        ]
        await asyncio.sleep(0.05)
        for c in comms:
            c._break(LeaseLostError("the job's lease was taken over"))
        got = await outcomes(pending, lambda p: p)
        assert all(isinstance(g, BrokenCommunicatorError) for g in got), got
        for sub in [*child, *grand]:
            assert sub is not None
            wrong = await closed_calls(sub, BrokenCommunicatorError)
            assert wrong == [], wrong
        for c in comms:
            with pytest.raises(BrokenCommunicatorError):
                await c.split(0)
            with pytest.raises(BrokenCommunicatorError):
                await c.dup()


# ---------------------------------------------------------------- hint, stats, storage


async def test_hint_and_stats_are_the_childs_own(net: Net) -> None:
    n = 3 if net.slow else 4
    async with net.group(n, timeout=30) as comms:
        child = await each(comms, lambda c: c.split(0 if c.rank < 2 else 1, key=-c.rank))
        before = [c.stats() for c in comms]
        for s in child:
            assert s is not None
            assert s.hint(fmi.Hint.CHEAP) is fmi.Hint.CHEAP
        assert all(c.hint() is fmi.Hint.FAST for c in comms)
        await each(child, lambda s: s.allgather(s.rank))  # type: ignore[union-attr]
        await each(child, lambda s: s.barrier())  # type: ignore[union-attr]
        await each(comms, lambda c: c.barrier())
        for i, (c, s) in enumerate(zip(comms, child, strict=True)):
            assert s is not None
            st = s.stats()
            assert (st["peer"], st["num_peers"]) == (s.rank, s.size)
            assert st["comm_name"] == s.comm_name != c.comm_name
            assert st["hint"] == "cheap" and c.stats()["hint"] == "fast"
            ops = sorted(k.split("/")[0] for k in st["collectives"])
            assert ops == ["allgather", "barrier"], st["collectives"]
            parent_ops = [k.split("/")[0] for k in c.stats()["collectives"]]
            assert "allgather" not in parent_ops and "barrier" in parent_ops
            assert set(before[i]["collectives"]) <= set(c.stats()["collectives"])
            if s.size > 1:
                chans = st["channels"]
                assert sum(ch["messages_sent"] for ch in chans.values()) > 0, chans
                for name, ch in chans.items():
                    parent_ch = c.stats()["channels"][name]
                    assert ch["messages_sent"] <= parent_ch["messages_sent"], (name, ch)
            assert st["predicted"]["seconds"] >= 0 and st["cost"]["total_usd"] >= 0


@pytest.mark.parametrize("channel", ["memory", "tcp", "redis"])
async def test_the_planner_sees_the_childs_size(
    request: pytest.FixtureRequest, channel: str
) -> None:
    """A dup plans exactly as its parent (same size, same calls); a half plans for
    two peers, so the model predicts it faster."""
    net = net_for(request, channel)
    async with net.group(4, timeout=30) as comms:
        half = await each(comms, lambda c: c.split(c.rank // 2))
        twin = await each(comms, lambda c: c.dup())
        for x in (comms, half, twin):
            await each(x, lambda c: c.barrier())  # type: ignore[union-attr]
            assert await each(x, lambda c: c.allreduce(1.0)) == [float(x[0].size)] * 4  # type: ignore[union-attr]
        for c, h, t in zip(comms, half, twin, strict=True):
            assert h is not None
            want = c.stats()["predicted"]
            assert t.stats()["predicted"] == want
            assert 0 < h.stats()["predicted"]["seconds"] < want["seconds"]
            mine = [k for k in c.stats()["collectives"] if k.split("/")[0] not in ("split", "dup")]
            assert sorted(t.stats()["collectives"]) == sorted(mine)


@pytest.mark.parametrize("backend", ["redis", pytest.param("s3", marks=pytest.mark.slow)])
async def test_storage_native_collectives_on_children(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """Every collective forced onto its storage-native algorithm on two sibling
    children at once (the same sequence numbers, so the same keys but for the
    scope); the parent's close leaves nothing stored."""
    net = net_for(request, backend)
    n = 3 if net.slow else 4
    colors: list[int | None] = [r % 2 for r in range(n)]
    keys = [-r for r in range(n)]
    prefixes: set[str] = set()
    async with net.group(n, timeout=30) as comms:
        groups = await split_all(comms, colors, keys)
        suite = Suite(roots=LIGHT.roots, algorithms=MEDIATED)
        members = sorted_members(colors, keys)
        await asyncio.gather(
            *(run_suite(g, m, suite) for g, m in zip(groups, members, strict=True))
        )
        for g in groups:
            for s in g:
                used = s.stats()["collectives"]
                assert used and all(":" in k and "/mediated:" in k for k in used), used
        prefixes = {c._channel(backend).prefix + "/" for c in comms}  # type: ignore[attr-defined]
    for prefix in prefixes:
        assert await stored((backend, request.getfixturevalue(f"{backend}_config")), prefix) == {}


# ---------------------------------------------------------------- one peer


async def test_a_single_peer_splits_and_dups(net: Net) -> None:
    async with net.group(1, timeout=30) as comms:
        (comm,) = comms
        assert await comm.split(None) is None
        subs = [await comm.split(0, key=5), await comm.dup(), await comm.create_group([0])]
        grand = await subs[0].split(3)  # type: ignore[union-attr]
        for sub in [*subs, grand]:
            assert sub is not None and (sub.rank, sub.size) == (0, 1)
            await run_suite([sub], [0], LIGHT)
            await sub.send("self", 0, tag=2)
            assert await sub.recv(0, tag=2, timeout=5) == "self"
        assert await comm.allreduce(7) == 7
        await subs[1].close()
        assert await subs[0].bcast("still", root=0) == "still"
        assert children(comms, [subs[2]], [0])[0] is subs[2]
