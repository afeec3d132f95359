"""Failure scenarios on the MPI channel, run by ``mpiexec`` from the repository's root:

    mpiexec -n P python -m tests.mpi.scenarios --case NAME[,NAME...] [--progress poll|thread]

Every rank runs each case on a communicator of its own and checks what it saw
from its own side; every rank prints one JSON line per case: ``{"case": ...,
"rank": ..., "size": ..., "ok": ..., "failures": [...], "seen": {...}}``
(``seen`` records what happened: errors, their peers, seconds).  Exit code 1
when any rank failed a case.  The cases need at least two ranks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from mpi4py import MPI

import fmi_async as fmi
from tests.mpi import Checks
from tests.reference import CONCAT, REDUCTIONS, reference_fold, value

TIMEOUT = 20.0
QUICK = 5.0
"""An abort or a mismatch must reach every peer well within this (the timeout is 20 s)."""
CASE_DEADLINE = 60.0

Seen = dict[str, Any]


def communicator(progress: str, mpi_comm: Any = None) -> fmi.Communicator:
    config = {"backends": {"MPI": {"progress": progress}}}
    return fmi.Communicator.from_mpi(mpi_comm, config=config, timeout=TIMEOUT)


async def outcome(call: Awaitable[Any]) -> tuple[Any, BaseException | None, float]:
    """The result or the error of ``call``, and the seconds it took."""
    start = time.perf_counter()
    try:
        result = await call
    except Exception as exc:
        return None, exc, time.perf_counter() - start
    return result, None, time.perf_counter() - start


def describe(exc: BaseException | None) -> Any:
    if exc is None:
        return None
    return {
        "type": type(exc).__name__,
        "peer": getattr(exc, "peer", None),
        "cause": getattr(exc, "cause", None),
        "text": str(exc),
    }


async def after(c: fmi.Communicator, ck: Checks, where: str) -> None:
    """The next collectives on every peer are right (the communicator is usable)."""
    size = c.size
    await ck.expect(c.allreduce(c.rank + 1), size * (size + 1) // 2, f"{where}: allreduce")
    arrays = [np.arange(5) * (r + 1) for r in range(size)]
    await ck.expect(
        c.allreduce(arrays[c.rank]), reference_fold(fmi.SUM, arrays), f"{where}: array allreduce"
    )


# ---------------------------------------------------------------- the cases


async def wrong_root(ck: Checks, seen: Seen, progress: str) -> None:
    """One peer passes a root out of range: RootError there, AbortedError naming it
    quickly on the others, and the communicator goes on."""
    async with communicator(progress) as c:
        bad = 1
        for op in ("bcast", "reduce"):
            root = c.size + 5 if c.rank == bad else 0
            if op == "bcast":
                call = c.bcast("x" if c.rank == 0 else None, root=root)
            else:
                call = c.reduce(np.arange(3.0), root=root)
            _, exc, took = await outcome(call)
            seen[op] = {"error": describe(exc), "seconds": round(took, 3)}
            if c.rank == bad:
                ck.true(isinstance(exc, fmi.RootError), f"{op}: the bad peer raised {exc!r}")
                ck.true(isinstance(exc, fmi.ArgumentError), f"{op}: RootError is an ArgumentError")
            else:
                ck.true(
                    isinstance(exc, fmi.AbortedError) and exc.peer == bad,
                    f"{op}: expected AbortedError naming peer {bad}, got {exc!r}",
                )
                ck.true(f"peer {bad}" in str(exc), f"{op}: the message names peer {bad}: {exc}")
                ck.true(took < QUICK, f"{op}: aborted after {took:.2f}s")
            await after(c, ck, f"after {op} with a wrong root")


async def root_mismatch(ck: Checks, seen: Seen, progress: str) -> None:
    """Peers pass different (valid) roots: PlanMismatchError on every peer."""
    async with communicator(progress) as c:
        root = 0 if c.rank == 0 else 1
        for op in ("bcast", "reduce", "gather"):
            if op == "bcast":
                call = c.bcast(["v", c.rank], root=root)
            elif op == "reduce":
                call = c.reduce(np.arange(4) + c.rank, root=root)
            else:
                call = c.gather(c.rank, root=root)
            _, exc, took = await outcome(call)
            seen[op] = {"error": describe(exc), "seconds": round(took, 3)}
            ck.true(isinstance(exc, fmi.PlanMismatchError), f"{op}: got {exc!r}")
            ck.true(took < QUICK, f"{op}: mismatch found after {took:.2f}s")
            await after(c, ck, f"after {op} with different roots")


async def shape_mismatch(ck: Checks, seen: Seen, progress: str) -> None:
    """allreduce of arrays of different shapes, dtypes, or with different operators:
    PlanMismatchError on every peer."""
    async with communicator(progress) as c:
        first = c.rank == 0
        calls = {
            "shape": c.allreduce(np.zeros(4 if first else 5)),
            "dtype": c.allreduce(np.zeros(4, dtype=np.float64 if first else np.int64)),
            "operator": c.allreduce(np.ones(4), op=fmi.SUM if first else fmi.MAX),
        }
        for what, call in calls.items():
            _, exc, took = await outcome(call)
            seen[what] = {"error": describe(exc), "seconds": round(took, 3)}
            ck.true(isinstance(exc, fmi.PlanMismatchError), f"{what}: got {exc!r}")
            ck.true(took < QUICK, f"{what}: mismatch found after {took:.2f}s")
            await after(c, ck, f"after a {what} mismatch")


async def late_peer(ck: Checks, seen: Seen, progress: str) -> None:
    """One peer does not call the collective in time: the others raise CommTimeout
    after their 1 s; then the late peer calls it.  Recorded in ``seen``: what the
    late peer gets (the result, or AbortedError naming a timed-out peer)."""
    async with communicator(progress) as c:
        late = c.size - 1
        for kind, pause in (("array", 0.0), ("array", 0.5), ("scalar", 0.0), ("scalar", 0.5)):
            where = f"{kind} pause={pause}"
            values = [value(kind, r) for r in range(c.size)]
            want = reference_fold(fmi.SUM, values)
            if c.rank != late:
                _, exc, took = await outcome(c.allreduce(values[c.rank], timeout=1))
                ck.true(isinstance(exc, fmi.CommTimeout), f"{where}: got {exc!r}")
                ck.true(0.9 <= took < QUICK, f"{where}: timed out after {took:.2f}s")
                seen[where] = {"error": describe(exc)}
            MPI.COMM_WORLD.Barrier()  # the late peer starts after the others gave up
            if c.rank == late:
                await asyncio.sleep(pause)
                got, exc, took = await outcome(c.allreduce(values[c.rank], timeout=QUICK))
                seen[where] = {"late": describe(exc) or "result", "seconds": round(took, 3)}
                ck.true(took < QUICK - 1, f"{where}: the late peer waited {took:.2f}s")
                if exc is None:
                    ck.same(got, want, f"{where}: the late peer's result")
                else:
                    ck.true(
                        isinstance(exc, fmi.AbortedError)
                        and exc.peer in range(late)
                        and exc.cause == "CommTimeout",
                        f"{where}: the late peer got {exc!r}",
                    )
            await after(c, ck, f"after a late peer ({where})")


async def cancelled(ck: Checks, seen: Seen, progress: str) -> None:
    """Peer 0 cancels its collective as soon as it started: it sees CancelledError
    (or, if the collective was over already, its result), the others the result (a
    native collective runs to its end) or AbortedError naming peer 0; the next
    collective is right on every peer."""
    async with communicator(progress) as c:
        ordered = fmi.Op(lambda a, b: a + b, commutative=False, name="concat")
        last = c.size - 1
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "array": lambda: c.allreduce(np.arange(4) + c.rank),
            "object": lambda: c.allreduce([c.rank], op=ordered),
            "bcast": lambda: c.bcast("x" if c.rank == last else None, root=last),
        }
        wants = {
            "array": reference_fold(fmi.SUM, [np.arange(4) + r for r in range(c.size)]),
            "object": list(range(c.size)),
            "bcast": "x",
        }
        for what, call in calls.items():
            task = asyncio.ensure_future(call())
            in_time = False
            if c.rank == 0:
                await asyncio.sleep(0)
                in_time = task.cancel()  # False: it was over already
            await asyncio.wait([task])
            got: Any = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if got is None:
                got = task.result()
            seen[what] = describe(got) if isinstance(got, BaseException) else "result"
            if in_time:
                ck.true(task.cancelled(), f"{what}: peer 0 got {got!r}")
            elif isinstance(got, BaseException):
                ck.true(
                    isinstance(got, fmi.AbortedError) and got.peer == 0,
                    f"{what}: expected the result or AbortedError naming peer 0, got {got!r}",
                )
            else:
                ck.same(got, wants[what], f"{what}: the result")
            await after(c, ck, f"after a cancelled {what}")


async def point_to_point(ck: Checks, seen: Seen, progress: str) -> None:
    """Tag matching, send to self, large arrays and objects, receive timeouts and
    cancelled receives, in a ring (each rank sends to the next)."""
    async with communicator(progress) as c:
        me, size = c.rank, c.size
        nxt, prv = (me + 1) % size, (me - 1) % size
        # Tags: received in the reverse order of sending; early messages never block.
        for tag in (1, 2, "three"):
            await c.send(f"{me}:{tag}", nxt, tag=tag)
        for tag in ("three", 2, 1):
            await ck.expect(c.recv(prv, tag=tag), f"{prv}:{tag}", f"recv tag {tag!r}")
        # To itself.
        mine = {"rank": me, "a": np.arange(10_000) * me}
        await c.send(mine, me, tag=7)
        await ck.expect(c.recv(me, tag=7), mine, "send to self")
        # 20 MiB there and back, and an object of several arrays.
        rng = np.random.default_rng(me)
        big = rng.random((1024, 2560), dtype=np.float64)  # 20 MiB

        def heavy(r: int) -> dict[str, Any]:
            return {
                "x": np.arange(100_000, dtype=np.float32) * r,
                "y": [np.full((3, 4), r, dtype=np.int16), np.arange(r + 1) % 2 == 1],
                "z": ("t", r, b"\x00" * 50_000),
            }

        start = time.perf_counter()
        send = asyncio.ensure_future(c.send(big, nxt, tag="big"))
        theirs = await c.recv(prv, tag="big")
        await send
        ck.same(theirs, np.random.default_rng(prv).random((1024, 2560)), "20 MiB from prv")
        await c.send(theirs, prv, tag="back")
        await ck.expect(c.recv(nxt, tag="back"), big, "20 MiB round trip")
        seen["big_seconds"] = round(time.perf_counter() - start, 3)
        await c.send(heavy(me), nxt, tag="heavy")
        await ck.expect(c.recv(prv, tag="heavy"), heavy(prv), "object of arrays")
        # A receive that times out names the peer it waited on.
        _, exc, took = await outcome(c.recv(prv, tag="never", timeout=0.5))
        seen["recv_timeout"] = describe(exc)
        ck.true(isinstance(exc, fmi.CommTimeout), f"recv timeout: got {exc!r}")
        ck.true(f"peer {prv}" in str(exc), f"the timeout names peer {prv}: {exc}")
        ck.true(0.4 <= took < QUICK, f"recv timed out after {took:.2f}s")
        # A cancelled receive loses nothing: cancel one before the message is sent ...
        task = asyncio.ensure_future(c.recv(prv, tag="late"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        ck.true(task.cancelled(), "the receive was cancelled")
        await c.send("go", prv, tag="go")  # prv may send its "late" message now
        await c.recv(nxt, tag="go")
        await c.send(f"late from {me}", nxt, tag="late")
        await ck.expect(c.recv(prv, tag="late"), f"late from {prv}", "after a cancelled recv")
        # ... and while messages stream in, cancel receives at every moment.
        await cancel_storm(c, ck, seen, nxt, prv)
        # User messages never match a collective's, in between collectives.
        await c.send("before", nxt, tag=0)
        await after(c, ck, "p2p around collectives")
        await ck.expect(c.recv(prv, tag=0), "before", "user message after collectives")


async def cancel_storm(c: fmi.Communicator, ck: Checks, seen: Seen, nxt: int, prv: int) -> None:
    """``count`` messages to ``nxt`` while receiving from ``prv`` with receives
    cancelled after random delays: every message arrives once, in order."""
    count = 60
    rng = np.random.default_rng(c.rank)

    async def sender() -> None:
        for i in range(count):
            await c.send(i, nxt, tag="storm")
            await asyncio.sleep(float(rng.random()) * 0.002)

    async def receiver() -> list[int]:
        got: list[int] = []
        cancelled = 0
        for _ in range(20 * count):  # bounded: each round takes one message or cancels
            if len(got) == count:
                break
            task = asyncio.ensure_future(c.recv(prv, tag="storm", timeout=QUICK))
            # Cancelled at once (waiting), or after a while (maybe as it completes).
            await asyncio.sleep(float(rng.choice([0.0, rng.random() * 0.003])))
            if not task.done():
                task.cancel()
            outcome = await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                cancelled += 1
            elif isinstance(outcome[0], BaseException):
                ck.fail(f"cancel storm: {outcome[0]!r}")
                break
            else:
                got.append(outcome[0])
        seen["storm_cancelled"] = cancelled
        return got

    _, got = await asyncio.gather(sender(), receiver())
    ck.same(got, list(range(count)), "cancel storm: every message once, in order")


async def split(ck: Checks, seen: Seen, progress: str) -> None:
    """A communicator on a sub-communicator of MPI's (Split by rank parity), next to
    one on COMM_WORLD: each one's collectives are right, and they do not mix."""
    world = MPI.COMM_WORLD
    half = world.Split(color=world.rank % 2, key=world.rank)
    try:
        async with communicator(progress) as w, communicator(progress, half) as h:
            members = list(range(world.rank % 2, world.size, 2))
            ck.true(
                (h.rank, h.size) == (members.index(world.rank), len(members)),
                f"sub-communicator peer {h.rank}/{h.size} of {members}",
            )
            seen["sub"] = [h.rank, h.size]
            both = await asyncio.gather(w.allreduce(world.rank), h.allreduce(world.rank))
            ck.same(list(both), [sum(range(world.size)), sum(members)], "allreduce on both")
            names = [{"names": [f"w{r}"], "n": 1} for r in members]
            await ck.expect(
                h.reduce(names[h.rank], op=CONCAT, root=h.size - 1),
                reference_fold(CONCAT, names) if h.rank == h.size - 1 else None,
                "non-commutative reduce on the sub-communicator",
            )
            await ck.expect(h.allgather(world.rank), members, "allgather on the sub-communicator")
            await ck.expect(
                h.bcast(("root", world.rank) if h.rank == 0 else None, root=0),
                ("root", members[0]),
                "bcast on the sub-communicator",
            )
            arrays = [np.arange(6) * (m + 1) for m in members]
            await ck.expect(
                h.scan(arrays[h.rank]),
                reference_fold(fmi.SUM, arrays[: h.rank + 1]),
                "scan on the sub-communicator",
            )
            kind, op = REDUCTIONS["array-matmul"]
            mats = [value(kind, m) for m in members]
            await ck.expect(
                h.allreduce(mats[h.rank], op=op), reference_fold(op, mats), "matmul allreduce"
            )
            await after(w, ck, "world after the sub-communicator")
    finally:
        half.Free()


async def groups(ck: Checks, seen: Seen, progress: str) -> None:
    """comm.split, dup and create_group on the MPI channel: each child runs MPI's own
    collectives on a communicator MPI split, duplicated or created for it, and its
    messages never meet the parent's."""
    world = MPI.COMM_WORLD
    async with communicator(progress) as c:
        color = c.rank % 2
        members = list(range(color, c.size, 2))[::-1]  # key = -rank reverses the order
        sub = await c.split(color, key=-c.rank)
        assert sub is not None
        seen["split"] = [sub.rank, sub.size]
        ck.same([sub.rank, sub.size], [members.index(c.rank), len(members)], "split ranks")
        both = await asyncio.gather(c.allreduce(c.rank), sub.allreduce(np.full(3, c.rank)))
        ck.same(
            [both[0], both[1].tolist()],
            [sum(range(c.size)), [sum(members)] * 3],
            "allreduce on parent and child",
        )
        ck.true(
            any(k.endswith("/mpi/mpi:native") for k in sub.stats()["collectives"]),
            f"the child ran MPI's own allreduce: {sub.stats()['collectives']}",
        )
        names = [{"names": [f"w{r}"], "n": 1} for r in members]
        await ck.expect(
            sub.reduce(names[sub.rank], op=CONCAT, root=0),
            reference_fold(CONCAT, names) if sub.rank == 0 else None,
            "non-commutative reduce on the child",
        )
        nxt, prv = (sub.rank + 1) % sub.size, (sub.rank - 1) % sub.size
        await asyncio.gather(sub.send(("s", c.rank), nxt, tag=1), c.send(("c", c.rank), 0, tag=1))
        await ck.expect(sub.recv(prv, tag=1), ("s", members[prv]), "child point-to-point")
        if c.rank == 0:
            got = sorted([tuple(await c.recv(r, tag=1)) for r in range(c.size)])
            ck.same(got, [("c", r) for r in range(c.size)], "parent point-to-point")
        dup = await c.dup()
        await ck.expect(dup.allgather(c.rank), list(range(c.size)), "allgather on a dup")
        none = await c.split(None if c.rank == 0 else 0)
        ck.same(none is None, c.rank == 0, "color None gets None")
        if none is not None:
            await ck.expect(none.allreduce(1), c.size - 1, "allreduce without rank 0")
        chosen = [c.size - 1, 0]
        if c.rank in chosen:
            group = await c.create_group(chosen)
            seen["group"] = [group.rank, group.size]
            await ck.expect(group.allgather(c.rank), chosen, "allgather on create_group")
            await group.close()
        inner = await sub.split(0)
        assert inner is not None
        await ck.expect(inner.allreduce(1), sub.size, "a child of a child")
        await sub.close()
        await after(c, ck, "parent after closing a child")
        await ck.expect(dup.allreduce(1), c.size, "a dup after its sibling closed")
    world.Barrier()


async def split_missing(ck: Checks, seen: Seen, progress: str) -> None:
    """The last rank never calls split: every other rank names it; then all realign."""
    async with communicator(progress) as c:
        c.timeout = 3.0
        last = c.size - 1
        if c.rank != last:
            _, exc, took = await outcome(c.split(0, timeout=3.0))
            seen["error"], seen["took"] = describe(exc), took
            ck.true(isinstance(exc, fmi.CommTimeout), f"split without rank {last}: {exc!r}")
            ck.true(f"[{last}]" in str(exc), f"the missing rank is named: {exc}")
        else:
            await asyncio.sleep(4.0)
            _, exc, _ = await outcome(c.allreduce(1))
            seen["error"] = describe(exc)
            ck.true(isinstance(exc, fmi.AbortedError), f"the late rank is told: {exc!r}")
        c.timeout = TIMEOUT
        await after(c, ck, "after the failed split")


CASES: dict[str, Callable[[Checks, Seen, str], Awaitable[None]]] = {
    "wrong_root": wrong_root,
    "root_mismatch": root_mismatch,
    "shape_mismatch": shape_mismatch,
    "late_peer": late_peer,
    "cancelled": cancelled,
    "point_to_point": point_to_point,
    "split": split,
    "groups": groups,
    "split_missing": split_missing,
}


async def run_case(name: str, progress: str) -> tuple[Checks, Seen]:
    ck, seen = Checks(MPI.COMM_WORLD.Get_rank()), Seen()
    try:
        async with asyncio.timeout(CASE_DEADLINE):
            await CASES[name](ck, seen, progress)
    except Exception as exc:
        ck.fail(f"{name}: {type(exc).__name__}: {exc}"[:500])
    return ck, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", required=True, help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--progress", choices=("poll", "thread"), default="poll")
    args = parser.parse_args(argv)
    names = list(CASES) if args.case == "all" else args.case.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    world = MPI.COMM_WORLD
    failed = False
    for name in names:
        start = time.perf_counter()
        ck, seen = asyncio.run(run_case(name, args.progress))
        verdict = {
            "case": name,
            "rank": world.Get_rank(),
            "size": world.Get_size(),
            "ok": not ck.failures,
            "checked": ck.checked,
            "failures": ck.failures,
            "seen": seen,
            "seconds": round(time.perf_counter() - start, 2),
        }
        sys.stdout.write(json.dumps(verdict, default=repr) + "\n")
        sys.stdout.flush()
        failed |= bool(ck.failures)
        world.Barrier()  # the next case starts together
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
