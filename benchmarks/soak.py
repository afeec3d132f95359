"""Soak: many collectives between peer processes, with faults injected, checked every time.

    python benchmarks/soak.py --channel tcp   --peers 8 --small 2000 --large 24
    python benchmarks/soak.py --channel redis --peers 8 --small 2000 --large 24

``--peers`` processes (default 8) run ``--small`` collectives of 8-byte values
and then ``--large`` collectives of 8 MiB float64 arrays, cycling through
allreduce, bcast (rotating root), allgather and reduce_scatter.  Every peer
checks every result against a reference it computes by formula from the
values every peer contributes (never by asking the library), and counts a
wrong result, which must never happen, apart from an error.

Faults:

* ``tcp``: peers find each other through a rendezvous server in this process.
  Now and then (``--cancel-rate`` of the collectives, the same draw on every
  peer from ``--seed``) one peer runs its collective under a short
  ``asyncio.timeout``, so it is cancelled part-way through.  The other peers
  must get the right answer or an ``FMIError`` (the abort), and the next
  collective must be right on every peer again.
* ``redis``: every peer talks to a private redis-server through
  ``tests/faultproxy.py``, which this process drives on a random schedule
  (``--fault-interval`` seconds apart on average): every connection reset at
  once, the server "restarting" (every connection refused for up to a
  second), requests delayed, a request's connection reset, a reply dropped
  after the server acted, a reply cut short.  The channel retries inside the
  deadline, so ideally nothing fails.  ``--cancel-rate`` works here too.

Printed at the end: each peer's RSS at start (communicator open), after the
small collectives and at the end (before close), and its peak; collectives
completed; errors by type; wrong results; after every injected fault whether
the next collective was right on every peer; keys left in Redis after every
peer closed; wall time; median and p90 time per collective and size.

Everything runs on loopback: the servers this script starts, and the peers.
Pass ``--small 200 --large 8`` for a run of a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fmi_async and tests.faultproxy from this checkout

import fmi_async as fmi  # noqa: E402

OPS = ("allreduce", "bcast", "allgather", "reduce_scatter")
LARGE_ELEMENTS = 1 << 20  # float64: 8 MiB
PAGE = os.sysconf("SC_PAGE_SIZE")
RESULT_LIMIT = 1 << 28
"""Longest line a peer prints: its result carries every collective's time."""
GIVE_UP = 20
"""A peer stops after this many failed collectives in a row (the job is not recovering)."""


# ---------------------------------------------------------------- what every peer contributes


def base(n: int) -> np.ndarray:
    """Small integers as float64, so every sum below is exact."""
    return (np.arange(n) % 251).astype(np.float64)


def elements(op: str, large: bool, peers: int) -> int:
    """Elements of each peer's value: 8 bytes (reduce_scatter: 8 bytes per part), or 8 MiB."""
    if large:
        return LARGE_ELEMENTS
    return peers if op == "reduce_scatter" else 1


def contribution(op: str, k: int, rank: int, n: int, peers: int) -> np.ndarray | None:
    """Peer ``rank``'s value in collective ``k``."""
    if op == "bcast":
        root = k % peers
        return base(n) + root * 7 + k if rank == root else None
    if op == "allgather":
        return base(n) + rank * 7 + k
    return base(n) + rank + k  # allreduce, reduce_scatter


def reference(op: str, k: int, rank: int, n: int, peers: int) -> Any:
    """What peer ``rank`` must get from collective ``k``, by formula."""
    if op == "bcast":
        return base(n) + (k % peers) * 7 + k
    if op == "allgather":
        return [base(n) + j * 7 + k for j in range(peers)]
    total = peers * base(n) + peers * (peers - 1) / 2 + peers * k
    if op == "allreduce":
        return total
    return np.array_split(total, peers)[rank]


def matches(got: Any, want: Any) -> bool:
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(matches(g, w) for g, w in zip(got, want, strict=True))
        )
    return (
        isinstance(got, np.ndarray)
        and got.shape == want.shape
        and got.dtype == want.dtype
        and bool(np.array_equal(got, want))
    )


def call(comm: fmi.Communicator, op: str, k: int, value: np.ndarray | None) -> Awaitable[Any]:
    if op == "bcast":
        return comm.bcast(value, root=k % comm.size)
    if op == "allgather":
        return comm.allgather(value)
    if op == "reduce_scatter":
        return comm.reduce_scatter(value)
    return comm.allreduce(value)


def schedule(
    seed: int, count: int, peers: int, rate: float, large: bool
) -> dict[int, tuple[int, float]]:
    """Collective index -> (peer that cancels, seconds after which it cancels); the same on
    every peer.  Delays span a small collective's time (or a large one's)."""
    rng = random.Random(f"{seed}/{'large' if large else 'small'}")
    longest = 0.3 if large else 0.004
    plan: dict[int, tuple[int, float]] = {}
    for k in range(count):
        if rng.random() < rate:
            plan[k] = (rng.randrange(peers), rng.uniform(0.0, longest))
    return plan


def rss() -> int:
    """Resident set size now, in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------- one peer


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def peer_main(spec: dict[str, Any]) -> int:
    rank, peers, seed = spec["rank"], spec["peers"], spec["seed"]
    comm = fmi.Communicator(
        rank, peers, spec["config"], comm_name=spec["comm"], run_id=spec["run_id"]
    )
    errors: Counter[str] = Counter()
    error_at: list[tuple[int, str]] = []  # (collective index, error type)
    cancelled: list[int] = []  # injected here, and the collective did get cancelled
    wrong: list[tuple[int, str]] = []
    messages: dict[str, str] = {}  # the first message of each error type
    seconds: dict[str, list[float]] = {}
    completed = 0
    memory: dict[str, int] = {}
    try:
        await comm.open()
    except fmi.FMIError as exc:
        emit(event="open_error", rank=rank, error=f"{type(exc).__name__}: {exc}")
        return 2
    emit(event="ready", rank=rank)
    gc.collect()
    memory["start"] = rss()
    streak = 0  # errors in a row: a job that cannot recover stops after GIVE_UP of them
    started = time.perf_counter()
    index = 0  # over the whole run: small then large
    for large, count in ((False, spec["small"]), (True, spec["large"])):
        cancels = schedule(seed, count, peers, spec["cancel_rate"], large)
        for j in range(count):
            k, op = index, OPS[j % len(OPS)]
            index += 1
            if j == count // 2:  # halfway: growth from here to the end is per collective
                gc.collect()
                memory["mid_large" if large else "mid_small"] = rss()
            n = elements(op, large, peers)
            value = contribution(op, k, rank, n, peers)
            victim, delay = cancels.get(j, (-1, 0.0))
            t0 = time.perf_counter()
            failure: fmi.FMIError | None = None
            try:
                if victim == rank:
                    async with asyncio.timeout(delay):
                        got = await call(comm, op, k, value)
                else:
                    got = await call(comm, op, k, value)
            except TimeoutError as exc:
                if not isinstance(exc, fmi.FMIError):  # our own timeout; a CommTimeout is not
                    cancelled.append(k)
                    continue
                failure = exc
            except fmi.FMIError as exc:
                failure = exc
            if failure is not None:
                name = type(failure).__name__
                errors[name] += 1
                error_at.append((k, name))
                messages.setdefault(name, f"{op} #{k}: {failure}"[:500])
                streak += 1
                if streak >= GIVE_UP:
                    emit(event="gave_up", rank=rank, index=k, error=str(failure)[:300])
                    break
                continue
            streak = 0
            elapsed = time.perf_counter() - t0
            if matches(got, reference(op, k, rank, n, peers)):
                completed += 1
                seconds.setdefault(f"{op}/{'8MiB' if large else '8B'}", []).append(elapsed)
            else:
                wrong.append((k, op))
            if k % 250 == 0:
                emit(event="progress", rank=rank, index=k, completed=completed)
        if streak >= GIVE_UP:
            break
        gc.collect()
        memory["after_large" if large else "after_small"] = rss()
    wall = time.perf_counter() - started
    mailbox = getattr(comm, "_mailbox", None)  # diagnostics: what stale messages remain
    pending = mailbox.pending() if mailbox is not None else -1
    close_error = ""
    try:
        await comm.close()
    except fmi.FMIError as exc:
        close_error = f"{type(exc).__name__}: {exc}"
    emit(
        event="result",
        rank=rank,
        total=index,
        completed=completed,
        errors=dict(errors),
        error_at=error_at,
        messages=messages,
        cancelled=cancelled,
        wrong=wrong,
        seconds=seconds,
        wall=wall,
        rss=memory,
        peak=peak_rss(),
        mailbox_pending=pending,
        close_error=close_error,
    )
    return 1 if wrong else 0


# ---------------------------------------------------------------- the servers and faults


async def redis_faults(proxy: Any, rng: random.Random, mean: float, log: list[str]) -> None:
    """Until cancelled: a fault every ``mean`` seconds on average (exponential gaps)."""
    from tests.faultproxy import Rule

    while True:
        await asyncio.sleep(rng.expovariate(1.0 / mean))
        kind = rng.choice(("blip", "restart", "delay", "reset", "drop_reply", "truncate"))
        if kind == "blip":
            proxy.reset_all()
        elif kind == "restart":
            proxy.down()
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            proxy.up()
        elif kind == "delay":
            proxy.add(
                Rule("delay", pattern=b"", times=rng.randint(5, 30), seconds=rng.uniform(0.02, 0.3))
            )
        elif kind == "reset":
            proxy.add(Rule("reset", pattern=b"", times=1))
        elif kind == "drop_reply":
            proxy.add(Rule("drop_reply", pattern=b"", times=1))
        else:
            proxy.add(Rule("truncate", pattern=b"", times=1, keep=rng.randint(0, 16)))
        log.append(kind)


# ---------------------------------------------------------------- the coordinator


def log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the child keeps its own descriptor


def spawn_argv(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--peer-spec", json.dumps(spec)]


async def run_peers(
    args: argparse.Namespace,
    config: dict[str, Any],
    run_id: str,
    workdir: Path,
    faults: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[dict[str, Any]], float, list[str]]:
    """Start the peers, run ``faults`` once every peer is open, wait (bounded by
    --max-seconds; a peer that dies without a result stops the job) and collect results."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs: list[asyncio.subprocess.Process] = []
    results: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    progress: dict[int, int] = {}
    ready: set[int] = set()
    injector: asyncio.Future[None] | None = None

    async def read(rank: int, proc: asyncio.subprocess.Process) -> None:
        nonlocal injector
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "result":
                results[rank] = event
            elif kind == "progress":
                progress[rank] = event["index"]
            elif kind == "ready":
                ready.add(rank)
                if len(ready) == args.peers and faults is not None:
                    injector = asyncio.ensure_future(faults())
            elif kind in ("open_error", "gave_up"):
                problems.append(f"peer {rank}: {kind}: {event.get('error')}")

    started = time.perf_counter()
    readers = []
    for rank in range(args.peers):
        spec = {
            "rank": rank,
            "peers": args.peers,
            "seed": args.seed,
            "config": config,
            "comm": "soak",
            "run_id": run_id,
            "small": args.small,
            "large": args.large,
            "cancel_rate": args.cancel_rate,
        }
        with log_file(workdir / f"peer{rank}.err") as err:
            proc = await asyncio.create_subprocess_exec(
                *spawn_argv(spec),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                limit=RESULT_LIMIT,
            )
        procs.append(proc)
        readers.append(asyncio.ensure_future(read(rank, proc)))

    async def report() -> None:
        while True:
            await asyncio.sleep(15)
            done = min(progress.values(), default=0)
            print(
                f"  ... {time.perf_counter() - started:.0f}s: every peer past collective {done}",
                flush=True,
            )

    reporter = asyncio.ensure_future(report())
    waits = {asyncio.ensure_future(proc.wait()): rank for rank, proc in enumerate(procs)}
    try:
        async with asyncio.timeout(args.max_seconds):
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0.5)  # let the reader take the last line
                for finished in done:
                    rank = waits[finished]
                    if rank not in results and pending:
                        problems.append(f"peer {rank} died without a result: job stopped")
                        pending = set()  # the others are killed below
            await asyncio.wait(readers, timeout=10)
    except TimeoutError:
        problems.append(f"peers still running after {args.max_seconds}s: killed (a hang)")
    finally:
        reporter.cancel()
        if injector is not None:
            injector.cancel()
            await asyncio.gather(injector, return_exceptions=True)
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*waits, *readers, return_exceptions=True)
    wall = time.perf_counter() - started
    for rank, proc in enumerate(procs):
        log = (workdir / f"peer{rank}.err").read_text(errors="replace")
        unretrieved = log.count("Task exception was never retrieved")
        if unretrieved:
            problems.append(f"peer {rank}: {unretrieved} 'Task exception was never retrieved'")
        if rank not in results:
            problems.append(
                f"peer {rank} exited {proc.returncode} without a result:\n{log[-2000:]}"
            )
    return [results[r] for r in sorted(results)], wall, problems


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def summarize(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    wall: float,
    faults: list[str],
    problems: list[str],
    keys: dict[str, Any] | None,
) -> dict[str, Any]:
    print()
    print(
        f"soak: channel {args.channel}, {args.peers} peers, {args.small} small (8 B) and "
        f"{args.large} large (8 MiB) collectives, seed {args.seed}, cancel rate {args.cancel_rate}"
    )
    print(
        f"{'peer':>4} {'RSS start':>10} {'mid small':>10} {'after small':>12} {'mid large':>10} "
        f"{'end':>8} {'peak':>8} "
        f"{'completed':>10} {'errors':>7} {'cancelled':>10} {'wrong':>6} {'pending':>8}"
    )
    for r in results:
        m = r["rss"]
        print(
            f"{r['rank']:>4} {mib(m.get('start', 0)):>10} {mib(m.get('mid_small', 0)):>10} "
            f"{mib(m.get('after_small', 0)):>12} {mib(m.get('mid_large', 0)):>10} "
            f"{mib(m.get('after_large', 0)):>8} {mib(r['peak']):>8} {r['completed']:>10} "
            f"{sum(r['errors'].values()):>7} {len(r['cancelled']):>10} {len(r['wrong']):>6} "
            f"{r['mailbox_pending']:>8}"
        )
    print("(RSS in MiB; pending: messages left in the peer's mailbox before close)")
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    wrong = sum(len(r["wrong"]) for r in results)
    completed = sum(r["completed"] for r in results)
    total = sum(r["total"] for r in results)
    cancelled = sorted({k for r in results for k in r["cancelled"]})
    injected = injected_indices(args)
    failed_at = {k for r in results for k, _ in r["error_at"]}
    wrong_at = {k for r in results for k, _ in r["wrong"]}
    troubled = sorted(set(cancelled) | failed_at | wrong_at)
    # After a cancelled or failed collective the next one must be right on every
    # peer again, unless a cancel was injected into that one too.
    next_bad = [k for k in troubled if k + 1 in failed_at | wrong_at and k + 1 not in injected]
    stray = sorted(failed_at - injected)
    print(f"collectives completed right: {completed} of {total} (all peers)")
    print(f"errors by type: {dict(errors) or 'none'}")
    firsts: dict[str, str] = {}
    for r in results:
        for name, text in r.get("messages", {}).items():
            firsts.setdefault(name, f"peer {r['rank']}, {text}")
    for name, text in sorted(firsts.items()):
        print(f"  first {name}: {text}")
    print(f"wrong results: {wrong}")
    print(
        f"cancels injected: {len(injected)} collectives, of which {len(cancelled)} were "
        f"cancelled before they finished on the cancelling peer"
    )
    print(
        f"collectives with an error on some peer: {len(failed_at)}, of which without an "
        f"injected cancel: {len(stray)} {stray[:10]}"
    )
    print(
        f"collectives with an error or a cancel: {len(troubled)}; followed by a collective "
        f"(not itself cancelled) that was not right on every peer: {len(next_bad)} {next_bad[:10]}"
    )
    if faults:
        print(f"proxy faults injected: {len(faults)} {dict(Counter(faults))}")
    closes = [f"peer {r['rank']}: {r['close_error']}" for r in results if r["close_error"]]
    print(f"close errors: {closes or 'none'}")
    if keys is not None:
        print(
            f"keys left in Redis after close: {keys['run']} under the run's prefix "
            f"({keys['no_ttl']} without a TTL), {keys['dbsize']} in the database"
        )
    loops = statistics.median(r["wall"] for r in results) if results else 0.0
    print(f"wall time: {wall:.1f} s (peer loops: median {loops:.1f} s)")
    pooled: dict[str, list[float]] = {}
    for r in results:
        for name, samples in r["seconds"].items():
            pooled.setdefault(name, []).extend(samples)
    print("time per collective, all peers pooled:")
    for name in sorted(pooled, key=lambda s: (s.endswith("MiB"), s)):
        samples = sorted(pooled[name])
        p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
        median = statistics.median(samples)
        times = f"median {median * 1e3:9.2f} ms   p90 {p90 * 1e3:9.2f} ms"
        print(f"  {name:<20} {times}   n={len(samples)}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return {
        "completed": completed,
        "total": total,
        "errors": dict(errors),
        "wrong": wrong,
        "next_bad": next_bad,
        "stray_errors": stray,
        "keys": keys,
        "wall": wall,
        "problems": problems,
    }


def injected_indices(args: argparse.Namespace) -> set[int]:
    """The collectives into which a cancel was injected: the schedule every peer draws."""
    small = schedule(args.seed, args.small, args.peers, args.cancel_rate, False)
    large = schedule(args.seed, args.large, args.peers, args.cancel_rate, True)
    return set(small) | {args.small + j for j in large}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1))


async def coordinate(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:12]
    faults: list[str] = []
    keys: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fmi-soak-") as tmp:
        workdir = Path(tmp)
        if args.channel == "tcp":
            from fmi_async.holepunch.server import RendezvousServer

            secret = secrets.token_hex(16)
            server = RendezvousServer(secret=secret.encode())
            await server.start("127.0.0.1", 0)
            try:
                host, port = server.address
                config = {
                    "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
                    "security": {"secret": secret},
                    "timeout": args.timeout,
                }
                results, wall, problems = await run_peers(args, config, run_id, workdir)
            finally:
                await server.close()
        else:
            results, wall, problems, faults, keys = await redis_run(args, run_id, workdir)
    summary = summarize(args, results, wall, faults, problems, keys)
    if args.json:
        write_json(Path(args.json), {"args": vars(args), **summary})
    bad = summary["wrong"] or problems or (keys is not None and keys["no_ttl"])
    return 1 if bad else 0


async def redis_run(
    args: argparse.Namespace, run_id: str, workdir: Path
) -> tuple[list[dict[str, Any]], float, list[str], list[str], dict[str, Any]]:
    import redis.asyncio as aioredis

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from servers import redis_argv, server_process

    from tests.faultproxy import FaultProxy

    with server_process(
        "redis-server", redis_argv(workdir), b"PING\r\n", b"+PONG", workdir
    ) as port:
        async with FaultProxy("127.0.0.1", port) as proxy:
            host, proxy_port = proxy.address
            config = {
                "backends": {"Redis": {"enabled": True, "host": host, "port": proxy_port}},
                "timeout": args.timeout,
            }
            faults: list[str] = []

            async def inject() -> None:
                try:
                    await redis_faults(proxy, random.Random(args.seed), args.fault_interval, faults)
                finally:
                    proxy.up()  # never leave the server "down" for the final close

            try:
                results, wall, problems = await run_peers(
                    args, config, run_id, workdir, inject if args.fault_interval > 0 else None
                )
            finally:
                proxy.up()
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            names = [k async for k in client.scan_iter(match=f"fmi/soak/{run_id}*")]
            ttls = [await client.ttl(k) for k in names]
            keys = {
                "run": len(names),
                "no_ttl": sum(1 for t in ttls if t < 0),
                "dbsize": await client.dbsize(),
                "sample": [k.decode() for k in names[:10]],
            }
        finally:
            await client.aclose()
    return results, wall, problems, faults, keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channel", choices=("tcp", "redis"), default="tcp")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--small", type=int, default=2000, help="collectives of 8 bytes")
    parser.add_argument("--large", type=int, default=24, help="collectives of 8 MiB")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--cancel-rate",
        type=float,
        default=None,
        help="share of collectives one peer cancels part-way (default 0.02 on tcp, 0 on redis)",
    )
    parser.add_argument(
        "--fault-interval",
        type=float,
        default=1.0,
        help="redis: mean seconds between proxy faults (0: none)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="the communicator timeout")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="bound on the run")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--peer-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_spec is not None:
        return asyncio.run(peer_main(json.loads(args.peer_spec)))
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.cancel_rate is None:
        args.cancel_rate = 0.02 if args.channel == "tcp" else 0.0
    return asyncio.run(coordinate(args))


if __name__ == "__main__":
    sys.exit(main())
