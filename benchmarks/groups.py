"""What forming a sub-communicator costs, against an 8-byte allgather of the same run.

For P = 4, 8 and 16 peers, on the memory channel (``fmi.local_peers``: every
peer a coroutine of one event loop) and on the tcp channel (every peer its own
process, found through a rendezvous server on 127.0.0.1), the median over
repetitions of

* ``split``: two colors (rank % 2), key = rank;
* ``dup``;
* ``create_group``: the first half of the ranks (the others do not call it);

in wall time and in messages (what every peer's channels sent: ``comm.stats()``
counters, before and after).  Forming a communicator is an agreement in
which every member tells every other its arguments, an all-to-all exchange,
so each figure is printed as a ratio against an **8-byte allgather on the
parent**, measured the same way in the same run; an 8-byte ``alltoall`` (the
agreement's message pattern) is printed beside it.

On tcp a repetition starts with a barrier of the parent and its time is the
slowest participating peer's.  On memory all peers share one loop and one
CPU: a repetition is timed from outside, from the start of every peer's call
to the end of the last, so it is the group's total work.

Then the **first allreduce (8 B) on each new child**, and its second, against
a warm allreduce on the parent: a child shares its parent's connections, so
its first collective must cost what a warm one of the parent does, not what
the parent's very first one did (on tcp that included rendezvous and
connections; printed as "parent, cold").  The children of ``split`` and
``create_group`` have P/2 peers; theirs are compared with the parent's
allreduce of P peers all the same.  Repetition 0 of everything is a warm-up.

    python benchmarks/groups.py [--quick] [--sizes 4,8,16] [--channels memory,tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np
from common import Rendezvous, default_loop, run_loop, run_peers, tcp_config  # benchmarks/common.py
from mpi import fmt_time  # benchmarks/mpi.py

import fmi_async as fmi

OPS = ("allgather", "alltoall", "allreduce", "split", "dup", "create_group")
FORMING = ("split", "dup", "create_group")
WORKER_TIMEOUT = 120.0  # seconds a tcp worker may take


def messages_sent(comm: fmi.Communicator) -> int:
    return sum(s["messages_sent"] for s in comm.stats()["channels"].values())


# ---------------------------------------------------------------- measurements

SMALL = np.zeros(1, dtype=np.float64)  # the 8-byte value of every collective here


def members(size: int, op: str) -> list[int]:
    """Who takes part in ``op``: create_group forms the first half, the rest everyone."""
    return list(range(max(1, size // 2))) if op == "create_group" else list(range(size))


async def operation(comm: fmi.Communicator, op: str) -> fmi.Communicator | None:
    """One ``op`` on ``comm``: the new child for the forming operations."""
    if op == "allgather":
        await comm.allgather(SMALL)
    elif op == "alltoall":
        await comm.alltoall([SMALL] * comm.size)
    elif op == "allreduce":
        await comm.allreduce(SMALL)
    elif op == "split":
        return await comm.split(comm.rank % 2, key=comm.rank)
    elif op == "dup":
        return await comm.dup()
    else:
        return await comm.create_group(members(comm.size, op))
    return None


def summary(size: int, cold: float, records: dict[str, list[list[float]]]) -> dict[str, Any]:
    """``records[op]``: per repetition [seconds, messages, first, second]."""
    out: dict[str, Any] = {"size": size, "cold_allreduce": cold}
    for op, rows in records.items():
        columns = map(list, zip(*rows, strict=True))
        out[op] = dict(zip(("seconds", "messages", "first", "second"), columns, strict=True))
    return out


async def on_memory(size: int, reps: int) -> dict[str, Any]:
    """Every peer a coroutine of this loop: an operation's time is that of all
    peers together, from outside (they share one CPU, so it is their total work)."""
    async with fmi.local_peers(size, timeout=WORKER_TIMEOUT) as comms:

        async def phase(calls: Any) -> tuple[float, list[Any]]:
            t0 = time.perf_counter()
            out = await asyncio.gather(*calls)
            return time.perf_counter() - t0, out

        def sent() -> int:
            return sum(messages_sent(c) for c in comms)

        cold, _ = await phase(c.allreduce(SMALL) for c in comms)
        records: dict[str, list[list[float]]] = {op: [] for op in OPS}
        for op in OPS:
            taking_part = [comms[r] for r in members(size, op)]
            for rep in range(reps + 1):  # repetition 0 warms up
                m0 = sent()
                seconds, children = await phase(operation(c, op) for c in taking_part)
                row = [seconds, sent() - m0, 0.0, 0.0]
                if op in FORMING:
                    row[2], _ = await phase(ch.allreduce(SMALL) for ch in children)
                    row[3], _ = await phase(ch.allreduce(SMALL) for ch in children)
                    await asyncio.gather(*(ch.close() for ch in children))
                if rep:
                    records[op].append(row)
    return summary(size, cold, records)


async def measure(comm: fmi.Communicator, reps: int) -> dict[str, Any] | None:
    """One peer of a multi-process group: every repetition starts with a barrier
    of the parent; its time is the slowest participating peer's, its messages
    all peers' (the summary, on rank 0 only)."""
    t0 = time.perf_counter()
    await comm.allreduce(SMALL)  # the parent's very first collective
    cold = time.perf_counter() - t0
    mine: dict[str, list[list[float] | None]] = {op: [] for op in OPS}
    for op in OPS:
        for _ in range(reps + 1):  # repetition 0 warms up (and connects every pair)
            await comm.barrier()
            if comm.rank not in members(comm.size, op):
                mine[op].append(None)  # not a member: takes no part
                continue
            m0, t0 = messages_sent(comm), time.perf_counter()
            child = await operation(comm, op)
            row = [time.perf_counter() - t0, messages_sent(comm) - m0, 0.0, 0.0]
            if child is not None:
                for i in (2, 3):  # the child's first and second allreduce
                    t0 = time.perf_counter()
                    await child.allreduce(SMALL)
                    row[i] = time.perf_counter() - t0
                await child.close()
            mine[op].append(row)
    everyone = await comm.gather([cold, mine], root=0)
    if everyone is None:
        return None
    records: dict[str, list[list[float]]] = {op: [] for op in OPS}
    for op in OPS:
        for rep in range(1, reps + 1):
            rows = [peer[op][rep] for _, peer in everyone if peer[op][rep] is not None]
            slowest = [max(r[i] for r in rows) for i in (0, 2, 3)]
            records[op].append([slowest[0], sum(r[1] for r in rows), *slowest[1:]])
    return summary(comm.size, max(c for c, _ in everyone), records)


# ---------------------------------------------------------------- the tcp channel


async def tcp_worker(args: argparse.Namespace) -> dict[str, Any] | None:
    config = tcp_config(args.rendezvous, WORKER_TIMEOUT)
    async with fmi.Communicator(args.peer, args.size, config, run_id=args.run_id) as comm:
        return await measure(comm, args.reps)


def on_tcp(size: int, reps: int, rendezvous: str, loop: str) -> dict[str, Any]:
    """``size`` worker processes, one peer each; rank 0's result."""
    argv = ["--size", str(size), "--reps", str(reps), "--rendezvous", rendezvous]
    argv += ["--run-id", uuid.uuid4().hex[:8], "--loop", loop]
    results = run_peers(__file__, size, argv, WORKER_TIMEOUT)
    assert results[0] is not None
    return results[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- report


def report(channel: str, result: dict[str, Any]) -> None:
    p, reps = result["size"], len(result["allgather"]["seconds"])

    def med(op: str, what: str) -> float:
        return float(statistics.median(result[op][what]))

    base_s, base_m = med("allgather", "seconds"), med("allgather", "messages")
    parent = med("allreduce", "seconds")
    print(f"\n{channel}, P = {p}: medians of {reps}; messages: all peers")
    print(
        f"  {'operation':<32}{'time':>10}{'/allgather':>11}{'messages':>9}{'/allgather':>11}"
        f" | {'child 1st':>9}{'/parent':>8}{'child 2nd':>10}{'/parent':>8}"
    )
    labels = {
        "allgather": "allgather 8 B (baseline)",
        "alltoall": "alltoall 8 B (as the agreement)",
        "allreduce": "allreduce 8 B (parent, warm)",
        "split": f"split 2 colors (-> {p - p // 2} + {p // 2})",
        "dup": f"dup (-> {p})",
        "create_group": f"create_group half (-> {p // 2})",
    }
    for op in OPS:
        s, m = med(op, "seconds"), med(op, "messages")
        line = (
            f"  {labels[op]:<32}{fmt_time(s):>10}{s / base_s:>10.2f}x{m:>9.0f}{m / base_m:>10.2f}x"
        )
        if op in FORMING:
            first, second = med(op, "first"), med(op, "second")
            line += f" | {fmt_time(first):>9}{first / parent:>7.2f}x"
            line += f"{fmt_time(second):>10}{second / parent:>7.2f}x"
        print(line)
    cold = result["cold_allreduce"]
    print(
        f"  {'allreduce 8 B (parent, cold)':<32}{fmt_time(cold):>10}{cold / parent:>10.2f}x"
        " the warm one: the parent's first collective (tcp: connections)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--sizes", default="4,8,16", help="group sizes (default 4,8,16)")
    parser.add_argument("--channels", default="memory,tcp", help="memory and/or tcp")
    parser.add_argument("--loop", default="", help="asyncio or uvloop (default: as fmi.run)")
    args = parser.parse_args()
    args.loop = args.loop or default_loop()
    if args.worker:
        print(json.dumps({"result": run_loop(args.loop, tcp_worker(args))}), flush=True)
        return

    reps = {"memory": 5, "tcp": 3} if args.quick else {"memory": 41, "tcp": 15}
    sizes = [int(p) for p in args.sizes.split(",")]
    print(
        f"fmi-async sub-communicator benchmark: {os.cpu_count()} cores, python "
        f"{sys.version.split()[0]}, {args.loop}, load average {os.getloadavg()[0]:.2f}"
    )
    started = time.perf_counter()
    with Rendezvous() as rendezvous:
        for channel in args.channels.split(","):
            for p in sizes:
                t0 = time.perf_counter()
                if channel == "memory":
                    result = run_loop(args.loop, on_memory(p, reps[channel]))
                elif channel == "tcp":
                    result = on_tcp(p, reps[channel], rendezvous, args.loop)
                else:
                    raise SystemExit(f"unknown channel {channel!r} (memory or tcp)")
                report(channel, result)
                print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
