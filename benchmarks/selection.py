"""Does plan() pick the fastest plan?  Every valid plan, measured, against the choice.

For each collective, message size and group size, every valid plan (channel,
family, algorithm) is run through the per-call overrides, e.g.
``await comm.allreduce(x, channel="redis", algorithm="mediated:root")``, and
its median wall time measured.  The plan that ``plan()`` chooses under
``Hint.FAST`` -- with the models that ``fmi calibrate`` fitted at the start
of this same run -- should be the measured fastest or within 10% of it;
the benchmark prints the table and that percentage (target >= 90%).

Channels: memory, TCP (in-process rendezvous server on 127.0.0.1), Redis (a
``redis-server`` this script starts on a free loopback port) and S3 (a moto
server, the real S3 HTTP protocol, this script starts on loopback).

All peers of a measurement run in ONE process, as coroutines on one event
loop (``asyncio.gather`` over local communicators): what the peers do "at
the same time" shares one CPU.  The model assumes peers on separate machines,
so algorithms that move more bytes in total but in fewer rounds look better
to the model than they measure here; the printout says so next to the figure.

Bounded runtime: repetitions are adaptive (a time budget per plan, at least
three after a warm-up), plans predicted to take longer than ``--cap`` seconds
*and* more than 10x the best predicted deployable plan are not run (they are
counted and listed), and ``--max-minutes`` stops the sweep early.

    python benchmarks/selection.py --quick          # about 5 minutes
    python benchmarks/selection.py                  # sizes to 64 MiB, up to ~30 minutes
    python benchmarks/selection.py --example        # the worked example of docs/selection.md
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from servers import redis_and_moto  # benchmarks/servers.py

import fmi_async as fmi
from fmi_async.channels import registry
from fmi_async.selection import rounds as round_model  # the what-if model only
from fmi_async.selection.model import CostModel
from fmi_async.selection.plan import Hint, Plan, plan, plans
from fmi_async.tools.calibrate import calibrate, describe, local_group
from fmi_async.tools.calibration import cost_model_from, measure_reduce_bandwidth
from fmi_async.tools.cli import main as fmi_main
from fmi_async.tools.tables import render_table
from fmi_async.tools.units import fmt_bytes, fmt_seconds, fmt_usd, parse_sizes

KiB, MiB = 1024, 1024 * 1024
COLLECTIVES = ("bcast", "reduce", "allreduce", "gather", "allgather", "scan")
FULL_SIZES = (8, KiB, 64 * KiB, MiB, 8 * MiB, 64 * MiB)
QUICK_SIZES = (8, KiB, 64 * KiB, MiB)
TOLERANCE = 0.10
SKIP_FACTOR = 10.0
_SAMPLE_SECONDS = 3e-3  # a sample repeats a fast collective until it lasts about this long


# ---------------------------------------------------------------- servers on loopback


def storage_config(redis: tuple[str, int], s3_url: str) -> fmi.Config:
    return fmi.Config.from_dict(
        {
            "backends": {
                "Redis": {"enabled": True, "host": redis[0], "port": redis[1], "ttl": 3600},
                "S3": {
                    "enabled": True,
                    "bucket_name": f"fmi-bench-{uuid.uuid4().hex[:10]}",
                    "s3_region": "us-east-1",
                    "endpoint_url": s3_url,
                    "create_bucket": True,
                    "timeout": 2,  # FMI's polling interval, ms
                    "max_timeout": 120000,
                    "backoff_max": 0.02,
                },
            },
            "timeout": 300,
        }
    )


# ---------------------------------------------------------------- one collective call


@functools.lru_cache(maxsize=64)
def _value(size: int, rank: int) -> np.ndarray:
    """Each peer's input, made once per size: a fresh 64 MiB array per call would
    bill its page faults (slow and erratic on a virtual machine) to the plan."""
    arr = np.full(max(1, size // 8), float(rank + 1), dtype=np.float64)
    arr.flags.writeable = False  # a collective must never write into its input
    return arr


def _call_kwargs(op: str, size: int) -> dict[str, Any]:
    """What plan() is told, identical to what the communicator derives from the call."""
    out: dict[str, Any] = {"nbytes": max(1, size // 8) * 8, "is_array": False}
    if op in ("reduce", "allreduce", "scan"):
        # The communicator plans reductions from the array itself; bcast and the
        # gathers from the nbytes= every peer passes.
        out.update(operator=fmi.SUM, is_array=True, elements=max(1, size // 8))
    return out


def _invoke(comm: fmi.Communicator, op: str, size: int, p: Plan | None) -> Awaitable[Any]:
    over: dict[str, Any] = {}
    if p is not None:
        over = {"channel": p.channel, "algorithm": f"{p.family}:{p.algorithm}"}
    x = _value(size, comm.rank)
    nbytes = int(x.nbytes)
    if op == "bcast":
        return comm.bcast(x if comm.rank == 0 else None, 0, nbytes=nbytes, **over)
    if op == "reduce":
        return comm.reduce(x, fmi.SUM, 0, **over)
    if op == "allreduce":
        return comm.allreduce(x, fmi.SUM, **over)
    if op == "gather":
        return comm.gather(x, 0, nbytes=nbytes, **over)
    if op == "allgather":
        return comm.allgather(x, nbytes=nbytes, **over)
    if op == "scan":
        return comm.scan(x, fmi.SUM, **over)
    raise SystemExit(f"collective {op} is not in this benchmark")


async def _timed(
    comms: Sequence[fmi.Communicator], op: str, size: int, p: Plan | None, iters: int = 1
) -> float:
    """Seconds of one call of the whole group, averaged over ``iters`` calls in a row."""
    start = time.perf_counter()
    for _ in range(iters):
        await asyncio.gather(*(_invoke(c, op, size, p) for c in comms))
    return (time.perf_counter() - start) / iters


async def measure(
    comms: Sequence[fmi.Communicator], op: str, size: int, chosen: Sequence[Plan], budget: float
) -> dict[str, list[float]]:
    """Wall times of the whole group per plan, interleaved.

    Each plan runs once to warm up; then rounds run every plan once each, in
    a new order every round, so drift (allocator, GC, the storage server) hits
    all plans alike; after a storage plan the loop idles briefly so that its
    cleanup is not billed to the next plan.  Rounds
    go on until every plan has 3 samples and ``budget`` seconds per plan are
    spent, at most 15; a plan slower than twice the budget gets 2 samples.
    """
    samples: dict[str, list[float]] = {}
    rng = random.Random(f"{op}/{size}/{len(comms)}")
    slow: set[str] = set()
    iters: dict[str, int] = {}
    for p in chosen:
        # Two warm-up calls: the first pays one-off costs (connections, caches,
        # the allocator), and a repeat count derived from it would leave the
        # plan measured first with single-call samples that pay the switch
        # between plans every time.
        first = await _timed(comms, op, size, p)
        if first <= 2 * budget:
            first = await _timed(comms, op, size, p)
        samples[_label(p)] = []
        # Sub-millisecond calls are repeated so a sample outlasts timer and GC noise.
        iters[_label(p)] = max(1, min(50, int(_SAMPLE_SECONDS / max(first, 1e-6))))
        if first > 2 * budget:
            slow.add(_label(p))
            samples[_label(p)].append(first)
    start = time.perf_counter()
    for rounds in range(15):
        if rounds >= 3 and time.perf_counter() - start > budget * len(chosen):
            break
        # A new order every round (seeded, so runs repeat): work a plan leaves
        # behind would otherwise always slow the same successor.
        order = list(chosen)
        rng.shuffle(order)
        for p in order:
            label = _label(p)
            if label in slow and len(samples[label]) >= 2:
                continue
            samples[label].append(await _timed(comms, op, size, p, iters[label]))
            if p.family == "mediated" or p.channel in ("redis", "s3", "dynamodb"):
                # Let its cleanup (deletes, the in-process moto server's threads)
                # finish before the next plan's clock starts.
                await asyncio.sleep(min(0.05, 2 * samples[label][-1]))
    return samples


# ---------------------------------------------------------------- the sweep


@dataclass
class Cell:
    op: str
    size: int
    peers: int
    measured: dict[str, float] = field(default_factory=dict)  # plan label -> median seconds
    predicted: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)  # channel subset -> label
    whatif: dict[str, str] = field(default_factory=dict)  # same, by the shared-CPU what-if

    def verdict(self, subset: str, whatif: bool = False) -> bool | None:
        """Chosen within TOLERANCE of the fastest measured (None: cannot tell)."""
        label = (self.whatif if whatif else self.chosen).get(subset)
        runs = {k: v for k, v in self.measured.items() if _in(k, subset)}
        if label is None or label not in runs or not runs:
            return None
        return runs[label] <= (1 + TOLERANCE) * min(runs.values())

    def fastest(self, subset: str) -> str:
        runs = {k: v for k, v in self.measured.items() if _in(k, subset)}
        return min(runs, key=runs.__getitem__) if runs else "-"


SUBSETS = {
    "all": ("memory", "tcp", "redis", "s3"),
    "deployable": ("tcp", "redis", "s3"),
}


def _in(label: str, subset: str) -> bool:
    channels = SUBSETS.get(subset, (subset,))
    return label.split(" ", 1)[0] in channels


def _label(p: Plan) -> str:
    return f"{p.channel} {p.family}:{p.algorithm}"


def shared_seconds(
    p: Plan, kw: dict[str, Any], peers: int, models: CostModel, concurrency: dict[str, float]
) -> float:
    """What-if model: the plan's time when the peers share ``concurrency`` streams.

    plan() assumes every peer has its own machine, so a round costs one
    message whatever the number of peers.  Here all peers share one CPU: the
    time is at least the whole group's work (every message's overhead and
    every byte) divided by how many streams really run in parallel, which
    calibration measured as aggregate / single bandwidth.  plan() applies
    the same bound with ``ChannelModel.concurrency``; this recomputes it from
    the calibration's raw ratio, as a cross-check.
    """
    m = models.channel(p.channel)
    shape = round_model.Shape(
        p.op, float(kw["nbytes"]), peers, 0, kw.get("operator"), kw["is_array"], kw.get("elements")
    )
    if p.family == "direct":
        stored = registry.spec(p.channel).kind == "mediated"
        scale = 2.0 if stored else 1.0
        a, b = scale * m.overhead, scale / m.bandwidth
        _, count, moved = round_model.direct_rounds(p.algorithm, shape, a, b)
        work = count * a + moved * b
        if stored:  # every request of a message, the reader's delete too (as plan() counts)
            requests = sum(v for k, v in m.message_requests.items()) * count
            work = requests * m.overhead + moved * b
    else:
        _, req, moved = round_model.mediated_rounds(p.channel, m, p.algorithm, shape)
        calls = sum(v for k, v in req.items() if not k.endswith("_units"))
        work = calls * m.overhead + moved / m.bandwidth
    work += round_model.folds(p.family, p.algorithm, shape)[1] / models.reduce_bandwidth
    return max(p.seconds, work / concurrency[p.channel])


async def sweep_cell(
    op: str,
    size: int,
    peers: int,
    config: fmi.Config,
    channels: Sequence[str],
    models: CostModel,
    concurrency: dict[str, float],
    args: argparse.Namespace,
) -> Cell:
    cell = Cell(op, size, peers)
    kinds = [(c, registry.spec(c).kind) for c in channels]
    kw = _call_kwargs(op, size)
    every = plans(op, num_peers=peers, channels=kinds, models=models, **kw)
    for subset in [*SUBSETS, *channels]:
        sub = [k for k in kinds if _in(k[0], subset)]
        if sub:
            cell.chosen[subset] = _label(
                plan(op, num_peers=peers, channels=sub, models=models, hint=Hint.FAST, **kw)
            )
            names = {c for c, _ in sub}
            candidates = [p for p in every if p.channel in names]
            if candidates:  # min() keeps the first of equals: plan()'s tie order
                cell.whatif[subset] = _label(
                    min(
                        candidates,
                        key=lambda p: shared_seconds(p, kw, peers, models, concurrency),
                    )
                )
    deployable = [p.seconds for p in every if p.channel in SUBSETS["deployable"]]
    best = min(deployable or [p.seconds for p in every])
    async with local_group(peers, config, channels, timeout=300) as comms:
        # Connections and clients are made here, not inside the first plan's time.
        for name in channels:
            await asyncio.gather(*(c.alltoall([0] * peers, channel=name) for c in comms))
        runnable = []
        for p in every:
            cell.predicted[_label(p)] = p.seconds
            if p.seconds > args.cap and p.seconds > SKIP_FACTOR * best:
                cell.skipped.append(_label(p))
            else:
                runnable.append(p)
        for label, samples in (await measure(comms, op, size, runnable, args.budget)).items():
            cell.measured[label] = statistics.median(samples)
    return cell


def summarize(cells: Sequence[Cell], channels: Sequence[str]) -> str:
    out = []
    rows = []
    for c in cells:
        fast = c.fastest("all")
        rows.append(
            [
                c.op,
                fmt_bytes(c.size),
                str(c.peers),
                c.chosen.get("all", "-"),
                fmt_seconds(c.measured.get(c.chosen.get("all", ""), float("nan"))),
                fast,
                fmt_seconds(c.measured.get(fast, float("nan"))),
                {True: "ok", False: "MISS", None: "?"}[c.verdict("all")],
                {True: "ok", False: "MISS", None: "?"}[c.verdict("deployable")],
                {True: "ok", False: "MISS", None: "?"}[c.verdict("all", whatif=True)],
                str(len(c.measured)),
                str(len(c.skipped)),
            ]
        )
    out.append(
        render_table(
            [
                "collective",
                "size",
                "P",
                "chosen (FAST)",
                "measured",
                "fastest measured",
                "measured",
                "all",
                "deploy",
                "what-if",
                "ran",
                "skip",
            ],
            rows,
        )
    )
    out.append("")
    for whatif in (False, True):
        out.append(
            "what-if model (shared CPU, see shared_seconds):"
            if whatif
            else "plan() with the calibrated models:"
        )
        for subset in [*SUBSETS, *channels]:
            known = [v for v in (c.verdict(subset, whatif) for c in cells) if v is not None]
            if known:
                pct = 100.0 * sum(known) / len(known)
                what = {
                    "all": "over all channels (memory, tcp, redis, s3)",
                    "deployable": "over channels that cross machines (tcp, redis, s3)",
                }.get(subset, f"algorithm choice within {subset} alone")
                out.append(
                    f"  FAST choice within {TOLERANCE:.0%} of the measured fastest, {what}: "
                    f"{sum(known)}/{len(known)} = {pct:.0f}%"
                )
    return "\n".join(out)


async def run_sweep(args: argparse.Namespace, config: fmi.Config) -> int:
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    print(f"calibrating {', '.join(channels)} (4 peers in this process) ...", flush=True)
    results = await calibrate(config, channels, peers=4, budget=args.calibrate_budget)
    print(describe(results), flush=True)
    reduce_bandwidth = measure_reduce_bandwidth()
    print(f"folding (numpy SUM, float64, 8 MiB): {reduce_bandwidth / 1e9:.2f} GB/s", flush=True)
    models = cost_model_from(results, config, reduce_bandwidth)
    concurrency = {r.channel: max(1.0, r.aggregate_bandwidth / r.bandwidth) for r in results}
    sizes = (
        parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else FULL_SIZES)
    )
    peers = [int(p) for p in args.peers.split(",")]
    ops = [o.strip() for o in args.collectives.split(",")]
    total = len(sizes) * len(peers) * len(ops)
    print(
        f"\nsweep: {len(ops)} collectives x {len(sizes)} sizes x P in {peers} = {total} cells; "
        "all peers of a measurement run in one process, on one event loop",
        flush=True,
    )
    cells: list[Cell] = []
    began = time.monotonic()
    stopped = False
    for p in peers:
        for size in sizes:
            for op in ops:
                if time.monotonic() - began > args.max_minutes * 60:
                    stopped = True
                    break
                cell = await sweep_cell(op, size, p, config, channels, models, concurrency, args)
                cells.append(cell)
                v = {True: "ok", False: "MISS", None: "?"}[cell.verdict("all")]
                print(
                    f"[{len(cells)}/{total} {time.monotonic() - began:.0f}s] {op} "
                    f"{fmt_bytes(size)} P={p}: chosen {cell.chosen.get('all')} "
                    f"fastest {cell.fastest('all')} {v}; ran {len(cell.measured)}, "
                    f"skipped {len(cell.skipped)}",
                    file=sys.stderr,
                    flush=True,
                )
    print()
    print(summarize(cells, channels))
    skipped = sum(len(c.skipped) for c in cells)
    ran = sum(len(c.measured) for c in cells)
    print(
        f"\n{ran} plans measured, {skipped} not run (predicted > {args.cap:g} s and > "
        f"{SKIP_FACTOR:g}x the best deployable prediction); "
        f"{time.monotonic() - began:.0f} s; all peers in one process on one event loop"
        + ("; STOPPED EARLY at --max-minutes" if stopped else "")
    )
    if args.json:
        _write(Path(args.json), [c.__dict__ for c in cells])
    return 0


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------- the worked example


async def run_example(args: argparse.Namespace, config: fmi.Config) -> int:
    """8 peers, ten iterations of allreduce(1 MiB) + bcast(64 KiB), under FAST and CHEAP.

    Run once per ``requests_per_hour`` in ``--rates``: the rate decides how
    much of an hour of infrastructure (the rendezvous VM, the Redis node) each
    message carries, and with it whether CHEAP leaves the direct channel.
    """
    channels = ["tcp", "redis", "s3"]
    results = await calibrate(config, channels, peers=4, budget=args.calibrate_budget)
    print(describe(results))
    for rate in (float(r) for r in args.rates.split(",")):
        section = {r.channel: {**r.model_entry(), "requests_per_hour": rate} for r in results}
        data = config.to_dict()
        data["model"] = section
        await _example_job(fmi.Config.from_dict(data), channels, rate)
    return 0


async def _example_job(calibrated: fmi.Config, channels: list[str], rate: float) -> None:
    peers, iters = 8, 10
    for hint in (Hint.FAST, Hint.CHEAP):
        async with local_group(peers, calibrated, channels, timeout=300) as comms:
            for c in comms:
                c.hint(hint)
            start = time.perf_counter()

            async def job(comm: fmi.Communicator) -> None:
                x = np.ones(MiB // 8)
                for _ in range(iters):
                    await comm.allreduce(x)
                    await comm.bcast(np.ones(8 * KiB) if comm.rank == 0 else None, nbytes=64 * KiB)

            await asyncio.gather(*(job(c) for c in comms))
            wall = time.perf_counter() - start
            await asyncio.gather(*(c.barrier() for c in comms))
            stats = [c.stats() for c in comms]
        print(
            f"\n=== {hint.name}, requests_per_hour {rate:g}: "
            f"{peers} peers, {iters} x (allreduce 1 MiB + bcast 64 KiB)"
        )
        print(f"plans: {stats[0]['collectives']}")
        pred = stats[0]["predicted"]
        print(
            f"model predicts {fmt_seconds(pred['seconds'])} and {fmt_usd(pred['usd'])} for the "
            f"job (all peers); measured wall time {fmt_seconds(wall)}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            stats_file, config_file = Path(tmp) / "stats.json", Path(tmp) / "config.json"
            _write(stats_file, stats)
            _write(config_file, calibrated.to_dict())
            print(f"fmi cost stats.json --config calibrated.json  ({hint.name}):")
            fmi_main(["cost", str(stats_file), "--config", str(config_file)])


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 1 MiB, about 5 min")
    parser.add_argument("--example", action="store_true", help="run the docs' worked example")
    parser.add_argument(
        "--rates",
        default="100000,1000",
        help="--example: requests_per_hour values to run the job under",
    )
    parser.add_argument("--sizes", help="comma-separated sizes (overrides --quick)")
    parser.add_argument("--peers", default="2,4,8", help="group sizes")
    parser.add_argument("--collectives", default=",".join(COLLECTIVES))
    parser.add_argument("--channels", default="memory,tcp,redis,s3")
    parser.add_argument("--budget", type=float, help="seconds of repetitions per plan")
    parser.add_argument("--cap", type=float, default=2.0, help="see the module docstring")
    parser.add_argument("--calibrate-budget", type=float, default=3.0)
    parser.add_argument("--max-minutes", type=float, help="stop the sweep after this long")
    parser.add_argument("--json", help="write the cells to this file")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 0.15 if args.quick else 0.6
    if args.max_minutes is None:
        args.max_minutes = 4.0 if args.quick else 28.0
    with tempfile.TemporaryDirectory(prefix="fmi-bench-") as tmp:
        with redis_and_moto(Path(tmp)) as (redis, s3_url):
            config = storage_config(redis, s3_url)
            runner: Callable[[argparse.Namespace, fmi.Config], Awaitable[int]]
            runner = run_example if args.example else run_sweep
            return asyncio.run(runner(args, config))


if __name__ == "__main__":
    sys.exit(main())
