"""The mpi channel against mpi4py on MPICH, and the tcp channel against both, in one run.

For P = 2 and 4 processes started by ``mpiexec``, and messages of 8 B, 64 KiB,
1 MiB and 16 MiB (numpy arrays: uint8 for point-to-point and bcast, float64 for
allreduce with SUM), the median time of

* **p2p**: a round trip, rank 0 sends the array to rank 1 and gets it back;
* **bcast** from rank 0 (non-roots pass ``None`` and the size as ``nbytes``);
* **allreduce** SUM,

measured four ways, each in its own ``mpiexec`` launch:

1. ``mpi4py``: mpi4py called directly (uppercase buffer API, blocking calls:
   ``Send``/``Recv``, ``Bcast``, ``Allreduce``), MPICH over shared memory, the
   baseline;
2. ``fmi mpi``: the library's mpi channel, ``fmi.Communicator.from_mpi()``;
   targets: <= 1.2x mpi4py at 1 MiB and above, <= 2x mpi4py + 20 us at 8 B;
3. ``fmi tcp``: the library's tcp channel (peer id = rank) through a
   rendezvous server this script starts on 127.0.0.1, with a secret;
4. ``mpi4py tcp``: mpi4py again, with MPICH forced onto its TCP network module
   on loopback (``MPIR_CVAR_NOLOCAL=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp``),
   so the tcp channel is also compared with MPI over the same transport.

Every figure is seconds per operation: a loop of back-to-back operations closed
by one barrier, timed on rank 0 (the barrier is amortised over the loop; rank 0
chooses the loop length after a warm-up so a sample lasts ~30 ms, and tells the
others outside the timed region).  Every configuration is launched twice
(once with ``--quick``), the launches interleaved, and the median is over the
samples of both.  The mpi channel's two progress strategies
(``poll``: the event loop tests MPI requests with adaptive backoff; ``thread``:
a progress thread tests them and wakes the loop) are compared on an 8 B
allreduce and on the CPU time rank 0 burns while it waits 1 s in a ``recv``
(``os.times``, every thread of the process), next to what a blocking mpi4py
``Recv`` and the tcp channel burn; the per-collective plan check
(``backends.MPI.check``) is timed on and off.

With 4 processes on a machine with fewer than 4 cores, the ranks share cores;
MPICH's blocking calls spin, so its figures there measure oversubscription too.

    python benchmarks/mpi.py [--quick] [--procs 2,4] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from common import Rendezvous, default_loop, tcp_config  # benchmarks/common.py

import fmi_async as fmi

logger = logging.getLogger(__name__)

KiB, MiB = 1024, 1024 * 1024
SIZES = (8, 64 * KiB, MiB, 16 * MiB)
OPS = ("p2p", "bcast", "allreduce")
WARM = 2  # timed warm-up operations, after one untimed
MAX_ITERS = 20_000
IDLE = 1.0  # seconds rank 0 waits in a recv for the idle-CPU figure
LAUNCH_TIMEOUT = 240.0  # seconds one mpiexec launch may take
# MPICH on its TCP network module, on loopback only.
MPICH_TCP_ENV = {
    "MPIR_CVAR_NOLOCAL": "1",
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": "lo",
}


def choose_iters(seconds_per_op: float, target: float) -> int:
    return max(1, min(MAX_ITERS, int(target / max(seconds_per_op, 1e-7))))


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- mpi4py workers (blocking)


def mpi4py_worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def body(op: str, n: int) -> tuple[Callable[[int], None], Callable[[], None]]:
        if op == "allreduce":
            src = np.ones(n // 8, dtype=np.float64)
            dst = np.empty_like(src)

            def run(k: int) -> None:
                for _ in range(k):
                    comm.Allreduce(src, dst, op=MPI.SUM)
                comm.Barrier()

            return run, lambda: expect(dst[-1] == size, op, n)
        buf = np.full(n, rank + 1, dtype=np.uint8)
        if op == "bcast":

            def run(k: int) -> None:
                for _ in range(k):
                    comm.Bcast(buf, root=0)
                comm.Barrier()

            return run, lambda: expect(buf[-1] == 1, op, n)
        back = np.empty_like(buf)

        def run(k: int) -> None:
            for _ in range(k):
                if rank == 0:
                    comm.Send(buf, 1)
                    comm.Recv(back, 1)
                elif rank == 1:
                    comm.Recv(back, 0)
                    comm.Send(back, 0)
            comm.Barrier()

        return run, lambda: expect(rank or back[-1] == 1, op, n)

    for op in args.ops.split(","):
        for n in map(int, args.sizes.split(",")):
            run, check = body(op, n)
            run(1)
            t0 = time.perf_counter()
            run(WARM)
            iters = comm.bcast(choose_iters((time.perf_counter() - t0) / WARM, args.target))
            samples = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run(iters)
                samples.append((time.perf_counter() - t0) / iters)
            check()
            if rank == 0:
                emit({"op": op, "nbytes": n, "iters": iters, "samples": samples})
    if args.idle:
        token = np.zeros(1, dtype=np.uint8)
        comm.Barrier()
        if rank == 0:
            t0, wall = os.times(), time.perf_counter()
            comm.Recv(token, 1)
            emit(idle_record(t0, wall))
        elif rank == 1:
            time.sleep(IDLE)
            comm.Send(token, 0)
        comm.Barrier()


def expect(ok: object, op: str, n: int) -> None:
    if not ok:
        raise SystemExit(f"{op} of {n} bytes returned a wrong result")


def idle_record(t0: os.times_result, wall: float) -> dict[str, Any]:
    t1 = os.times()
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    return {"op": "idle", "cpu": cpu, "wall": time.perf_counter() - wall}


# ---------------------------------------------------------------- fmi workers (asyncio)


def fmi_communicator(args: argparse.Namespace) -> fmi.Communicator:
    if args.kind == "fmi-tcp":
        config = tcp_config(args.rendezvous, 120)
        # Started by mpiexec like the others, but never initializes MPI: the
        # rank and size come from the launcher's environment (MPICH's Hydra).
        rank, size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
        return fmi.Communicator(rank, size, config, run_id=args.run_id, timeout=120)
    options: dict[str, Any] = {"enabled": True}
    if args.progress:
        options["progress"] = args.progress
    if args.check:
        options["check"] = args.check == "true"
    return fmi.Communicator.from_mpi(config={"backends": {"MPI": options}}, timeout=120)


async def fmi_worker(args: argparse.Namespace) -> None:
    comm = fmi_communicator(args)
    async with comm:
        rank, size = comm.rank, comm.size

        def body(op: str, n: int) -> tuple[Callable[[int], Awaitable[None]], Callable[[], None]]:
            got: list[Any] = [None]
            if op == "allreduce":
                src = np.ones(n // 8, dtype=np.float64)

                async def run(k: int) -> None:
                    for _ in range(k):
                        got[0] = await comm.allreduce(src, fmi.SUM)
                    await comm.barrier()

                return run, lambda: expect(got[0][-1] == size, op, n)
            buf = np.full(n, rank + 1, dtype=np.uint8)
            if op == "bcast":

                async def run(k: int) -> None:
                    for _ in range(k):
                        got[0] = await comm.bcast(buf if rank == 0 else None, 0, nbytes=n)
                    await comm.barrier()

                return run, lambda: expect(got[0][-1] == 1, op, n)

            async def run(k: int) -> None:
                for _ in range(k):
                    if rank == 0:
                        await comm.send(buf, 1)
                        got[0] = await comm.recv(1)
                    elif rank == 1:
                        await comm.send(await comm.recv(0), 0)
                await comm.barrier()

            return run, lambda: expect(rank or got[0][-1] == 1, op, n)

        for op in args.ops.split(","):
            for n in map(int, args.sizes.split(",")):
                run, check = body(op, n)
                await run(1)
                t0 = time.perf_counter()
                await run(WARM)
                iters = await comm.bcast(
                    choose_iters((time.perf_counter() - t0) / WARM, args.target), 0
                )
                samples = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    await run(iters)
                    samples.append((time.perf_counter() - t0) / iters)
                check()
                if rank == 0:
                    emit({"op": op, "nbytes": n, "iters": iters, "samples": samples})
        if args.idle:
            await comm.barrier()
            if rank == 0:
                t0, wall = os.times(), time.perf_counter()
                await comm.recv(1)
                emit(idle_record(t0, wall))
            elif rank == 1:
                await asyncio.sleep(IDLE)
                await comm.send(0, 0)
            await comm.barrier()


def worker_main(args: argparse.Namespace) -> None:
    if args.kind == "mpi4py":
        mpi4py_worker(args)
    elif args.loop == "uvloop":
        import uvloop

        uvloop.run(fmi_worker(args))
    else:
        asyncio.run(fmi_worker(args))


# ---------------------------------------------------------------- orchestration


def mpiexec() -> str:
    beside = Path(sys.executable).with_name("mpiexec")  # the one of mpi4py's MPI wheel
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("mpiexec is not on PATH (pip install mpich mpi4py)")
    return found


def launch(
    procs: int, argv: list[str], env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Run one ``mpiexec`` of workers; (records rank 0 printed, error text or "")."""
    cmd = [mpiexec(), "-n", str(procs), sys.executable, __file__, "--worker", *argv]
    logger.debug("launching %s with %s", cmd, env)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: a timeout kills every rank
    )
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        err = f"timed out after {LAUNCH_TIMEOUT:.0f} s\n{err}"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode and not err.startswith("timed out"):
        err = f"exit code {proc.returncode}\n{err}"
    elif not proc.returncode:
        err = ""
    return records, err.strip()


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB" if n >= KiB else f"{n} B"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def target(n: int, ours: float | None, base: float | None) -> str:
    if ours is None or base is None:
        return "n/a"
    if n >= MiB:
        return f"<=1.2x {'met' if ours <= 1.2 * base else 'MISSED'}"
    if n <= 8:
        return f"<=2x+20us {'met' if ours <= 2 * base + 20e-6 else 'MISSED'}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="mpi4py", help=argparse.SUPPRESS)
    parser.add_argument("--ops", default=",".join(OPS), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, default=0.03, help=argparse.SUPPRESS)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--progress", default="", help=argparse.SUPPRESS)
    parser.add_argument("--check", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--procs", default="2,4", help="process counts (default 2,4)")
    parser.add_argument("--loop", default="", help="asyncio or uvloop (default: as fmi.run)")
    parser.add_argument("--json", default="", help="also write every sample to this file")
    args = parser.parse_args()
    args.loop = args.loop or default_loop()
    if args.worker:
        worker_main(args)
        return

    rounds, reps, sample = (1, 3, 0.01) if args.quick else (2, 7, 0.03)
    common = ["--reps", str(reps), "--target", str(sample), "--loop", args.loop]
    extra = [*common, "--ops", "allreduce", "--sizes", "8", "--idle"]
    procs = [int(p) for p in args.procs.split(",")]
    print(
        f"fmi-async mpi benchmark: medians of {rounds} x {reps} samples, {os.cpu_count()} cores, "
        f"python {sys.version.split()[0]}, {args.loop}, mpiexec {mpiexec()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"mpi channel defaults: {mpi_defaults()}")
    # (P, configuration) -> records; configuration -> (worker argv, extra env)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with Rendezvous() as rendezvous:
        configs: dict[str, tuple[list[str], dict[str, str]]] = {
            "mpi4py": (["--kind", "mpi4py", *common, "--idle"], {}),
            "fmi mpi": (["--kind", "fmi-mpi", *common, "--idle"], {}),
            "fmi tcp": (["--kind", "fmi-tcp", "--rendezvous", rendezvous, *common, "--idle"], {}),
            "mpi4py tcp": (["--kind", "mpi4py", *common, "--idle"], MPICH_TCP_ENV),
            "fmi mpi poll": (["--kind", "fmi-mpi", "--progress", "poll", *extra], {}),
            "fmi mpi thread": (["--kind", "fmi-mpi", "--progress", "thread", *extra], {}),
            "fmi mpi check=false": (["--kind", "fmi-mpi", "--check", "false", *extra], {}),
            "fmi mpi check=true": (["--kind", "fmi-mpi", "--check", "true", *extra], {}),
        }
        # Rounds interleave the configurations, so a burst of load from other
        # processes is spread over all of them rather than spoiling one.
        for rnd in range(1, rounds + 1):
            for p in procs:
                for name, (argv, env) in configs.items():
                    run_id = ["--run-id", uuid.uuid4().hex[:8]]
                    t0 = time.perf_counter()
                    records, err = launch(p, [*argv, *run_id], env)
                    entry = results.setdefault(f"P={p} {name}", {"records": [], "errors": []})
                    entry["records"] += records
                    if err:
                        entry["errors"].append(err)
                    print(
                        f"  round {rnd} P={p} {name:<20} {time.perf_counter() - t0:6.1f} s"
                        + (f"  FAILED: {err.splitlines()[0]}" if err else ""),
                        flush=True,
                    )
                    if err:
                        print("    " + "\n    ".join(err.splitlines()[-8:]), flush=True)
    report(results, procs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def mpi_defaults() -> str:
    from fmi_async.channels.mpi import MPIOptions

    keys = ("progress", "poll_spin", "poll_max", "check")
    return ", ".join(f"{f.name}={f.default}" for f in fields(MPIOptions) if f.name in keys)


def median_of(results: dict[str, dict[str, Any]], key: str, op: str, n: int = 0) -> float | None:
    """The median of every round's samples of ``op`` at ``n`` bytes (idle: CPU seconds)."""
    pooled = [
        x
        for rec in results.get(key, {}).get("records", [])
        if rec["op"] == op and (op == "idle" or rec["nbytes"] == n)
        for x in ([rec["cpu"]] if op == "idle" else rec["samples"])
    ]
    return statistics.median(pooled) if pooled else None


def report(results: dict[str, dict[str, Any]], procs: list[int]) -> None:
    head = (
        f"  {'op':<10}{'size':>8}{'mpi4py':>11}{'fmi mpi':>11}{'mpi/mpi4py':>11}  {'target':<16}"
        f"{'fmi tcp':>11}{'tcp/mpi4py':>11}{'mpi4py tcp':>12}{'tcp/mpi4py tcp':>15}"
    )
    for p in procs:
        print(f"\nP = {p}: seconds per operation (p2p: one round trip), median")
        print(head)
        for op in OPS:
            for n in SIZES:
                base, ours, tcp, base_tcp = (
                    median_of(results, f"P={p} {name}", op, n)
                    for name in ("mpi4py", "fmi mpi", "fmi tcp", "mpi4py tcp")
                )
                print(
                    f"  {op:<10}{fmt_size(n):>8}{fmt_time(base):>11}{fmt_time(ours):>11}"
                    f"{ratio(ours, base):>11}  {target(n, ours, base):<16}{fmt_time(tcp):>11}"
                    f"{ratio(tcp, base):>11}{fmt_time(base_tcp):>12}{ratio(tcp, base_tcp):>15}"
                )
        print(
            f"\nP = {p}: 8 B allreduce and CPU burnt by rank 0 while waiting {IDLE:.0f} s in a recv"
        )
        for name in (
            "fmi mpi poll",
            "fmi mpi thread",
            "fmi mpi check=true",
            "fmi mpi check=false",
            "fmi mpi",
            "mpi4py",
            "fmi tcp",
        ):
            key = f"P={p} {name}"
            lat, cpu = median_of(results, key, "allreduce", 8), median_of(results, key, "idle")
            label = name + (" (defaults)" if name == "fmi mpi" else "")
            print(
                f"  {label:<24} allreduce 8 B {fmt_time(lat):>10}   idle CPU "
                + ("n/a" if cpu is None else f"{cpu:.2f} s per {IDLE:.0f} s")
            )


if __name__ == "__main__":
    main()
