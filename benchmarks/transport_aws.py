"""DynamoDB jobs under throttling: the retry strategies against the unthrottled job.

A small throttling proxy (``tests/throttleproxy.py``, a process of its own)
stands in front of a moto server (the real AWS HTTP protocol, a process of
its own) and answers a share of the DynamoDB requests with HTTP 400
``ProvisionedThroughputExceededException``, as DynamoDB does, keeping the
connection; everything else it forwards.  moto has no fault injection of its
own for this (its server answers every request it can).

One *job* is what a serverless job does with the channel: ``--peers``
communicators (one event loop, this process) open (table checks, the job
lease), run ``--rounds`` rounds of an allreduce of 16 floats, a bcast of
1 KB and a ring of sends, a barrier, and close.  Each strategy runs the job
``--repeat`` times through a proxy that throttles nothing and through one
that throttles ``--rate`` of the requests (10 %), alternately; the ratio is
the medians' (issue 16's target: <= 2x), and the time lost is their
difference, also per throttled request.

Strategies (the DynamoDB options that select them):

* ``fmi``            the channel retries (``retry_mode: fmi``, the default):
                     :class:`~fmi_async.channels.backoff.RetryPolicy`, equal
                     jitter from 20 ms doubling to 1 s, until the deadline;
* ``fmi 5ms..0.25s`` the same, ``retry_initial 0.005, retry_max 0.25``;
* ``fmi 100ms..2s``  the same, ``retry_initial 0.1, retry_max 2``;
* ``standard``       botocore's standard mode (3 attempts, full jitter of
                     up to 2^n s, a retry quota), then the channel;
* ``adaptive``       botocore's adaptive mode (the standard one plus a
                     client-side token bucket that slows sending after a
                     throttle), then the channel.

    python benchmarks/transport_aws.py [--repeat 3] [--rate 0.1] [--strategies fmi,adaptive]

``run(args)`` returns the rows, for ``benchmarks/transport.py``.  The
machine is shared: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fmi_async and tests.throttleproxy from this checkout

import fmi_async as fmi  # noqa: E402
from benchmarks.servers import (  # noqa: E402
    LOOPBACK,
    REGION,
    dummy_aws_environment,
    moto_argv,
    server_process,
)

logger = logging.getLogger(__name__)

STRATEGIES: dict[str, dict[str, Any]] = {
    "fmi": {},
    "fmi 5ms..0.25s": {"retry_initial": 0.005, "retry_max": 0.25},
    "fmi 100ms..2s": {"retry_initial": 0.1, "retry_max": 2.0},
    "standard": {"retry_mode": "standard"},
    "adaptive": {"retry_mode": "adaptive"},
}
TARGET = 2.0  # throttled / unthrottled, at most


@contextlib.contextmanager
def throttle_proxy(moto_port: int, rate: float, seed: int) -> Iterator[tuple[str, dict[str, int]]]:
    """A throttling proxy process in front of moto: ``(its URL, its counts)`` (filled at exit)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.throttleproxy",
            LOOPBACK,
            str(moto_port),
            str(rate),
            str(seed),
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    counts: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"the throttling proxy did not start: {line!r}")
        yield f"http://{LOOPBACK}:{line}", counts
    finally:
        _, err = proc.communicate(timeout=30)  # closes its stdin: it prints its counts, exits
        for text in err.decode().splitlines()[::-1]:
            with contextlib.suppress(ValueError):
                counts.update(json.loads(text))
                break


def config(url: str, table: str, strategy: dict[str, Any], timeout: float) -> dict[str, Any]:
    options = {
        "enabled": True,
        "table_name": table,
        "region": REGION,
        "endpoint_url": url,
        "create_table": True,
        "backoff_initial": 0.005,
        "backoff_max": 0.03,
        "ttl": 600,
        **strategy,
    }
    return {"backends": {"DynamoDB": options}, "timeout": timeout}


async def job(cfg: dict[str, Any], peers: int, rounds: int) -> tuple[float, int]:
    """One job, open to close: ``(seconds, requests retried by the channels)``."""
    run_id = uuid.uuid4().hex[:12]
    comms = [fmi.Communicator(i, peers, cfg, run_id=run_id) for i in range(peers)]
    start = time.perf_counter()
    await asyncio.gather(*(c.open() for c in comms))

    async def body(c: fmi.Communicator) -> None:
        for i in range(rounds):
            total = await c.allreduce(np.full(16, float(c.rank)))
            assert total[0] == peers * (peers - 1) / 2
            data = await c.bcast(b"x" * 1000 if c.rank == 0 else None, root=0)
            assert data == b"x" * 1000
            await c.send(i, (c.rank + 1) % peers)
            assert await c.recv((c.rank - 1) % peers) == i
        await c.barrier()

    retried = 0
    try:
        await asyncio.gather(*(body(c) for c in comms))
    finally:
        for c in comms:
            chan = c._channels.get("dynamodb")  # the channel's count of retried failures
            retried += sum(getattr(chan, "retried", {}).values())
        await asyncio.gather(*(c.close() for c in comms), return_exceptions=True)
        # Work a close left running (a lease release) finishes inside this loop.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if rest:
            await asyncio.wait(rest, timeout=10)
    return time.perf_counter() - start, retried


def timed(cfg: dict[str, Any], peers: int, rounds: int, failed: list[str]) -> tuple[float, int]:
    """:func:`job` in a fresh event loop; a job that fails is noted in ``failed``
    (and counts NaN seconds), so one failure does not end the benchmark."""
    try:
        return asyncio.run(job(cfg, peers, rounds))
    except fmi.FMIError as exc:
        failed.append(f"{type(exc).__name__}: {str(exc)[:160]}")
        logger.warning("a job failed: %s", exc)
        return float("nan"), 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of this section: one per strategy, medians, the ratio throttled/unthrottled."""
    names = [s for s in args.strategies.split(",") if s]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dummy_aws_environment(workdir)
        with server_process(
            "moto", moto_argv, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/", workdir
        ) as moto:
            for name in names:
                strategy = STRATEGIES[name]
                table = f"bench-{uuid.uuid4().hex[:8]}"
                with (
                    throttle_proxy(moto, 0.0, 1) as (clean_url, _),
                    throttle_proxy(moto, args.rate, 1) as (throttled_url, counts),
                ):
                    clean_cfg = config(clean_url, table, strategy, args.timeout)
                    throttled_cfg = config(throttled_url, table, strategy, args.timeout)
                    asyncio.run(job(clean_cfg, args.peers, 1))  # the table, warm caches
                    clean: list[float] = []
                    throttled: list[float] = []
                    retried: list[int] = []
                    failed: list[str] = []
                    for _ in range(args.repeat):  # alternately: drifting load hits both
                        clean.append(timed(clean_cfg, args.peers, args.rounds, failed)[0])
                        seconds, n = timed(throttled_cfg, args.peers, args.rounds, failed)
                        throttled.append(seconds)
                        retried.append(n)
                base = statistics.median([s for s in clean if s == s] or [float("nan")])
                slow = statistics.median([s for s in throttled if s == s] or [float("nan")])
                per_job = counts.get("throttled", 0) / max(1, args.repeat)
                rows.append(
                    {
                        "section": "aws",
                        "case": f"dynamodb {args.rate:.0%} throttled",
                        "strategy": name,
                        "unthrottled": base,
                        "throttled": slow,
                        "ratio": slow / base,
                        "target": TARGET,
                        "lost": slow - base,
                        "throttles/job": per_job,
                        "lost/throttle": (slow - base) / per_job if per_job else None,
                        "retried/job": statistics.median(retried) if retried else 0,
                        "runs": [round(s, 2) for s in clean] + [round(s, 2) for s in throttled],
                        "failed": failed,
                    }
                )
                logger.info("%s: %s", name, rows[-1])
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="jobs per strategy and case")
    parser.add_argument("--rate", type=float, default=0.1, help="share of requests throttled")
    parser.add_argument("--peers", type=int, default=4, help="peers of a job")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of collectives per job")
    parser.add_argument("--timeout", type=float, default=120.0, help="config timeout, seconds")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated strategies"
    )


def show(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'strategy':<16}{'clean s':>9}{'throttled s':>13}{'ratio':>7}{'target':>8}"
        f"{'lost s':>8}{'throttles/job':>15}{'lost/throttle':>15}  runs (clean, throttled)"
    )
    for r in rows:
        per = f"{r['lost/throttle'] * 1e3:.0f} ms" if r["lost/throttle"] is not None else ""
        print(
            f"{r['strategy']:<16}{r['unthrottled']:>9.2f}{r['throttled']:>13.2f}"
            f"{r['ratio']:>7.2f}{'<= ' + format(r['target'], 'g'):>8}{r['lost']:>8.2f}"
            f"{r['throttles/job']:>15.0f}{per:>15}  {r['runs']}"
        )
        for failure in r["failed"]:
            print(f"    a job failed: {failure}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    rows = run(args)
    show(rows)


if __name__ == "__main__":
    main()
