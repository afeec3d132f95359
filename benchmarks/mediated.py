"""Storage channels against their raw clients, on servers this script starts.

One run starts a private ``redis-server`` and a moto server (the real S3 and
DynamoDB HTTP protocols, in its own process) on free loopback ports, and
prints medians with p25/p75 over repetitions, and ratios against baselines
measured in the same run, on the same servers and the same event loop:

1. **Redis point-to-point latency**: a ``send``/``recv`` ping-pong between two
   ``fmi.Communicator`` peers whose only channel is Redis; one message is half
   a round trip.  Baseline: a raw redis-py (``redis.asyncio``) SET then GET of
   the same bytes, i.e. one write and one read, the least a message through
   storage costs.  Target <= 1.5.  A raw RPUSH/BLPOP ping-pong (the same
   mechanism as the channel, without the library) is shown as well.
2. **Blocking delivery versus polling**: the receiver starts waiting a few
   milliseconds (2-8, random) before the sender sends.  fmi ``recv`` (BLPOP)
   against an FMI-style loop (SET by the sender; GET every 1 ms until the key
   exists, then DEL).  Median latency from the start of the sender's write to
   the receiver holding the value, and Redis commands per message, counted by
   the server (``INFO commandstats``).
3. **S3 broadcast to P peers** (default 8): ``comm.bcast`` over S3 with the
   plan the planner picks (printed), against raw aioboto3 doing P sequential
   put/get pairs, and against raw aioboto3 doing what the storage-native
   bcast does (one put, P-1 concurrent gets).  The same bcast over DynamoDB is
   timed too (``--no-dynamodb`` skips it).

All peers of a measurement run as coroutines of one process on one event
loop (like the baselines), so the library's own CPU time is in the figures.

    python benchmarks/mediated.py --quick      # under a minute
    python benchmarks/mediated.py              # a few minutes
    python benchmarks/mediated.py --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import aioboto3
import redis.asyncio as aioredis
from servers import LOOPBACK, REGION, redis_and_moto  # benchmarks/servers.py

import fmi_async as fmi

KiB, MiB = 1024, 1024 * 1024
REDIS_SIZES = (8, KiB, 64 * KiB, MiB)
S3_SIZES = (KiB, MiB)
POLL_INTERVAL = 0.001  # FMI's Redis channel sleeps this long between GETs


# ---------------------------------------------------------------- statistics and output


def summary(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    p25, p50, p75 = statistics.quantiles(samples, n=4, method="inclusive")
    return p25, p50, p75


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_size(n: int) -> str:
    if n >= MiB:
        return f"{n // MiB} MiB"
    if n >= KiB:
        return f"{n // KiB} KiB"
    return f"{n} B"


def row(label: str, samples: Sequence[float], base: Sequence[float] | None = None) -> str:
    p25, p50, p75 = summary(samples)
    text = f"    {label:<34} {fmt_time(p50):>10}   [{fmt_time(p25)} .. {fmt_time(p75)}]"
    if base:
        text += f"   x{p50 / summary(base)[1]:.2f}"
    return text


async def sample(
    reps: int, iters: int, body: Callable[[], Awaitable[None]], per: int = 1
) -> list[float]:
    """``reps`` samples, after one warm-up, of ``iters`` calls of ``body``: seconds per call/per."""
    out: list[float] = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        for _ in range(iters):
            await body()
        if rep:
            out.append((time.perf_counter() - start) / iters / per)
    return out


# ---------------------------------------------------------------- 1. Redis latency


def redis_config(host: str, port: int) -> dict[str, Any]:
    return {
        "backends": {"Redis": {"enabled": True, "host": host, "port": port, "ttl": 600}},
        "timeout": 60,
    }


def pair(config: dict[str, Any], comm_name: str) -> list[fmi.Communicator]:
    run = uuid.uuid4().hex[:12]
    return [fmi.Communicator(i, 2, config, comm_name, run_id=run, timeout=60) for i in (0, 1)]


async def redis_latency(
    host: str, port: int, reps: int, iters: int
) -> dict[int, dict[str, list[float]]]:
    raw = aioredis.Redis(host=host, port=port)
    raw2 = aioredis.Redis(host=host, port=port)
    comms = pair(redis_config(host, port), "bench-p2p")
    results: dict[int, dict[str, list[float]]] = {}
    try:
        await asyncio.gather(*(c.open() for c in comms))
        for size in REDIS_SIZES:
            n = max(3, iters // (64 if size >= MiB else 8 if size >= 64 * KiB else 1))
            data = os.urandom(size)

            async def ping_pong(data: bytes = data) -> None:
                async def echo() -> None:
                    await comms[1].send(await comms[1].recv(0), 0)

                task = asyncio.ensure_future(echo())
                await comms[0].send(data, 1)
                await comms[0].recv(1)
                await task

            async def set_get(data: bytes = data) -> None:
                await raw.set("bench:raw", data)
                await raw.get("bench:raw")

            async def list_ping_pong(data: bytes = data) -> None:
                async def echo() -> None:
                    _, got = await raw2.blpop(["bench:ping"], timeout=30)  # type: ignore[misc]
                    await raw2.rpush("bench:pong", got)  # type: ignore[misc]

                task = asyncio.ensure_future(echo())
                await raw.rpush("bench:ping", data)  # type: ignore[misc]
                await raw.blpop(["bench:pong"], timeout=30)  # type: ignore[misc]
                await task

            results[size] = {
                "fmi": await sample(reps, n, ping_pong, per=2),
                "set_get": await sample(reps, n, set_get),
                "rpush_blpop": await sample(reps, n, list_ping_pong, per=2),
            }
        await raw.delete("bench:raw")
    finally:
        await asyncio.gather(*(c.close() for c in comms), return_exceptions=True)
        await raw.aclose()
        await raw2.aclose()
    return results


# ---------------------------------------------------------------- 2. blocking vs polling
#
# The receiver is its own process with its own event loop (as a real peer
# is), so its 1 ms polling timer does not share a loop with the sender.  A
# line "go" on its stdin starts one wait; it answers with the perf_counter
# time (CLOCK_MONOTONIC, the same clock in every process) at which it held
# the value.


async def receiver_main(args: argparse.Namespace) -> None:
    """The waiting side of part 2, in a child process."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    if args.receiver == "fmi":
        comm = fmi.Communicator(
            1, 2, redis_config(LOOPBACK, args.port), "bench-wait", run_id=args.run_id, timeout=60
        )
        async with comm:
            while (await stdin.readline()).strip() == b"go":
                await comm.recv(0)
                print(time.perf_counter(), flush=True)
        return
    client = aioredis.Redis(host=LOOPBACK, port=args.port)
    try:
        n = 0
        while (await stdin.readline()).strip() == b"go":
            key = f"bench:poll:{n}"
            n += 1
            for _ in range(int(30 / POLL_INTERVAL)):  # bounded: 30 s of polls
                if await client.get(key) is not None:
                    done = time.perf_counter()
                    await client.delete(key)
                    print(done, flush=True)
                    break
                await asyncio.sleep(POLL_INTERVAL)
            else:
                raise SystemExit(f"{key} never arrived")
    finally:
        await client.aclose()


async def command_counts(client: aioredis.Redis) -> dict[str, int]:
    info: dict[str, Any] = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def waiting_receiver(
    mode: str, port: int, messages: int, seed: int, loop_name: str
) -> tuple[list[float], dict[str, int]]:
    """Latencies of ``messages`` sends to a receiver already waiting, and commands issued."""
    gaps = random.Random(seed).choices(range(2000, 8001), k=messages + 1)  # microseconds
    run_id = uuid.uuid4().hex[:12]
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--receiver", mode, "--port", str(port), "--run-id", run_id,
        "--loop", loop_name, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    stats = aioredis.Redis(host=LOOPBACK, port=port)
    sender = aioredis.Redis(host=LOOPBACK, port=port)
    comm = fmi.Communicator(
        0, 2, redis_config(LOOPBACK, port), "bench-wait", run_id=run_id, timeout=60
    )
    latencies: list[float] = []
    counts: dict[str, int] = {}
    try:
        if mode == "fmi":
            await comm.open()
        else:
            await sender.ping()
        data = os.urandom(KiB)
        before: dict[str, int] = {}
        for i, gap in enumerate(gaps):  # message 0 warms up connections on both sides
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            await asyncio.sleep(gap / 1e6)
            sent_at = time.perf_counter()
            if mode == "fmi":
                await comm.send(data, 1)
            else:
                await sender.set(f"bench:poll:{i}", data, ex=600)
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            if not line:
                raise SystemExit(f"the {mode} receiver process failed")
            if i:
                latencies.append(float(line) - sent_at)
            else:
                before = await command_counts(stats)
        after = await command_counts(stats)
        counts = {k: after[k] - before.get(k, 0) for k in after if k != "info"}
        counts = {k: v for k, v in counts.items() if v}
    finally:
        child.stdin.close()
        if mode == "fmi":
            await comm.close()  # meets the receiver's close in the final barrier
        await asyncio.wait_for(child.wait(), 60)
        for client in (sender, stats):
            await client.aclose()
    return latencies, counts


# ---------------------------------------------------------------- 3. S3 (and DynamoDB) bcast


def aws_config(endpoint: str, backend: str, bucket: str) -> dict[str, Any]:
    if backend == "s3":
        options: dict[str, Any] = {
            "bucket_name": bucket,
            "s3_region": REGION,
            "create_bucket": True,
            "timeout": 2,  # FMI's first polling wait, ms
            "max_timeout": 120000,
            "backoff_max": 0.02,
        }
        name = "S3"
    else:
        options = {
            "table_name": bucket,
            "region": REGION,
            "create_table": True,
            "backoff_initial": 0.002,
            "backoff_max": 0.02,
            "ttl": 600,
        }
        name = "DynamoDB"
    options.update(enabled=True, endpoint_url=endpoint)
    return {"backends": {name: options}, "timeout": 120}


async def fmi_bcast(
    config: dict[str, Any], peers: int, sizes: Sequence[int], reps: int
) -> tuple[dict[int, list[float]], dict[str, int]]:
    run = uuid.uuid4().hex[:12]
    comms = [
        fmi.Communicator(i, peers, config, "bench-bcast", run_id=run, timeout=120)
        for i in range(peers)
    ]
    out: dict[int, list[float]] = {}
    await asyncio.gather(*(c.open() for c in comms))
    try:
        for size in sizes:
            data = os.urandom(size)

            async def once(size: int = size, data: bytes = data) -> None:
                got = await asyncio.gather(
                    *(c.bcast(data if c.rank == 0 else None, 0, nbytes=size) for c in comms)
                )
                assert all(g == data for g in got)

            out[size] = await sample(reps, 1, once)
        plans: dict[str, int] = comms[0].stats()["collectives"]
    finally:
        await asyncio.gather(*(c.close() for c in comms), return_exceptions=True)
    return out, plans


async def raw_s3(
    endpoint: str, bucket: str, peers: int, sizes: Sequence[int], reps: int
) -> dict[str, dict[int, list[float]]]:
    session = aioboto3.Session()
    out: dict[str, dict[int, list[float]]] = {"pairs": {}, "put_gets": {}}
    async with session.client("s3", endpoint_url=endpoint, region_name=REGION) as s3:
        await s3.create_bucket(Bucket=bucket)
        counter = iter(range(10**9))

        async def get(key: str) -> bytes:
            reply = await s3.get_object(Bucket=bucket, Key=key)
            async with reply["Body"] as body:
                data: bytes = await body.read()
            return data

        for size in sizes:
            data = os.urandom(size)

            async def pairs(data: bytes = data) -> None:
                for peer in range(peers):
                    key = f"raw/pair/{next(counter)}/{peer}"
                    await s3.put_object(Bucket=bucket, Key=key, Body=data)
                    assert await get(key) == data

            async def put_gets(data: bytes = data) -> None:
                key = f"raw/bcast/{next(counter)}"
                await s3.put_object(Bucket=bucket, Key=key, Body=data)
                got = await asyncio.gather(*(get(key) for _ in range(peers - 1)))
                assert all(g == data for g in got)

            out["pairs"][size] = await sample(reps, 1, pairs)
            out["put_gets"][size] = await sample(reps, 1, put_gets)
    return out


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace, redis_port: int, moto_url: str) -> None:
    reps = 7 if args.quick else 15
    iters = 200 if args.quick else 1000
    messages = 100 if args.quick else 500
    bcast_reps = 7 if args.quick else 25

    print("\n1. Redis point-to-point latency, one message (median [p25 .. p75], x baseline)")
    print(
        "   fmi: Communicator.send/recv ping-pong over the Redis channel, half a round trip;"
        "\n   baseline: raw redis-py SET then GET of the same bytes, same server and loop"
    )
    lat = await redis_latency(LOOPBACK, redis_port, reps, iters)
    for size, res in lat.items():
        print(f"  {fmt_size(size)}")
        print(row("raw SET + GET (baseline)", res["set_get"]))
        print(row("raw RPUSH/BLPOP ping-pong, half", res["rpush_blpop"], res["set_get"]))
        fmi_row = row("fmi send/recv ping-pong, half", res["fmi"], res["set_get"])
        print(fmi_row + "  (target <= 1.5)")

    print(
        f"\n2. A waiting receiver (its own process), 1 KiB, {messages} messages; it waits "
        "2-8 ms before\n   the send.  Latency: start of the sender's write to the receiver "
        "holding the value"
    )
    polled = await waiting_receiver("poll", redis_port, messages, args.seed, args.loop)
    blocked = await waiting_receiver("fmi", redis_port, messages, args.seed, args.loop)
    for label, (latencies, counts) in (
        ("polling: SET; GET every 1 ms; DEL", polled),
        ("fmi send / recv (BLPOP)", blocked),
    ):
        per = sum(counts.values()) / messages
        detail = ", ".join(f"{k} {v / messages:.1f}" for k, v in sorted(counts.items()))
        print(row(label, latencies, None if label.startswith("polling") else polled[0]))
        print(f"      {per:.1f} commands run by Redis per message: {detail}")
    print("      (INFO commandstats also counts the RPUSH and EXPIRE an EVALSHA runs)")

    print(
        f"\n3. bcast to {args.peers} peers through the moto server (median [p25 .. p75], "
        "x baseline)"
    )
    tag = uuid.uuid4().hex[:10]
    s3_times, s3_plans = await fmi_bcast(
        aws_config(moto_url, "s3", f"fmi-bench-{tag}"), args.peers, S3_SIZES, bcast_reps
    )
    raw = await raw_s3(moto_url, f"fmi-bench-raw-{tag}", args.peers, S3_SIZES, bcast_reps)
    ddb: dict[int, list[float]] = {}
    ddb_plans: dict[str, int] = {}
    if not args.no_dynamodb:
        ddb, ddb_plans = await fmi_bcast(
            aws_config(moto_url, "dynamodb", f"fmi-bench-{tag}"), args.peers, S3_SIZES, bcast_reps
        )
    for size in S3_SIZES:
        print(f"  {fmt_size(size)}")
        pairs = raw["pairs"][size]
        print(row(f"raw S3: {args.peers} sequential put+get pairs", pairs))
        print(row(f"raw S3: 1 put, {args.peers - 1} concurrent gets", raw["put_gets"][size], pairs))
        print(row("fmi bcast over S3", s3_times[size], pairs))
        if ddb:
            print(row("fmi bcast over DynamoDB", ddb[size], pairs))
    print(f"  plans chosen: S3 {s3_plans}" + (f", DynamoDB {ddb_plans}" if ddb_plans else ""))


def run_loop(name: str, coro: Coroutine[Any, Any, None]) -> None:
    if name == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions (under a minute)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--peers", type=int, default=8, help="peers of the bcast (default 8)")
    parser.add_argument("--no-dynamodb", action="store_true", help="skip the DynamoDB bcast")
    parser.add_argument("--seed", type=int, default=1, help="seed of the waiting times")
    parser.add_argument("--receiver", choices=("fmi", "poll"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peers < 2:
        parser.error("--peers must be at least 2")
    if args.receiver:
        run_loop(args.loop, receiver_main(args))
        return
    # The moto server logs every request; the library's debug logs are not wanted either.
    logging.basicConfig(level=logging.WARNING)

    from redis.utils import HIREDIS_AVAILABLE

    with tempfile.TemporaryDirectory(prefix="fmi-bench-") as tmp:
        workdir = Path(tmp)
        with redis_and_moto(workdir) as ((_, redis_port), moto_url):
            print(
                f"fmi-async storage benchmark ({'quick' if args.quick else 'full'}): event loop "
                f"{args.loop}, python {sys.version.split()[0]}, {os.cpu_count()} cores, "
                f"hiredis {'on' if HIREDIS_AVAILABLE else 'off'}; redis-server and moto server "
                "on loopback, every peer in this process"
            )
            coro = run(args, redis_port, moto_url)
            start = time.perf_counter()
            run_loop(args.loop, coro)
            print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
