"""The selection check in real jobs: does FAST pick well for a k-means over storage?

``benchmarks/selection.py`` runs every peer of a measurement in one process.
This check runs the job as users do, ``fmi run -n 8`` (eight processes), on
one storage channel at a time, with the shapes of a k-means iteration
(``examples/kmeans.py``): an allreduce (SUM) of the k x d centroid sums and
one of the k counts (k = 8, d = 16: 1 KiB and 64 bytes).  For each case it
measures the plan FAST picks (``channel=`` only, the algorithm left to
``plan()``) and each candidate algorithm forced per call, and checks

    time of the FAST pick <= FACTOR x the fastest measured candidate.

Cases: Redis and S3 (a moto server) with the default models, and both again
after ``fmi calibrate --write`` on that channel (the calibrated config then
drives the job).  The candidates are the two storage-native allreduces
(``mediated:root``, ``mediated:split``) and the two direct ones that are not
hopeless over storage (``direct:recursive_doubling``, ``direct:linear``; the
ring makes 2(P-1) rounds of two requests each).  A sample is the slowest
peer's time of one iteration (both allreduces) after a barrier; the median of
``--iters`` samples is reported.  The machine is shared: numbers are
medians of one run, with whatever else runs at the time.

    python benchmarks/selection_jobs.py                 # the four cases, about 3 minutes
    python benchmarks/selection_jobs.py --cases redis   # one channel
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from servers import redis_and_moto  # benchmarks/servers.py

FACTOR = 1.25  # the FAST pick must be within this factor of the measured best
PEERS = 8
K, DIM = 8, 16  # k-means: k centroids of d dimensions
CANDIDATES = (
    "mediated:root",
    "mediated:split",
    "direct:recursive_doubling",
    "direct:linear",
)
FAST = "FAST"


# ---------------------------------------------------------------- one peer (under fmi run)


async def _iteration(comm: Any, sums: np.ndarray, counts: np.ndarray, over: dict[str, str]) -> None:
    import fmi_async as fmi

    await comm.allreduce(sums, fmi.SUM, **over)
    await comm.allreduce(counts, fmi.SUM, **over)


async def peer_main(comm: Any) -> None:
    """Time every candidate on the one enabled storage channel; rank 0 prints JSON."""
    import fmi_async as fmi

    channel = os.environ["SELECTION_CHANNEL"]
    iters = int(os.environ["SELECTION_ITERS"])
    sums, counts = np.ones((K, DIM)), np.ones(K)
    out: dict[str, Any] = {}
    for label in (FAST, *CANDIDATES):
        over = {"channel": channel} if label == FAST else {"channel": channel, "algorithm": label}
        before = dict(comm.stats()["collectives"])
        for _ in range(2):  # warm: connections, buffers, the plan cache
            await _iteration(comm, sums, counts, over)
        samples = []
        for _ in range(iters):
            await comm.barrier(channel=channel)
            start = time.perf_counter()
            await _iteration(comm, sums, counts, over)
            samples.append(time.perf_counter() - start)
        slowest = await comm.allreduce(np.array(samples), fmi.MAX, channel=channel)
        out[label] = float(statistics.median(slowest.tolist()))
        if label == FAST:
            ran = {k: v - before.get(k, 0) for k, v in comm.stats()["collectives"].items()}
            out["fast_plans"] = sorted(k for k, v in ran.items() if v and "allreduce" in k)
    if comm.rank == 0:
        print("SELECTION-RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- the driver


def _config(channel: str, redis: tuple[str, int], s3_url: str) -> dict[str, Any]:
    backends: dict[str, Any] = {"TCP": {"enabled": False}}
    if channel == "redis":
        backends["Redis"] = {"enabled": True, "host": redis[0], "port": redis[1], "ttl": 3600}
    else:
        backends["S3"] = {
            "enabled": True,
            "bucket_name": f"fmi-jobs-{uuid.uuid4().hex[:10]}",
            "s3_region": "us-east-1",
            "endpoint_url": s3_url,
            "create_bucket": True,
        }
    return {"backends": backends, "timeout": 300}


def _fmi(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fmi_async", *args],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"fmi {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_case(
    channel: str, calibrated: bool, redis: tuple[str, int], s3_url: str, workdir: Path, iters: int
) -> dict[str, Any]:
    path = workdir / f"{channel}-{'calibrated' if calibrated else 'default'}.json"
    path.write_text(json.dumps(_config(channel, redis, s3_url)))
    if calibrated:
        calibrate = ["calibrate", "--config", str(path), "--channels", channel, "--write"]
        _fmi([*calibrate, "--no-progress"])
    env = {**os.environ, "SELECTION_CHANNEL": channel, "SELECTION_ITERS": str(iters)}
    stdout = _fmi(
        ["run", "-n", str(PEERS), "--nat", "none", "--config", str(path), __file__, "--peer"],
        env=env,
    )
    for line in stdout.splitlines():
        if "SELECTION-RESULT " in line:
            result: dict[str, Any] = json.loads(line.split("SELECTION-RESULT ", 1)[1])
            model = json.loads(path.read_text()).get("model", {})
            result["model"] = model
            return result
    sys.exit(f"no result from the {channel} job:\n{stdout[-3000:]}")


def report(cases: list[tuple[str, dict[str, Any]]]) -> tuple[str, int, int]:
    """The table, and how many cases pass of how many."""
    lines = [
        f"k-means allreduces ({K}x{DIM} and {K} float64, SUM), {PEERS} peers under fmi run; "
        "median of the slowest peer's time per iteration",
        "",
    ]
    header = f"{'case':<18} {'FAST picks':<28} {'FAST':>9} " + " ".join(
        f"{c.split(':')[1][:16]:>16}" for c in CANDIDATES
    )
    lines += [header + "  ratio  verdict", "-" * len(header) + "  -----  -------"]
    passed = 0
    for name, r in cases:
        best = min(r[c] for c in CANDIDATES)
        ratio = r[FAST] / best
        ok = ratio <= FACTOR
        passed += ok
        picks = ",".join(p.split("/")[-1] for p in r.get("fast_plans", [])) or "?"
        cells = " ".join(f"{r[c] * 1e3:14.1f}ms" for c in CANDIDATES)
        lines.append(
            f"{name:<18} {picks:<28} {r[FAST] * 1e3:7.1f}ms {cells}  {ratio:5.2f}  "
            + ("ok" if ok else "MISS")
        )
    lines.append("")
    lines.append(
        f"FAST pick within {FACTOR:g}x of the measured best: {passed}/{len(cases)} cases "
        "(ratio = FAST / best candidate)"
    )
    return "\n".join(lines), passed, len(cases)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="redis,s3", help="channels: redis, s3")
    parser.add_argument("--iters", type=int, default=6, help="samples per plan")
    parser.add_argument(
        "--models", default="default,calibrated", help="default, calibrated or both"
    )
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.peer:
        import fmi_async as fmi

        fmi.run(peer_main)
        return 0
    channels = [c.strip() for c in args.cases.split(",") if c.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="fmi-jobs-") as tmp:
        with redis_and_moto(Path(tmp)) as (redis, s3_url):
            for channel in channels:
                for which in models:
                    began = time.monotonic()
                    calibrated = which == "calibrated"
                    r = run_case(channel, calibrated, redis, s3_url, Path(tmp), args.iters)
                    results.append((f"{channel} {which}", r))
                    print(
                        f"[{channel} {which}: {time.monotonic() - began:.0f} s] "
                        f"FAST {r.get('fast_plans')}",
                        file=sys.stderr,
                        flush=True,
                    )
    table, passed, total = report(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results), indent=1) + "\n")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
