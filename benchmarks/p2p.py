"""Point-to-point benchmark of the TCP channel against raw sockets, in one run.

Every figure is measured in fresh processes (peer 0 and peer 1 are separate
processes, as in a real job), on the same event loop type for the project and
its baseline, and reported as a median over repetitions together with the ratio:

* small-message round trip: fmi ``send``/``recv`` ping-pong through the TCP
  channel, divided by a raw asyncio-streams ping-pong (``readexactly``/``write``)
  of the same payload size;  target <= 1.3.  Measured three times: where the
  scheduler puts the two processes, both pinned to one CPU, and one CPU each.
  On a virtual machine, waking a process on another (idle) CPU can cost more
  than the whole round trip, and the scheduler's choice of placement differs
  between a light and a heavier process; pinning compares like with like;
* 64 MiB numpy throughput: fmi ``send`` of an array, divided by raw blocking
  ``socket.sendall`` / ``recv_into`` of the same bytes on loopback;  target >= 0.8.
  The raw receiver reuses one buffer, while fmi hands every received array to
  its user and so receives into new memory each time, whose first touch costs a
  page fault per page; a second raw baseline that also receives into a new
  buffer per message shows how much of the gap that is;
* peak memory of sending one 256 MiB array: growth of the peak RSS of the sender
  plus the receiver, as a multiple of the array size;  target < 2.5.

    python benchmarks/p2p.py [--quick] [--loops asyncio,uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np
from common import Rendezvous, result_of, run_loop, spawn, tcp_config  # benchmarks/common.py

import fmi_async as fmi

SMALL = 64  # bytes in a ping


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------- workers


async def fmi_worker(args: argparse.Namespace) -> dict[str, Any]:
    config = tcp_config(args.rendezvous, 120)
    comm = fmi.Communicator(args.peer, 2, config, run_id=args.run_id)
    async with comm:
        other = 1 - comm.rank
        out: dict[str, Any] = {}
        if args.mode == "rtt":
            ping = b"x" * SMALL
            for rep in range(args.reps + 1):  # first repetition warms up
                if comm.rank == 0:
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        await comm.send(ping, other)
                        await comm.recv(other)
                    if rep:
                        out.setdefault("samples", []).append(
                            (time.perf_counter() - t0) / args.iters
                        )
                else:
                    for _ in range(args.iters):
                        await comm.send(await comm.recv(other), other)
        elif args.mode == "bw":
            arr = np.ones(args.nbytes // 8, dtype=np.float64)
            for rep in range(args.reps + 1):
                if comm.rank == 0:
                    t0 = time.perf_counter()
                    await comm.send(arr, other)
                    await comm.recv(other)  # tiny ack: the array has fully arrived
                    if rep:
                        out.setdefault("samples", []).append(
                            arr.nbytes / (time.perf_counter() - t0)
                        )
                else:
                    got = await comm.recv(other)
                    assert got.nbytes == arr.nbytes
                    await comm.send(0, other)
        elif args.mode == "mem":
            base = rss_now_bytes()
            if comm.rank == 0:
                arr = np.ones(args.nbytes // 8, dtype=np.float64)
                await comm.send(arr, other)
                await comm.recv(other)
            else:
                got = await comm.recv(other)
                assert got.nbytes == args.nbytes and float(got[-1]) == 1.0
                await comm.send(0, other)
            out["growth"] = rss_peak_bytes() - base
        return out


async def raw_rtt_worker(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.peer == 1:  # echo server; prints its port for peer 0
        done = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    writer.write(await reader.readexactly(SMALL))
            except asyncio.IncompleteReadError:
                writer.close()
                done.set()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        await done.wait()
        server.close()
        return out
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ping = b"x" * SMALL
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            writer.write(ping)
            await reader.readexactly(SMALL)
        if rep:
            out.setdefault("samples", []).append((time.perf_counter() - t0) / args.iters)
    writer.close()
    return out


def raw_bw_worker(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.peer == 1:
        srv = socket.create_server(("127.0.0.1", 0))
        print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
        conn, _ = srv.accept()
        view = memoryview(bytearray(args.nbytes))
        for _ in range(args.reps + 1):
            if args.fresh:  # a new buffer per message, as a receiver that hands it on must
                view = np.empty(args.nbytes, dtype=np.uint8).data.cast("B")
            got = 0
            while got < args.nbytes:
                n = conn.recv_into(view[got:])
                if not n:
                    raise SystemExit("sender went away")
                got += n
            conn.sendall(b"k")
        conn.close()
        return out
    sock = socket.create_connection(("127.0.0.1", args.port))
    data = np.ones(args.nbytes // 8, dtype=np.float64)
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        sock.sendall(memoryview(data).cast("B"))
        sock.recv(1)
        if rep:
            out.setdefault("samples", []).append(args.nbytes / (time.perf_counter() - t0))
    sock.close()
    return out


def worker_main(args: argparse.Namespace) -> None:
    if args.cpus:  # placement: "0,0" both peers on CPU 0, "0,1" one CPU each
        os.sched_setaffinity(0, {int(args.cpus.split(",")[args.peer])})
    if args.kind == "raw-bw":
        result = raw_bw_worker(args)
    else:
        coro = fmi_worker(args) if args.kind == "fmi" else raw_rtt_worker(args)
        result = run_loop(args.loop, coro)
    print(json.dumps({"result": result}), flush=True)


# ----------------------------------------------------------------- orchestration


def run_pair(
    kind: str, mode: str, loop: str, common: list[str], rendezvous: str
) -> list[dict[str, Any]]:
    base = ["--kind", kind, "--mode", mode, "--loop", loop, *common]
    if kind == "fmi":
        run_id = uuid.uuid4().hex[:8]
        procs = [
            spawn(
                __file__, [*base, "--peer", str(p), "--rendezvous", rendezvous, "--run-id", run_id]
            )
            for p in (0, 1)
        ]
        return [result_of(p) for p in procs]
    server = spawn(__file__, [*base, "--peer", "1"])
    assert server.stdout is not None
    port = json.loads(server.stdout.readline())["port"]
    client = spawn(__file__, [*base, "--peer", "0", "--port", str(port)])
    return [result_of(client), result_of(server)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="fmi", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="rtt", help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--iters", type=int, default=2000, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--nbytes", type=int, default=64 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--loops", default="asyncio,uvloop", help="event loops to measure")
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return

    iters, reps = (200, 3) if args.quick else (2000, 7)
    print(
        f"fmi-async p2p benchmark: medians of {reps} repetitions, loopback TCP, "
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}"
    )
    placements = {"scheduler's choice": ""}
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        first, second = sorted(os.sched_getaffinity(0))[:2]
        placements["same CPU"] = f"{first},{first}"
        placements["one CPU each"] = f"{first},{second}"
    with Rendezvous() as rendezvous:
        for loop in args.loops.split(","):
            rtts = []
            for where, cpus in placements.items():
                rtt = ["--iters", str(iters), "--reps", str(reps), "--cpus", cpus]
                fmi_rtt = statistics.median(
                    run_pair("fmi", "rtt", loop, rtt, rendezvous)[0]["samples"]
                )
                raw_rtt = statistics.median(
                    run_pair("raw-rtt", "rtt", loop, rtt, rendezvous)[0]["samples"]
                )
                rtts.append((where, fmi_rtt, raw_rtt))
            bw = ["--reps", str(reps), "--nbytes", str(64 << 20)]
            fmi_bw = statistics.median(run_pair("fmi", "bw", loop, bw, rendezvous)[0]["samples"])
            raw_bw = statistics.median(run_pair("raw-bw", "bw", loop, bw, rendezvous)[0]["samples"])
            fresh_bw = statistics.median(
                run_pair("raw-bw", "bw", loop, [*bw, "--fresh"], rendezvous)[0]["samples"]
            )
            size = 256 << 20
            mem = run_pair("fmi", "mem", loop, ["--nbytes", str(size)], rendezvous)
            growth = (mem[0]["growth"] + mem[1]["growth"]) / size
            print(f"\n[{loop}]")
            for where, fmi_rtt, raw_rtt in rtts:
                print(
                    f"  round trip, {SMALL} B    fmi {fmi_rtt * 1e6:8.1f} us   raw streams "
                    f"{raw_rtt * 1e6:8.1f} us   ratio {fmi_rtt / raw_rtt:5.2f}  (target <= 1.3)"
                    f"  [{where}]"
                )
            print(
                f"  throughput, 64 MiB   fmi {fmi_bw / 1e9:8.2f} GB/s raw sockets "
                f"{raw_bw / 1e9:8.2f} GB/s ratio {fmi_bw / raw_bw:5.2f}  (target >= 0.8)"
                "  [raw reuses one receive buffer]"
            )
            print(
                f"  throughput, 64 MiB   fmi {fmi_bw / 1e9:8.2f} GB/s raw sockets "
                f"{fresh_bw / 1e9:8.2f} GB/s ratio {fmi_bw / fresh_bw:5.2f}"
                "                   [raw receives into a new buffer each time, like fmi]"
            )
            print(
                f"  peak memory, 256 MiB sender {mem[0]['growth'] / 2**20:6.0f} MiB + receiver "
                f"{mem[1]['growth'] / 2**20:6.0f} MiB = {growth:4.2f}x the array (target < 2.5)"
            )


if __name__ == "__main__":
    main()
