"""The collective suite on the MPI channel, run by ``mpiexec`` from the repository's root:

    mpiexec -n P python -m tests.mpi.suite [--progress poll|thread] [--check on|off]
                                           [--loop asyncio|uvloop] [--only SECTION,...]

Every rank runs every collective (bcast, gather, scatter, allgather, alltoall,
reduce, allreduce, reduce_scatter, scan, exscan, barrier), every root of the
rooted ones, over the value kinds and operators of ``tests/reference.py``
(scalars, objects, arrays; commutative, non-commutative and non-associative
operators), arrays of several dtypes with MPI's built-in operators, large
arrays and objects holding several arrays, collectives started together, and
direct algorithms forced over MPI point-to-point.  Each rank checks its own
results against the sequential reference; rank 0 gathers the failures over
plain mpi4py and prints one JSON line ``{"P": ..., "checked": N, "failures":
[...], ...}``.  The exit code is 1 on any failure.
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
from tests.reference import REDUCTIONS, reference_fold, value

TIMEOUT = 20.0
"""Every collective's deadline (the communicator's timeout)."""
KINDS = ["scalar", "object", "array", "arrays"]
BIG = 4 << 20
"""Bytes of the large arrays (float64)."""


def _arrays(r: int) -> dict[str, Any]:
    """An object holding several arrays of several dtypes and shapes."""
    return {
        "f": np.linspace(0, 1, 4 + r),
        "i": np.arange(6, dtype=np.int32).reshape(2, 3) - r,
        "parts": [np.full(r + 1, r, dtype=np.uint8), np.arange(r) % 2 == 0],
        "name": f"p{r}",
    }


# The values moved by bcast/gather/scatter/allgather/alltoall, as on every
# other channel (tests/collectives/test_collectives.py), and the object above.
OBJECTS: dict[str, Callable[[int], Any]] = {
    "scalar": lambda r: r * 11 - 4,
    "object": lambda r: {"rank": r, "tag": ("t", r), "blob": bytes([r]) * (r + 1), "none": None},
    "array": lambda r: np.linspace(0, 1, 5 + r, dtype=np.float32) + r,
    "arrays": _arrays,
}


def _rng(r: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(1000 * salt + r)


# Arrays of several dtypes with MPI's built-in operators: (name, op, make(rank, n)).
# Values are chosen so that every fold is exact in any order (integers in floats),
# so MPI's own reduction order cannot make a right answer look wrong.
DTYPES: list[tuple[str, fmi.Op, Callable[[int, int], np.ndarray]]] = [
    ("float64-sum", fmi.SUM, lambda r, n: np.arange(n) * 0.5 + r),
    ("float64-min", fmi.MIN, lambda r, n: np.arange(n) * float(r % 3 - 1)),
    ("float64-max-2d", fmi.MAX, lambda r, n: _rng(r, 1).integers(-50, 50, (n, 3)) * 1.0),
    ("float64-sum-strided", fmi.SUM, lambda r, n: (np.arange(2.0 * n).reshape(2, n) + r).T),
    ("float32-sum", fmi.SUM, lambda r, n: np.arange(n, dtype=np.float32) + np.float32(r / 4)),
    ("float32-max", fmi.MAX, lambda r, n: _rng(r, 2).integers(-9, 9, n).astype(np.float32)),
    ("int32-sum", fmi.SUM, lambda r, n: np.arange(n, dtype=np.int32) * (r + 1) - 7),
    ("int32-prod", fmi.PROD, lambda r, n: ((np.arange(n) + r) % 3 + 1).astype(np.int32)),
    ("int32-min", fmi.MIN, lambda r, n: _rng(r, 3).integers(-99, 99, n).astype(np.int32)),
    ("int32-band", fmi.BAND, lambda r, n: _rng(r, 4).integers(0, 1 << 30, n).astype(np.int32)),
    ("uint8-sum", fmi.SUM, lambda r, n: ((200 + 13 * r + np.arange(n)) % 256).astype(np.uint8)),
    ("uint8-max", fmi.MAX, lambda r, n: _rng(r, 5).integers(0, 256, n).astype(np.uint8)),
    ("uint16-bor", fmi.BOR, lambda r, n: (1 << (np.arange(n) + r) % 16).astype(np.uint16)),
    ("bool-land", fmi.LAND, lambda r, n: _rng(r, 6).random(n) > 0.15),
    ("bool-lor", fmi.LOR, lambda r, n: _rng(r, 7).random(n) > 0.85),
    ("int64-bxor", fmi.BXOR, lambda r, n: _rng(r, 8).integers(0, 1 << 62, n, dtype=np.int64)),
    ("complex128-sum", fmi.SUM, lambda r, n: np.arange(n) + 1j * (r + 1)),
    # float16: MPI has no such type, so the library's own algorithms run it.
    ("float16-sum", fmi.SUM, lambda r, n: (np.arange(n) + r).astype(np.float16)),
]


# ---------------------------------------------------------------- the sections

Section = Callable[[fmi.Communicator, Checks], Awaitable[None]]


async def moving(c: fmi.Communicator, ck: Checks) -> None:
    """bcast, gather, scatter (every root), allgather and alltoall of every kind."""
    me, size = c.rank, c.size
    for kind in KINDS:
        make = OBJECTS[kind]
        everyone = [make(r) for r in range(size)]
        for root in range(size):
            want = make(root + 50)
            mine = want if me == root else None
            await ck.expect(c.bcast(mine, root=root), want, f"bcast {kind} root={root}")
            await ck.expect(
                c.gather(make(me), root=root),
                everyone if me == root else None,
                f"gather {kind} root={root}",
            )
            items = [make(r + 100) for r in range(size)]
            await ck.expect(
                c.scatter(items if me == root else None, root=root),
                items[me],
                f"scatter {kind} root={root}",
            )
        await ck.expect(c.allgather(make(me)), everyone, f"allgather {kind}")
        send = {r: [make(r * size + j) for j in range(size)] for r in range(size)}
        await ck.expect(
            c.alltoall(send[me]), [send[s][me] for s in range(size)], f"alltoall {kind}"
        )


async def reductions(c: fmi.Communicator, ck: Checks) -> None:
    """reduce (every root), allreduce, scan, exscan and reduce_scatter over REDUCTIONS."""
    me, size = c.rank, c.size
    for case, (kind, op) in REDUCTIONS.items():
        values = [value(kind, r) for r in range(size)]
        want = reference_fold(op, values)
        for root in range(size):
            await ck.expect(
                c.reduce(values[me], op=op, root=root),
                want if me == root else None,
                f"reduce {case} root={root}",
            )
        await ck.expect(c.allreduce(values[me], op=op), want, f"allreduce {case}")
        await ck.expect(
            c.scan(values[me], op=op), reference_fold(op, values[: me + 1]), f"scan {case}"
        )
        await ck.expect(
            c.exscan(values[me], op=op),
            None if me == 0 else reference_fold(op, values[:me]),
            f"exscan {case}",
        )
        if kind in ("array", "matrix"):
            # Split along axis 0 (uneven lengths); matmul on stacked parts is batched.
            arrays = [np.stack([value(kind, r)] * (size + 1)) + r for r in range(size)]
            parts = [np.array_split(a, size)[me] for a in arrays]
            await ck.expect(
                c.reduce_scatter(arrays[me], op=op),
                reference_fold(op, parts),
                f"reduce_scatter {case}",
            )
        else:
            lists = [[value(kind, r * size + j) for j in range(size)] for r in range(size)]
            await ck.expect(
                c.reduce_scatter(lists[me], op=op),
                reference_fold(op, [lists[s][me] for s in range(size)]),
                f"reduce_scatter {case}",
            )


async def dtypes(c: fmi.Communicator, ck: Checks) -> None:
    """Every reduction on arrays of several dtypes (MPI's own collectives; reduce to two
    roots per dtype, every root over all of them), inputs untouched."""
    me, size = c.rank, c.size
    n = 2 * size + 1  # reduce_scatter parts of uneven lengths
    for i, (case, op, make) in enumerate(DTYPES):
        values = [make(r, n) for r in range(size)]
        mine = values[me]
        before = mine.copy()
        want = reference_fold(op, values)
        for root in sorted({i % size, (i + size // 2) % size}):  # every root over the cases
            await ck.expect(
                c.reduce(mine, op=op, root=root),
                want if me == root else None,
                f"reduce {case} root={root}",
            )
        await ck.expect(c.allreduce(mine, op=op), want, f"allreduce {case}")
        await ck.expect(c.scan(mine, op=op), reference_fold(op, values[: me + 1]), f"scan {case}")
        await ck.expect(
            c.exscan(mine, op=op),
            None if me == 0 else reference_fold(op, values[:me]),
            f"exscan {case}",
        )
        parts = [np.array_split(v, size)[me] for v in values]
        await ck.expect(
            c.reduce_scatter(mine, op=op), reference_fold(op, parts), f"reduce_scatter {case}"
        )
        ck.same(mine, before, f"{case}: the input is unchanged")


async def edges(c: fmi.Communicator, ck: Checks) -> None:
    """Empty and 0-d arrays, numpy scalars, empty parts, Fortran order, sizes around
    the native bcast's first block."""
    me, size = c.rank, c.size
    cases: list[tuple[str, fmi.Op, Callable[[int], Any]]] = [
        ("empty", fmi.SUM, lambda r: np.zeros(0, dtype=np.float64)),
        ("numpy scalar", fmi.SUM, lambda r: np.float64(r) + 0.5),
        ("bool sum", fmi.SUM, lambda r: np.arange(5) % (r + 2) == 0),
        ("int8 sum", fmi.SUM, lambda r: np.full(4, 100 + r, dtype=np.int8)),
        ("short", fmi.SUM, lambda r: np.arange(2, dtype=np.int32) + r),  # parts may be empty
    ]
    for case, op, make in cases:
        values = [make(r) for r in range(size)]
        want = reference_fold(op, values)
        await ck.expect(c.allreduce(values[me], op=op), want, f"allreduce {case}")
        await ck.expect(
            c.reduce(values[me], op=op, root=size - 1),
            want if me == size - 1 else None,
            f"reduce {case}",
        )
        await ck.expect(c.scan(values[me], op=op), reference_fold(op, values[: me + 1]), case)
        if isinstance(values[me], np.ndarray) and values[me].ndim:
            parts = [np.array_split(v, size)[me] for v in values]
            await ck.expect(
                c.reduce_scatter(values[me], op=op),
                reference_fold(op, parts),
                f"reduce_scatter {case}",
            )
    fortran = [np.asfortranarray(np.arange(12.0).reshape(3, 4) * (r + 1)) for r in range(size)]
    await ck.expect(c.bcast(fortran[0] if me == 0 else None), fortran[0], "bcast fortran")
    await ck.expect(c.allgather(fortran[me]), fortran, "allgather fortran")
    for n in (990, 1000, 1008, 1016, 1024, 1040):
        blob = bytes(range(256)) * (n // 256) + bytes(n % 256)
        await ck.expect(c.bcast(blob if me == 0 else None), blob, f"bcast {n} bytes")
    things: list[Any] = [None, "", [], {}, "ünïcødé ✓", (1, (2, (3,)))]
    for thing in things:
        await ck.expect(c.bcast(thing if me == 0 else None), thing, f"bcast {thing!r}")
    await ck.expect(c.gather(None, root=0), [None] * size if me == 0 else None, "gather None")
    await ck.expect(c.alltoall([b""] * size), [b""] * size, "alltoall empty bytes")


async def zero_d(c: fmi.Communicator, ck: Checks) -> None:
    """Reductions of 0-d arrays fold like numpy, as on every other channel (a numpy
    scalar; the one value itself on one peer)."""
    me, size = c.rank, c.size
    for dtype, op in ((np.int64, fmi.MAX), (np.float64, fmi.SUM)):
        values = [np.array(r * 3 - 4, dtype=dtype) for r in range(size)]
        where = f"0-d {np.dtype(dtype).name} {op.name}"
        want = reference_fold(op, values)
        await ck.expect(c.allreduce(values[me], op=op), want, f"allreduce {where}")
        await ck.expect(
            c.reduce(values[me], op=op, root=0), want if me == 0 else None, f"reduce {where}"
        )
        await ck.expect(
            c.scan(values[me], op=op), reference_fold(op, values[: me + 1]), f"scan {where}"
        )
        await ck.expect(
            c.exscan(values[me], op=op),
            None if me == 0 else reference_fold(op, values[:me]),
            f"exscan {where}",
        )


async def forced_direct(c: fmi.Communicator, ck: Checks) -> None:
    """The library's own algorithms forced over MPI point-to-point."""
    me, size = c.rank, c.size
    for n in (1, size + 3, 1000):
        values = [np.arange(n, dtype=np.int64) * (r + 1) - r for r in range(size)]
        op = fmi.MAX if n == 1 else fmi.SUM
        await ck.expect(
            c.allreduce(values[me], op=op, algorithm="ring"),
            reference_fold(op, values),
            f"allreduce ring n={n}",
        )
    ints = [np.arange(2 * size + 1) % (r + 2) for r in range(size)]
    await ck.expect(
        c.allreduce(ints[me], op=fmi.LAND, algorithm="ring"),
        reference_fold(fmi.LAND, ints),
        "allreduce ring LAND (int -> bool)",
    )
    for algorithm in ("recursive_doubling", "linear"):
        values = [value("array", r) for r in range(size)]
        await ck.expect(
            c.allreduce(values[me], algorithm=algorithm),
            reference_fold(fmi.SUM, values),
            f"allreduce {algorithm}",
        )
    values = [value("scalar", r) for r in range(size)]
    for root in range(size):
        await ck.expect(
            c.bcast(values[root] if me == root else None, root=root, algorithm="binomial"),
            values[root],
            f"bcast binomial root={root}",
        )
    await ck.expect(c.barrier(algorithm="dissemination"), None, "barrier dissemination")


async def large(c: fmi.Communicator, ck: Checks) -> None:
    """Arrays of several MiB, and objects holding several large arrays."""
    me, size = c.rank, c.size
    n = BIG // 8

    def big(r: int) -> np.ndarray:
        return np.arange(n, dtype=np.float64) + r

    values = [big(r) for r in range(size)]
    last = size - 1
    await ck.expect(
        c.bcast(values[last] if me == last else None, root=last), big(last), "bcast big"
    )
    await ck.expect(c.allreduce(values[me]), reference_fold(fmi.SUM, values), "allreduce big")
    await ck.expect(
        c.reduce(values[me], op=fmi.MAX, root=0),
        reference_fold(fmi.MAX, values) if me == 0 else None,
        "reduce big",
    )
    await ck.expect(c.scan(values[me]), reference_fold(fmi.SUM, values[: me + 1]), "scan big")
    del values

    def heavy(r: int) -> dict[str, Any]:
        k = (256 << 10) // 8
        return {
            "x": np.arange(k, dtype=np.float64) * r,
            "y": np.arange(2 * k, dtype=np.int32).reshape(2, k) + r,
            "z": [np.full(k, r % 256, dtype=np.uint8), np.arange(k) % (r + 2) == 0],
        }

    heavies = [heavy(r) for r in range(size)]
    await ck.expect(c.bcast(heavies[0] if me == 0 else None, root=0), heavies[0], "bcast heavy")
    root = size // 2
    await ck.expect(
        c.gather(heavies[me], root=root), heavies if me == root else None, "gather heavy"
    )
    await ck.expect(c.allgather(heavies[me]), heavies, "allgather heavy")
    await ck.expect(
        c.scatter(heavies if me == root else None, root=root), heavies[me], "scatter heavy"
    )
    send = [heavy(me * size + j) for j in range(size)]
    await ck.expect(c.alltoall(send), [heavy(s * size + me) for s in range(size)], "alltoall heavy")
    # User operators on 1 MiB arrays: the library's algorithms over MPI point-to-point.
    ints = [np.arange(1 << 17, dtype=np.int64) - r for r in range(size)]
    minus = REDUCTIONS["array-minus"][1]
    await ck.expect(
        c.allreduce(ints[me], op=minus), reference_fold(minus, ints), "allreduce big minus"
    )
    add = fmi.Op(np.add, commutative=True, name="add")
    await ck.expect(c.allreduce(ints[me], op=add), reference_fold(add, ints), "allreduce big add")


async def concurrent(c: fmi.Communicator, ck: Checks) -> None:
    """Collectives started together (numbered in call order) all complete correctly."""
    me, size = c.rank, c.size
    arrays = [value("array", r) for r in range(size)]
    scalars = [value("scalar", r) for r in range(size)]
    minus = REDUCTIONS["scalar-minus"][1]
    calls = [
        c.allreduce(arrays[me]),
        c.bcast("hello" if me == size - 1 else None, root=size - 1),
        c.allgather(me),
        c.reduce(scalars[me], op=minus, root=size - 1),
        c.scan(arrays[me], op=fmi.MAX),
        c.barrier(),
        c.alltoall([me * 100 + j for j in range(size)]),
    ]
    wants = [
        reference_fold(fmi.SUM, arrays),
        "hello",
        list(range(size)),
        reference_fold(minus, scalars) if me == size - 1 else None,
        reference_fold(fmi.MAX, arrays[: me + 1]),
        None,
        [s * 100 + me for s in range(size)],
    ]
    try:
        got = await asyncio.gather(*calls)
    except Exception as exc:
        ck.fail(f"concurrent collectives: {type(exc).__name__}: {exc}")
        return
    for i, (g, w) in enumerate(zip(got, wants, strict=True)):
        ck.same(g, w, f"concurrent collective {i}")


async def barrier(c: fmi.Communicator, ck: Checks) -> None:
    """No rank leaves the barrier before the late one entered it, and the event
    loop keeps running other tasks while it waits."""
    delay = 0.2
    for i in range(min(c.size, 3)):
        late = (c.size - 1 + i) % c.size
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(1000):
                await asyncio.sleep(0.005)
                ticks += 1

        MPI.COMM_WORLD.Barrier()  # a common start, outside the library
        start = time.perf_counter()
        task = asyncio.ensure_future(ticker())
        if c.rank == late:
            await asyncio.sleep(delay)
        await ck.expect(c.barrier(), None, f"barrier late={late}")
        elapsed = time.perf_counter() - start
        task.cancel()
        ck.true(elapsed >= delay / 2, f"barrier late={late}: left after {elapsed:.3f}s")
        ck.true(ticks >= 5, f"barrier late={late}: only {ticks} ticks of another task")


async def families(c: fmi.Communicator, ck: Checks) -> None:
    """Everything ran on the mpi channel, arrays with built-in operators natively."""
    counts = c.stats()["collectives"]
    channels = {key.split("/")[1] for key in counts}
    ck.true(channels == {"mpi"}, f"collectives ran on channels {sorted(channels)}")
    for op in ("allreduce", "reduce", "scan", "bcast", "gather", "barrier", "alltoall"):
        ck.true(f"{op}/mpi/mpi:native" in counts, f"{op} never ran natively: {counts}")


SECTIONS = [
    moving,
    reductions,
    dtypes,
    edges,
    zero_d,
    forced_direct,
    large,
    concurrent,
    barrier,
    families,
]
"""What a run checks (``--only`` picks some)."""


async def suite(progress: str, check: bool, deadline: float, sections: list[Section]) -> Checks:
    ck = Checks(MPI.COMM_WORLD.Get_rank())
    config = {"backends": {"MPI": {"progress": progress, "check": check}}}
    try:
        async with fmi.Communicator.from_mpi(config=config, timeout=TIMEOUT) as c:
            for section in sections:
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(deadline):
                        await section(c, ck)
                except TimeoutError:
                    ck.fail(f"section {section.__name__} over its {deadline}s deadline")
                ck.seconds[section.__name__] = round(time.perf_counter() - start, 2)
    except Exception as exc:
        ck.fail(f"communicator: {type(exc).__name__}: {exc}")
    return ck


def report(world: Any, checked: int, failures: list[str], **extra: Any) -> bool:
    """Gather every rank's tally on rank 0, which prints one JSON line; True if all passed."""
    everyone = world.gather((checked, failures), root=0)
    ok = None
    if world.Get_rank() == 0:
        all_failures = [f for _, fs in everyone for f in fs]
        line = {
            "P": world.Get_size(),
            **extra,
            "checked": sum(n for n, _ in everyone),
            "checked_per_rank": [n for n, _ in everyone],
            "failed": len(all_failures),
            "failures": all_failures[:100],
        }
        print(json.dumps(line), flush=True)
        ok = not all_failures
    return bool(world.bcast(ok, root=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--progress", choices=("poll", "thread"), default="poll")
    parser.add_argument("--check", choices=("on", "off"), default="on")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds per section")
    known = {s.__name__: s for s in SECTIONS}
    parser.add_argument(
        "--only", help=f"comma-separated sections to run, of {', '.join(known)} (default: all)"
    )
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [s.__name__ for s in SECTIONS]
    if not set(names) <= set(known):
        parser.error(f"unknown sections {sorted(set(names) - set(known))}")
    start = time.perf_counter()
    run = suite(args.progress, args.check == "on", args.deadline, [known[n] for n in names])
    if args.loop == "uvloop":
        import uvloop

        ck = uvloop.run(run)
    else:
        ck = asyncio.run(run)
    seconds = round(time.perf_counter() - start, 2)
    ok = report(
        MPI.COMM_WORLD,
        ck.checked,
        ck.failures,
        progress=args.progress,
        check=args.check,
        loop=args.loop,
        seconds=seconds,
        sections=ck.seconds,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
