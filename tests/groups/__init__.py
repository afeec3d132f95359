"""What the sub-communicator tests share: the channels they run over, forming
children on every peer at once, and the collective suite run on a child
against the sequential reference computed over the child's members.

A child's values are derived from its members' ranks in the *parent*
(``members[r]`` is the parent rank of child rank ``r``), and ``members`` is
computed by the test from the colors and keys it passed, never read back
from the code under test: a child that mapped ranks wrongly, or mixed its
messages with another communicator's, gives a result that differs from the
reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pytest

import fmi_async as fmi
from tests.helpers import GROUPS, GroupFactory, storage_group
from tests.reference import REDUCTIONS, assert_same, reference_fold, value

T = TypeVar("T")
X = TypeVar("X")

CHANNELS = ["memory", "tcp", "redis", "s3"]
"""The channels the sub-communicator suites run over (s3 through the moto server)."""

SLOW_ON_S3 = [*CHANNELS[:-1], pytest.param("s3", marks=pytest.mark.slow)]
"""CHANNELS for a test whose s3 case runs only with --slow (another s3 case covers
the same path): ``@pytest.mark.parametrize("net", SLOW_ON_S3, indirect=True)``."""

OBJECTS: dict[str, Callable[[int], Any]] = {
    "object": lambda r: {"rank": r, "tag": ("t", r), "blob": bytes([r]) * (r + 1)},
    "array": lambda r: np.linspace(0, 1, 4 + r, dtype=np.float32) + r,
}

CASES = ("array-sum", "scalar-affine")
"""Reductions every child runs: a commutative operator on arrays, a
non-commutative (associative) one on tuples."""

MORE_CASES = ("scalar-minus", "object-concat", "array-matmul")
"""Further reductions on the fast channels: non-associative, objects, batched arrays."""


@dataclass(frozen=True)
class Net:
    """One channel's group factory: ``async with net.group(n, timeout=...) as comms``."""

    name: str
    group: GroupFactory

    @property
    def slow(self) -> bool:
        """Through the moto server every request costs milliseconds: run less there."""
        return self.name == "s3"

    def __repr__(self) -> str:
        return f"<Net {self.name}>"


def net_for(request: pytest.FixtureRequest, name: str) -> Net:
    """The :class:`Net` of channel ``name`` (a storage one starts its server fixture)."""
    if name in GROUPS:
        return Net(name, GROUPS[name])
    return Net(name, storage_group(request.getfixturevalue(f"{name}_config")))


async def each(items: Iterable[X], fn: Callable[[X], Awaitable[T]]) -> list[T]:
    """``fn`` on every item at once (one coroutine per peer), results in order."""
    return list(await asyncio.gather(*(fn(x) for x in items)))


async def outcomes(items: Iterable[X], fn: Callable[[X], Awaitable[T]]) -> list[Any]:
    """Like :func:`each`, but every peer's result or exception."""
    return list(await asyncio.gather(*(fn(x) for x in items), return_exceptions=True))


def split_members(colors: Sequence[int | None], keys: Sequence[int]) -> dict[int, list[int]]:
    """MPI_Comm_split's groups, written out: color -> parent ranks ordered by (key, rank)."""
    groups: dict[int, list[tuple[int, int]]] = {}
    for rank, (color, key) in enumerate(zip(colors, keys, strict=True)):
        if color is not None:
            groups.setdefault(color, []).append((key, rank))
    return {color: [rank for _, rank in sorted(pairs)] for color, pairs in groups.items()}


def sorted_members(colors: Sequence[int | None], keys: Sequence[int]) -> list[list[int]]:
    """The groups of :func:`split_members` in ascending color order (as :func:`split_all`)."""
    return [members for _, members in sorted(split_members(colors, keys).items())]


async def split_all(
    comms: Sequence[fmi.Communicator], colors: Sequence[int | None], keys: Sequence[int]
) -> list[list[fmi.Communicator]]:
    """Split ``comms`` on every peer; each child group in child-rank order, checked
    against :func:`split_members` (rank, size, parent), in ascending color order."""
    subs = await each(comms, lambda c: c.split(colors[c.rank], keys[c.rank]))
    for rank, sub in enumerate(subs):
        assert (sub is None) == (colors[rank] is None), f"peer {rank}: {sub!r}"
    return [children(comms, subs, members) for members in sorted_members(colors, keys)]


def children(
    parents: Sequence[fmi.Communicator],
    subs: Sequence[fmi.Communicator | None],
    members: Sequence[int],
) -> list[fmi.Communicator]:
    """The child group of ``members`` (parent ranks), in child-rank order, checked."""
    group = []
    for rank, parent_rank in enumerate(members):
        sub = subs[parent_rank]
        assert sub is not None, f"peer {parent_rank} got no child"
        assert (sub.rank, sub.size) == (rank, len(members)), f"{sub!r}: expected rank {rank}"
        assert sub.parent is parents[parent_rank]
        group.append(sub)
    return group


@dataclass
class Suite:
    """How much of the collective suite a child runs.

    ``roots``: None for every root of the child, else these (modulo its size);
    ``algorithms``: an ``algorithm=`` per collective (say the storage-native ones).
    """

    roots: Sequence[int] | None = None
    cases: Sequence[str] = CASES
    algorithms: dict[str, str] | None = None

    def algo(self, op: str) -> dict[str, str]:
        if self.algorithms and op in self.algorithms:
            return {"algorithm": self.algorithms[op]}
        return {}


FULL = Suite(cases=(*CASES, *MORE_CASES))
LIGHT = Suite(roots=(0, -1))


async def run_suite(
    subs: Sequence[fmi.Communicator], members: Sequence[int], suite: Suite = FULL
) -> int:
    """Every collective and a ring of point-to-point messages on the child ``subs``
    (child-rank order; ``members[r]`` its parent rank), each checked against the
    reference over the members.  Returns the number of collectives run."""
    n = len(subs)
    assert [(s.rank, s.size) for s in subs] == [(r, n) for r in range(n)]
    where = f"child of {list(members)}"
    done = 0
    roots = range(n) if suite.roots is None else sorted({r % n for r in suite.roots})
    for root in roots:
        for kind, make in OBJECTS.items():
            want = make(members[root])
            got = await each(
                subs,
                lambda s: s.bcast(
                    want if s.rank == root else None, root=root, **suite.algo("bcast")
                ),
            )
            for r, g in enumerate(got):
                assert_same(g, want, f"{where}: bcast root={root} {kind} rank={r}")
            got = await each(
                subs, lambda s: s.gather(make(members[s.rank]), root=root, **suite.algo("gather"))
            )
            want_all = [make(m) for m in members]
            for r, g in enumerate(got):
                assert_same(g, want_all if r == root else None, f"{where}: gather root={root}")
            items = [make(m + 50) for m in members]
            got = await each(
                subs,
                lambda s: s.scatter(
                    items if s.rank == root else None, root=root, **suite.algo("scatter")
                ),
            )
            for r, g in enumerate(got):
                assert_same(g, items[r], f"{where}: scatter root={root} {kind} rank={r}")
            done += 3
        for case in suite.cases:
            kind, op = REDUCTIONS[case]
            values = [value(kind, m) for m in members]
            got = await each(
                subs,
                lambda s: s.reduce(values[s.rank], op=op, root=root, **suite.algo("reduce")),
            )
            want = reference_fold(op, values)
            for r, g in enumerate(got):
                assert_same(g, want if r == root else None, f"{where}: reduce {case} root={root}")
            done += 1
    for case in suite.cases:
        kind, op = REDUCTIONS[case]
        values = [value(kind, m) for m in members]
        want = reference_fold(op, values)
        got = await each(
            subs, lambda s: s.allreduce(values[s.rank], op=op, **suite.algo("allreduce"))
        )
        for r, g in enumerate(got):
            assert_same(g, want, f"{where}: allreduce {case} rank={r}")
        got = await each(subs, lambda s: s.scan(values[s.rank], op=op, **suite.algo("scan")))
        for r, g in enumerate(got):
            assert_same(g, reference_fold(op, values[: r + 1]), f"{where}: scan {case} rank={r}")
        got = await each(subs, lambda s: s.exscan(values[s.rank], op=op, **suite.algo("exscan")))
        for r, g in enumerate(got):
            want_ex = None if r == 0 else reference_fold(op, values[:r])
            assert_same(g, want_ex, f"{where}: exscan {case} rank={r}")
        lists = [[value(kind, m * 10 + j) for j in range(n)] for m in members]
        got = await each(
            subs,
            lambda s: s.reduce_scatter(lists[s.rank], op=op, **suite.algo("reduce_scatter")),
        )
        for r, g in enumerate(got):
            want_part = reference_fold(op, [lists[s][r] for s in range(n)])
            assert_same(g, want_part, f"{where}: reduce_scatter {case} rank={r}")
        done += 4
    arrays = [np.arange(2 * n + 1, dtype=np.int64) * (m + 1) for m in members]
    got = await each(
        subs, lambda s: s.reduce_scatter(arrays[s.rank], **suite.algo("reduce_scatter"))
    )
    for r, g in enumerate(got):
        want_arr = reference_fold(fmi.SUM, [np.array_split(a, n)[r] for a in arrays])
        assert_same(g, want_arr, f"{where}: reduce_scatter of arrays rank={r}")
    for kind, make in OBJECTS.items():
        got = await each(
            subs, lambda s: s.allgather(make(members[s.rank]), **suite.algo("allgather"))
        )
        for r, g in enumerate(got):
            assert_same(g, [make(m) for m in members], f"{where}: allgather {kind} rank={r}")
    sends = {r: [(members[r], j) for j in range(n)] for r in range(n)}
    got = await each(subs, lambda s: s.alltoall(sends[s.rank], **suite.algo("alltoall")))
    for r, g in enumerate(got):
        assert_same(g, [sends[s][r] for s in range(n)], f"{where}: alltoall rank={r}")
    await each(subs, lambda s: s.barrier(**suite.algo("barrier")))
    done += 5
    if n > 1:
        got = await each(subs, lambda s: ring(s, members))
        for r, g in enumerate(got):
            assert g == ("ring", members[(r - 1) % n], (r - 1) % n), f"{where}: p2p rank={r}"
    return done


async def ring(sub: fmi.Communicator, members: Sequence[int], tag: int = 5) -> Any:
    """Send to the next child rank and receive from the previous one."""
    n = sub.size
    sent = asyncio.ensure_future(
        sub.send(("ring", members[sub.rank], sub.rank), (sub.rank + 1) % n, tag)
    )
    got = await sub.recv((sub.rank - 1) % n, tag)
    await sent
    return got
