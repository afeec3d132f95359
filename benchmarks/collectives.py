"""The collective hot path against its baselines, on asyncio and on uvloop, in one run.

Every row is a median over repetitions, printed with the ratio against a
baseline measured in the same run (issue 13's targets):

1. **8 B allreduce, tcp, P = 2, 4, 8** (a float64 array of one element, and a
   Python float): every peer its own process, the tcp channel on loopback
   (rendezvous on 127.0.0.1, no NAT).  Baseline: the same processes, on the
   same event loop, run the recursive-doubling pattern over raw asyncio
   streams: in round k each peer writes its 8 bytes to peer ``rank ^ 2**k``
   and reads 8 bytes back (``write`` / ``readexactly``, TCP_NODELAY, one
   connection per pair opened beforehand) and adds: log2 P raw exchanges.
   Samples are loops of back-to-back calls (their length chosen so one lasts
   ~30 ms), fmi and raw interleaved, timed on peer 0; target <= 2x.
   **Above the channel**: the same allreduce on a tcp communicator of ONE
   peer (no message), and the median time of the runner's synchronous start
   (``Communicator._start``: sequence number, argument check, plan lookup,
   context, mailbox entry), timed by wrapping it during an extra loop.
2. **16 MiB and 1 MiB float64 allreduce (SUM), tcp, P = 2, 4**, the same
   processes; baseline mpi4py ``Allreduce`` (preallocated result) on MPICH
   forced onto TCP (``MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi
   FI_PROVIDER=tcp``), run by ``mpiexec`` with benchmarks/mpi.py's worker;
   MPICH over shared memory (its default) for reference.  A sample is (calls
   + one barrier) / calls for both: one call at 16 MiB, ~30 ms of calls at
   1 MiB.  Target <= 1.5x MPICH/TCP; median and best of the samples printed
   (stability: median <= 1.5x best).  With and without ``out=`` if it exists.
3. **local_peers(4), 16 MiB float64 allreduce** (memory channel; one call is
   the ``gather`` of the four peers' calls).  Baseline, timed in the same
   process: what any allreduce of 4 arrays of N must compute, 3 numpy
   additions of N elements and 3 copies of the result for the other peers,
   into kept arrays (``np.add(out=)``, ``np.copyto``); target <= 2x that.  The
   same into new arrays (as a result without ``out=`` is) is printed too.
4. **examples/kmeans.py** on 8 processes (``fmi run -n 8 --nat none``,
   200 000 x 16 points, k = 8, one BLAS thread per process): the time per
   iteration and the share of it spent in allreduce.

    python benchmarks/collectives.py [--quick] [--loops asyncio,uvloop] [--json FILE]

A full run (2 interleaved rounds of 10 samples) takes about 6 minutes;
``--quick`` (one round of 5, P <= 4, 16 MiB only, 50 000 points) about one.
Peers and MPI ranks share the machine's cores: mind the load average printed.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mpi  # benchmarks/mpi.py: the mpi4py worker, its launcher and the formatting
import numpy as np
from common import RawMesh, Rendezvous, result_of, run_loop, run_peers, spawn, tcp_config

import fmi_async as fmi

MiB = 1024 * 1024
SMALL_PROCS, LARGE_PROCS, LARGE = (1, 2, 4, 8), (2, 4), (MiB, 16 * MiB)
WORKER_TIMEOUT = 300.0
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kmeans.py"
Body = Callable[[], Awaitable[Any]]


def takes_out(comm: fmi.Communicator) -> bool:
    return "out" in inspect.signature(comm.allreduce).parameters


def plans(comm: fmi.Communicator) -> dict[str, int]:
    return dict(comm.stats().get("collectives", {}))


def ran(before: dict[str, int], after: dict[str, int]) -> str:
    """The allreduce plans that ran between two ``plans()`` (channel/family:algorithm)."""
    changed = (k for k, v in after.items() if v != before.get(k, 0))
    return ",".join(sorted(k.split("/", 1)[1] for k in changed if k.startswith("allreduce/")))


# ---------------------------------------------------------------- tcp workers


async def loop_of(body: Body, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        await body()
    return (time.perf_counter() - t0) / iters


async def agreed_iters(comm: fmi.Communicator, body: Body, target: float) -> int:
    """Loop length for ~``target`` seconds per sample, chosen by peer 0 after a warm-up."""
    await body()
    seconds = await loop_of(body, 3)
    chosen: int = await comm.bcast(mpi.choose_iters(seconds, target), 0)
    return chosen


async def small_rows(comm: fmi.Communicator, reps: int, target: float) -> dict[str, Any]:
    size = comm.size
    one = np.ones(1, dtype=np.float64)
    mesh = await RawMesh.open(comm)
    got: list[Any] = [None, None]

    async def array() -> None:
        got[0] = await comm.allreduce(one, fmi.SUM)

    async def scalar() -> None:
        got[1] = await comm.allreduce(1.0, fmi.SUM)

    async def raw() -> None:
        mpi.expect(await mesh.allreduce(1.0) == size, "raw exchange", 8)

    bodies: dict[str, Body] = {"array": array, "float": scalar}
    if size > 1:
        bodies["raw"] = raw
    before = plans(comm)
    iters = {name: await agreed_iters(comm, body, target) for name, body in bodies.items()}
    out: dict[str, Any] = {name: [] for name in bodies}
    for _ in range(reps):  # interleaved: a burst of load spoils all three alike
        for name, body in bodies.items():
            await comm.barrier()
            out[name].append(await loop_of(body, iters[name]))
    mpi.expect(got[0][0] == size and got[1] == size, "allreduce", 8)
    out["plan"] = ran(before, plans(comm))
    out["dispatch"] = await dispatch_share(comm, array, iters["array"])
    await mesh.close()
    return out


async def dispatch_share(comm: fmi.Communicator, body: Body, iters: int) -> list[float] | None:
    """Medians over ``iters`` calls: [seconds in the runner's synchronous start, seconds
    of the whole call].  Medians, as a call preempted half-way must not count."""
    start = getattr(comm, "_start", None)
    if start is None:
        return None
    spent: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return start(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    calls = []
    await comm.barrier()
    try:
        comm._start = timed  # type: ignore[method-assign]  # on this instance only
    except AttributeError:
        return None
    try:
        for _ in range(iters):
            t0 = time.perf_counter()
            await body()
            calls.append(time.perf_counter() - t0)
    finally:
        del comm._start
    if not spent:  # the runner no longer starts through _start
        return None
    return [statistics.median(spent), statistics.median(calls)]


async def large_rows(comm: fmi.Communicator, n: int, reps: int, target: float) -> dict[str, Any]:
    src = np.ones(n // 8, dtype=np.float64)
    dst = np.empty_like(src)
    got: list[Any] = [None]

    async def new() -> None:
        got[0] = await comm.allreduce(src, fmi.SUM)

    async def into() -> None:
        await comm.allreduce(src, fmi.SUM, out=dst)  # type: ignore[call-arg]
        got[0] = dst

    bodies: dict[str, Body] = {"new": new, "out": into} if takes_out(comm) else {"new": new}
    out: dict[str, Any] = {}
    for name, body in bodies.items():
        before = plans(comm)

        # As benchmarks/mpi.py's mpi4py worker: (calls + one barrier) / calls.
        iters = 1 if n >= 16 * MiB else await agreed_iters(comm, body, target)
        await body()
        samples = []
        for _ in range(reps):
            await comm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                await body()
            await comm.barrier()
            samples.append((time.perf_counter() - t0) / iters)
        mpi.expect(got[0][-1] == comm.size, "allreduce", n)
        out[name] = {"samples": samples, "iters": iters, "plan": ran(before, plans(comm))}
    return out


async def tcp_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    config = tcp_config(args.rendezvous, WORKER_TIMEOUT)
    async with fmi.Communicator(args.peer, args.size, config, run_id=args.run_id) as comm:
        out: dict[str, Any] = {"small": await small_rows(comm, args.reps, args.target)}
        for n in (int(s) for s in args.sizes.split(",") if s):
            out[str(n)] = await large_rows(comm, n, args.reps, args.target)
        return out if comm.rank == 0 else None


# ---------------------------------------------------------------- the memory channel


async def memory_worker(reps: int, n: int = 16 * MiB, size: int = 4) -> dict[str, Any]:
    xs = [np.full(n // 8, r + 1.0) for r in range(size)]
    outs = [np.empty_like(xs[0]) for _ in range(size)]
    expected = size * (size + 1) / 2

    def numpy_reused() -> None:  # (size - 1) additions and copies into kept arrays
        np.add(xs[0], xs[1], out=outs[0])
        for x in xs[2:]:
            np.add(outs[0], x, out=outs[0])
        for o in outs[1:]:
            np.copyto(o, outs[0])

    def numpy_new() -> None:  # the same into new arrays
        acc = xs[0] + xs[1]
        for x in xs[2:]:
            acc += x
        [acc.copy() for _ in outs[1:]]

    async with fmi.local_peers(size, timeout=WORKER_TIMEOUT) as comms:
        calls: dict[str, Callable[[], Awaitable[list[Any]]]] = {
            "new": lambda: asyncio.gather(*(c.allreduce(x) for c, x in zip(comms, xs, strict=True)))
        }
        if takes_out(comms[0]):
            calls["out"] = lambda: asyncio.gather(
                *(c.allreduce(x, out=o) for c, x, o in zip(comms, xs, outs, strict=True))
            )
        before = plans(comms[0])
        out: dict[str, Any] = {name: [] for name in [*calls, "numpy", "numpy new"]}
        for rep in range(reps + 1):  # repetition 0 warms up
            for name, call in calls.items():
                t0 = time.perf_counter()
                results = await call()
                if rep:
                    out[name].append(time.perf_counter() - t0)
                got = results if name == "new" else outs
                mpi.expect(all(r[-1] == expected for r in got), "local allreduce", n)
            for name, work in (("numpy", numpy_reused), ("numpy new", numpy_new)):
                t0 = time.perf_counter()
                work()
                if rep:
                    out[name].append(time.perf_counter() - t0)
        out["plan"] = ran(before, plans(comms[0]))
    return out


def worker_main(args: argparse.Namespace) -> None:
    if args.mode == "memory":
        result = run_loop(args.loop, memory_worker(args.reps))
    else:
        result = run_loop(args.loop, tcp_worker(args))
    print(json.dumps({"result": result}), flush=True)


# ---------------------------------------------------------------- orchestration


def on_tcp(
    size: int, loop: str, rendezvous: str, reps: int, target: float, large: tuple[int, ...]
) -> dict[str, Any]:
    sizes = ",".join(map(str, large)) if size in LARGE_PROCS else ""
    argv = ["--size", str(size), "--loop", loop, "--rendezvous", rendezvous, "--sizes", sizes]
    argv += ["--run-id", uuid.uuid4().hex[:8], "--reps", str(reps), "--target", str(target)]
    result: dict[str, Any] = run_peers(__file__, size, argv, WORKER_TIMEOUT)[0]
    return result


def on_memory(loop: str, reps: int) -> dict[str, Any]:
    proc = spawn(__file__, ["--mode", "memory", "--loop", loop, "--reps", str(reps)])
    result: dict[str, Any] = result_of(proc, WORKER_TIMEOUT)
    return result


def on_mpich(size: int, n: int, tcp: bool, reps: int, target: float) -> list[float]:
    """Samples of mpi4py ``Allreduce`` of ``n`` bytes, from benchmarks/mpi.py's worker."""
    argv = ["--kind", "mpi4py", "--ops", "allreduce", "--sizes", str(n), "--reps", str(reps)]
    argv += ["--target", str(target if n < 16 * MiB else 1e-9)]  # 16 MiB: one call per sample
    records, err = mpi.launch(size, argv, mpi.MPICH_TCP_ENV if tcp else None)
    if err:
        print(f"  mpi4py P={size} {n} B {'tcp' if tcp else 'shm'} FAILED: {err.splitlines()[0]}")
    return [x for rec in records for x in rec["samples"]]


def on_kmeans(loop: str, points: int) -> str:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fmi_async", "run", "-n", "8", "--nat", "none"]
    cmd += [str(EXAMPLE), "--loop", loop, "--points", str(points)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env, cwd=EXAMPLE.parent
    )
    found = re.search(r"k-means: .*", proc.stdout)
    return found.group(0) if found else f"FAILED: {(proc.stdout + proc.stderr)[-300:]}"


# ---------------------------------------------------------------- report


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def verdict(ours: float | None, base: float | None, limit: float) -> str:
    if ours is None or base is None:
        return "n/a"
    return f"<={limit:g}x {'met' if ours <= limit * base else 'MISSED'}"


def dig(run: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = run
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node


def pooled(runs: list[dict[str, Any]], *path: str) -> list[float]:
    """Every round's samples at ``path`` in the workers' results."""
    out: list[float] = []
    for node in (dig(run, path) for run in runs):
        out += node.get("samples", []) if isinstance(node, dict) else node
    return out


def plan_of(runs: list[dict[str, Any]], *path: str) -> str:
    return next((str(node) for node in (dig(run, path) for run in runs) if node), "?")


def report_small(tcp: dict[int, list[dict[str, Any]]]) -> None:
    print("  8 B allreduce, tcp: fmi per call; raw = recursive doubling over raw asyncio streams")
    print(f"    {'P':>2}  {'value':<11}{'fmi':>10}{'raw':>10}{'ratio':>8}  {'target':<13}plan")
    for p in sorted(tcp)[1:]:
        raw = med(pooled(tcp[p], "small", "raw"))
        for kind, label in (("array", "float64[1]"), ("float", "float")):
            ours = med(pooled(tcp[p], "small", kind))
            print(
                f"    {p:>2}  {label:<11}{mpi.fmt_time(ours):>10}{mpi.fmt_time(raw):>10}"
                f"{mpi.ratio(ours, raw):>8}  {verdict(ours, raw, 2):<13}"
                f"{plan_of(tcp[p], 'small', 'plan')}"
            )
    one = {kind: med(pooled(tcp[1], "small", kind)) for kind in ("array", "float")}
    print(
        "  above the channel: allreduce on a tcp communicator of one peer (no message): "
        f"float64[1] {mpi.fmt_time(one['array'])}, float {mpi.fmt_time(one['float'])}"
    )
    parts = []
    for p in sorted(tcp):
        shares = [run["small"]["dispatch"] for run in tcp[p] if run["small"].get("dispatch")]
        if shares:
            start, call = (statistics.median(x) for x in zip(*shares, strict=True))
            parts.append(f"P={p} {mpi.fmt_time(start)} ({start / call:.0%})")
    print(
        "  runner's synchronous start (Communicator._start) per float64[1] call, "
        f"share of the call: {', '.join(parts) or 'n/a'}"
    )


def report_large(
    tcp: dict[int, list[dict[str, Any]]], mpich: dict[str, list[float]], large: tuple[int, ...]
) -> None:
    print("  float64 allreduce, tcp: median / best of the samples, against MPICH (mpi4py)")
    print(
        f"    {'size':>6} {'P':>2} {'fmi':<9}{'median':>10}{'best':>10}{'med/best':>9}"
        f" |{'MPICH tcp':>10}{'best':>10}{'med/best':>9} |{'fmi/tcp':>8}  {'target':<14}"
        f"{'MPICH shm':>10}{'fmi/shm':>8}  plan"
    )
    for n in large:
        for p in LARGE_PROCS:
            base = mpich.get(f"tcp {p} {n}", [])
            shm = med(mpich.get(f"shm {p} {n}", []))
            for variant in ("new", "out"):
                xs = pooled(tcp[p], str(n), variant)
                if not xs:
                    continue
                ours, b = med(xs), med(base)
                label = "" if variant == "new" else "out="
                print(
                    f"    {mpi.fmt_size(n):>6} {p:>2} {label:<9}{mpi.fmt_time(ours):>10}"
                    f"{mpi.fmt_time(min(xs)):>10}{mpi.ratio(ours, min(xs)):>9} |"
                    f"{mpi.fmt_time(b):>10}{mpi.fmt_time(min(base, default=None)):>10}"
                    f"{mpi.ratio(b, min(base, default=None)):>9} |{mpi.ratio(ours, b):>8}  "
                    f"{verdict(ours, b, 1.5) if n >= 16 * MiB else '-':<14}"
                    f"{mpi.fmt_time(shm):>10}{mpi.ratio(ours, shm):>8}  "
                    f"{plan_of(tcp[p], str(n), variant, 'plan')}"
                )
    print("    stability target: median <= 1.5x best (med/best)")


def report_memory(runs: list[dict[str, Any]]) -> None:
    kept, fresh = med(pooled(runs, "numpy")), med(pooled(runs, "numpy new"))
    print(
        "  local_peers(4) 16 MiB float64 allreduce, one process; numpy baseline: 3 adds of N"
        " and 3 copies of N, into kept arrays (np.add out=, np.copyto) or into new ones"
    )
    print(f"    numpy: kept arrays {mpi.fmt_time(kept)}, new arrays {mpi.fmt_time(fresh)}")
    for variant in ("new", "out"):
        xs = pooled(runs, variant)
        if xs:
            ours = med(xs)
            print(
                f"    fmi{' out=' if variant == 'out' else ''}: median {mpi.fmt_time(ours)}, "
                f"best {mpi.fmt_time(min(xs))}; /numpy kept arrays {mpi.ratio(ours, kept)} "
                f"{verdict(ours, kept, 2)}; /numpy new arrays {mpi.ratio(ours, fresh)}"
                f"  plan {plan_of(runs, 'plan')}"
            )


# ---------------------------------------------------------------- main


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    hidden = {"--mode": "tcp", "--peer": 0, "--size": 1, "--sizes": "", "--rendezvous": ""}
    hidden.update({"--run-id": "bench", "--reps": 10, "--target": 0.03, "--loop": "asyncio"})
    for name, default in hidden.items():  # the workers' arguments
        parser.add_argument(name, type=type(default), default=default, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one short round (~1 minute)")
    parser.add_argument("--loops", default="asyncio,uvloop", help="event loops to measure")
    parser.add_argument("--json", default="", help="also write every sample to this file")
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    rounds, reps, target = (1, 5, 0.01) if args.quick else (2, 10, 0.03)
    points = 50_000 if args.quick else 200_000
    small = SMALL_PROCS[:-1] if args.quick else SMALL_PROCS
    large = LARGE[1:] if args.quick else LARGE
    loops = args.loops.split(",")
    print(
        f"fmi-async collectives benchmark (issue 13): {rounds} x {reps} samples per figure, "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}, "
        f"fmi_async from {Path(fmi.__file__).parent}, load average {load()}",
        flush=True,
    )
    started = time.perf_counter()
    tcp: dict[tuple[str, int], list[dict[str, Any]]] = {}
    memory: dict[str, list[dict[str, Any]]] = {}
    mpich: dict[str, list[float]] = {}
    kmeans: dict[str, list[str]] = {}
    with Rendezvous() as rendezvous:
        for rnd in range(rounds):  # rounds interleave everything: load spreads over all
            t0 = time.perf_counter()
            for p in LARGE_PROCS:
                for n in large:
                    for env in ("tcp", "shm"):
                        mpich.setdefault(f"{env} {p} {n}", [])
                        mpich[f"{env} {p} {n}"] += on_mpich(p, n, env == "tcp", reps, target)
            print(f"  round {rnd + 1} mpi4py: {time.perf_counter() - t0:.1f} s", flush=True)
            for loop in loops:
                for p in small:
                    t0 = time.perf_counter()
                    result = on_tcp(p, loop, rendezvous, reps, target, large)
                    tcp.setdefault((loop, p), []).append(result)
                    print(f"  round {rnd + 1} {loop} P={p}: {time.perf_counter() - t0:.1f} s")
                t0 = time.perf_counter()
                memory.setdefault(loop, []).append(on_memory(loop, reps))
                kmeans.setdefault(loop, []).append(on_kmeans(loop, points))
                now = time.perf_counter()
                print(f"  round {rnd + 1} {loop} memory, k-means: {now - t0:.1f} s", flush=True)
    if args.json:
        raw: dict[str, Any] = {"tcp": {f"{lp} {p}": runs for (lp, p), runs in tcp.items()}}
        raw.update(memory=memory, mpich=mpich, kmeans=kmeans)
        Path(args.json).write_text(json.dumps(raw, indent=1))
    for loop in loops:
        print(f"\n[{loop}]")
        by_p = {p: tcp[(loop, p)] for p in small}
        report_small(by_p)
        report_large(by_p, mpich, large)
        report_memory(memory[loop])
        print("  examples/kmeans.py, 8 processes, tcp:")
        for line in kmeans[loop]:
            print(f"    {line}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average {load()}")


if __name__ == "__main__":
    main()
