"""The failure scenarios of DESIGN.md section 8, measured: what every peer saw and when.

For each scenario and channel, a group of peers in this process (tcp through
an in-process rendezvous server, redis and s3 through a private redis-server
and moto server) runs the failing call; the table gives each peer's outcome
(the value, or the error's type), the seconds until the last peer returned
or raised, and what the run left in storage after every peer closed.

    python benchmarks/failures.py            # every scenario, P = 4
    python benchmarks/failures.py --peers 3

Not a test: it prints what it saw, right or wrong, and exits 0; the tests
(tests/test_failures.py, test_jobs.py, test_cancellation.py, ...) assert.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import redis_and_moto

import fmi_async as fmi
from fmi_async.holepunch.server import RendezvousServer

DEADLINE = 20.0
Group = list[fmi.Communicator]


class Env:
    """Where each channel's peers meet."""

    def __init__(self, redis: tuple[str, int], moto: str, rendezvous: tuple[str, int]) -> None:
        self.redis, self.moto, self.rendezvous = redis, moto, rendezvous
        self.bucket = f"fmi-failures-{uuid.uuid4().hex[:8]}"

    def config(self, channel: str) -> dict[str, Any]:
        host, port = self.rendezvous
        backends: dict[str, Any] = {
            "tcp": {"TCP": {"host": host, "port": port}},
            "redis": {"Redis": {"host": self.redis[0], "port": self.redis[1]}},
            "s3": {
                "S3": {
                    "bucket_name": self.bucket,
                    "s3_region": "us-east-1",
                    "endpoint_url": self.moto,
                    "create_bucket": True,
                    "backoff_initial": 0.005,
                    "backoff_max": 0.05,
                }
            },
        }[channel]
        return {"backends": backends, "security": {"secret": "failures"}, "timeout": DEADLINE}


@contextlib.asynccontextmanager
async def group(
    env: Env | None, channel: str, n: int, name: str | None = None, run_id: str | None = None
) -> AsyncIterator[Group]:
    if channel == "memory":
        async with fmi.local_peers(n, timeout=DEADLINE) as comms:
            yield comms
        return
    assert env is not None
    run = run_id or uuid.uuid4().hex[:12]
    name = name or f"f-{uuid.uuid4().hex[:8]}"
    comms = [fmi.Communicator(i, n, env.config(channel), name, run_id=run) for i in range(n)]
    await asyncio.gather(*(c.open() for c in comms))
    try:
        yield comms
    finally:
        await asyncio.gather(*(c.close(synchronize=False) for c in comms), return_exceptions=True)


def outcome(result: Any) -> str:
    if isinstance(result, BaseException):
        return type(result).__name__
    if isinstance(result, np.ndarray):
        return f"array[{result.size}]"
    return repr(result)


def summary(results: list[Any]) -> str:
    counts = Counter(outcome(r) for r in results)
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


async def timed(
    comms: Group, call: Callable[[fmi.Communicator], Awaitable[Any]]
) -> tuple[list[Any], float]:
    start = time.perf_counter()
    results = await asyncio.gather(*(call(c) for c in comms), return_exceptions=True)
    return results, time.perf_counter() - start


async def keys_left(env: Env | None, channel: str, comm_name: str) -> str:
    """What a run left in storage after every peer closed."""
    if env is None or channel not in ("redis", "s3"):
        return "-"
    if channel == "redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis(host=env.redis[0], port=env.redis[1])
        try:
            names = [k async for k in client.scan_iter(match=f"fmi/{comm_name}/*")]
            ttls = [await client.ttl(k) for k in names]
        finally:
            await client.aclose()
        longest = max(ttls, default=0)
        return f"{len(names)} keys" + (f" (TTL <= {longest} s)" if names else "")
    import aioboto3

    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=env.moto, region_name="us-east-1") as s3:
        found = await s3.list_objects_v2(Bucket=env.bucket, Prefix=f"fmi/{comm_name}/")
    return f"{found.get('KeyCount', 0)} objects"


# ---------------------------------------------------------------- scenarios


async def collective_scenario(
    env: Env | None,
    channel: str,
    n: int,
    call: Callable[[fmi.Communicator], Awaitable[Any]],
) -> tuple[str, float, str]:
    name = f"f-{uuid.uuid4().hex[:8]}"
    async with group(env, channel, n, name) as comms:
        results, took = await timed(comms, call)
        # still in step afterwards?
        after, _ = await timed(comms, lambda c: c.allreduce(1))
        ok = all(r == n for r in after)
    left = await keys_left(env, channel, name)
    return f"{summary(results)}; next allreduce {'right' if ok else 'WRONG'}", took, left


async def two_jobs(env: Env, channel: str, n: int) -> tuple[str, float, str]:
    name = f"f-{uuid.uuid4().hex[:8]}"

    async def job(base: int) -> list[Any]:
        comms = [fmi.Communicator(i, n, env.config(channel), name) for i in range(n)]

        async def one(c: fmi.Communicator) -> Any:
            async with c:
                return await c.allreduce(base + c.rank)

        return await asyncio.gather(*(one(c) for c in comms), return_exceptions=True)

    start = time.perf_counter()
    a, b = await asyncio.gather(job(1000), job(2000))
    took = time.perf_counter() - start
    want = {1000: sum(1000 + r for r in range(n)), 2000: sum(2000 + r for r in range(n))}
    wrong = sum(
        1
        for base, rs in ((1000, a), (2000, b))
        for r in rs
        if isinstance(r, int) and r != want[base]
    )
    text = f"job A: {summary(a)}; job B: {summary(b)}; wrong sums {wrong}"
    return text, took, await keys_left(env, channel, name)


async def lost_receives(env: Env | None, channel: str, rounds: int) -> tuple[str, float, str]:
    rng = random.Random(1)
    name = f"f-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    async with group(env, channel, 2, name) as (a, b):
        got, cancelled = [], 0
        for i in range(rounds):
            waiter = asyncio.ensure_future(b.recv(0, tag=1))
            await a.send(i, 1, tag=1)
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            waiter.cancel()
            try:
                got.append(await waiter)
            except asyncio.CancelledError:
                cancelled += 1
                with contextlib.suppress(fmi.CommTimeout):
                    got.append(await b.recv(0, tag=1, timeout=2))
        lost = rounds - len(got)
    took = time.perf_counter() - start
    text = f"{cancelled} of {rounds} receives cancelled, {lost} messages lost"
    return text, took, await keys_left(env, channel, name)


async def abandoned(n: int) -> tuple[str, float, str]:
    big = 1 << 20
    async with fmi.local_peers(n, timeout=DEADLINE) as comms:
        start = time.perf_counter()
        with contextlib.suppress(fmi.CommTimeout):
            await comms[0].allreduce(np.ones(big), timeout=0.2)
        late, _ = await timed(comms[1:], lambda c: c.allreduce(np.ones(big)))
        took = time.perf_counter() - start
        await asyncio.sleep(0)
        queued = sum(c._mailbox.pending() for c in comms)
        dropped = sum(c._mailbox.dropped for c in comms)
    text = f"others: {summary(late)}; {queued} messages queued after, {dropped} dropped"
    return text, took, "-"


async def bad_timeouts() -> tuple[str, float, str]:
    seen = []
    async with fmi.local_peers(2) as (a, _):
        for bad in (math.nan, math.inf, "5", -1):
            try:
                await a.recv(1, timeout=bad)
            except BaseException as exc:
                seen.append(f"{bad!r}: {type(exc).__name__}")
    return "; ".join(seen), 0.0, "-"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    args = parser.parse_args()
    n = args.peers
    with tempfile.TemporaryDirectory() as tmp, redis_and_moto(Path(tmp)) as (redis, moto):
        server = RendezvousServer(secret=b"failures")
        await server.start("127.0.0.1", 0)
        env = Env(redis, moto, server.address[:2])
        channels = ["memory", "tcp", "redis", "s3"]
        rows: list[tuple[str, str, str, float, str]] = []

        def bad_root(c: fmi.Communicator) -> Awaitable[Any]:
            return c.bcast(1, root=-1 if c.rank == 1 else 0)

        def operator(c: fmi.Communicator) -> Awaitable[Any]:
            return c.allreduce(c.rank + 1, op="MAX" if c.rank == n - 1 else "SUM")

        def shape(c: fmi.Communicator) -> Awaitable[Any]:
            return c.allreduce(np.zeros(3 if c.rank == 1 else 4))

        def algorithm(c: fmi.Communicator) -> Awaitable[Any]:
            return c.allreduce(np.ones(8), algorithm="linear" if c.rank else "recursive_doubling")

        def cancelled(c: fmi.Communicator) -> Awaitable[Any]:
            async def run() -> Any:
                task = asyncio.ensure_future(c.allreduce(np.ones(1000)))
                if c.rank == 0:
                    await asyncio.sleep(0)
                    task.cancel()
                return await task

            return run()

        scenarios: list[tuple[str, Callable[[fmi.Communicator], Awaitable[Any]]]] = [
            ("root=-1 on peer 1 (bcast)", bad_root),
            ("MAX on one peer, SUM on the others", operator),
            ("shape [3] on peer 1, [4] elsewhere", shape),
            ("linear on peers 1.., recursive doubling on 0", algorithm),
            ("peer 0 cancels its allreduce", cancelled),
        ]
        for title, call in scenarios:
            for ch in channels:
                text, took, left = await collective_scenario(env, ch, n, call)
                rows.append((title, ch, text, took, left))
                print(f"{title} [{ch}]: {text} in {took:.2f}s; left {left}", flush=True)
        for ch in ("tcp", "redis", "s3"):
            text, took, left = await two_jobs(env, ch, n)
            rows.append(("two jobs, same name, no run id, started together", ch, text, took, left))
            print(f"two jobs [{ch}]: {text} in {took:.2f}s; left {left}", flush=True)
        for ch, rounds in (("memory", 300), ("tcp", 200), ("redis", 100)):
            text, took, left = await lost_receives(env, ch, rounds)
            rows.append(("recv cancelled as its message arrives", ch, text, took, left))
            print(f"lost receives [{ch}]: {text}", flush=True)
        text, took, left = await abandoned(n)
        rows.append(
            ("8 MiB allreduce abandoned by a timeout on peer 0", "memory", text, took, left)
        )
        text, took, left = await bad_timeouts()
        rows.append(("timeout nan / inf / '5' / -1", "memory", text, took, left))
        await server.close()

    print("\n| scenario | channel | what the peers saw | s until all returned | left |")
    print("|---|---|---|---|---|")
    for title, ch, text, took, left in rows:
        print(f"| {title} | {ch} | {text} | {took:.2f} | {left} |")


if __name__ == "__main__":
    asyncio.run(main())
