"""The FMI paper's comparison: LambdaML's k-means against this library, side by side.

LambdaML's k-means setting (data made from a seed, ``--peers`` workers,
``--epochs`` epochs, each reducing one vector of the k x d centroid sums and
the k counts), run two ways on the same data, start and seeds:

* **LambdaML**: its storage-only ``reduce_epoch`` (benchmarks/lambdaml.py:
  every worker writes its update, worker 0 lists until all are in, merges
  and writes the sum back, the others poll for it every ``--poll`` seconds,
  0.1 s as LambdaML does) over Redis, S3 and DynamoDB; and again polling
  every ``--fast-poll`` seconds (1 ms), to show what the sleep costs;
* **fmi**: ``comm.allreduce`` over each channel of the library alone: tcp
  (direct, through a rendezvous server on 127.0.0.1), udp, redis, s3 and
  dynamodb (the plan is the planner's, FAST hint; printed).

Each pattern and channel runs ``--rounds`` times (2), the rounds interleaved
(the machine's load changes); medians are over the epochs of all rounds,
requests and dollars the mean per run.  Every run is ``--peers`` worker
processes (this script with ``--worker``) on one machine: a private
redis-server and a moto server (S3 and DynamoDB's HTTP protocols, in its own
process) on loopback, from benchmarks/servers.py.
The k-means arithmetic is examples/kmeans.py's ``lloyd`` in both.  The
data's sums are exact in float64 (examples/kmeans.py), so the final
centroids of every run must be equal bit for bit; the script checks it.

Printed per pattern and channel: the median time of an epoch and of its
reduction (per epoch, the mean over the workers; the median over epochs;
it includes waiting for the slowest worker's compute), the reduction from
the last worker's update to the last worker holding the sum (the
``perf_counter`` stamps of all workers, one clock on one machine; median
over epochs), the communication share (time in the reduction over the epochs' time, all
workers), the requests issued during the epochs (the library's
``comm.stats()``, LambdaML's own counters) and the dollars of one run at list
prices from the cost model (fmi_async.selection): communication (requests,
transfer and the share of infrastructure per request or message) and the
functions' GB-seconds (2048 MB each) for the epochs.  Then the ratios:
LambdaML on a store over the library on the same store, and over tcp and udp.

    python benchmarks/kmeans.py                 # 8 workers, 10 epochs, 2 rounds (3-10 min)
    python benchmarks/kmeans.py --quick         # 4 workers, 3 epochs, fewer points, 1 round
    python benchmarks/kmeans.py --write-docs    # and rewrite docs/evaluation.md's
                                                # results and docs/evaluation.png
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import lambdaml  # benchmarks/lambdaml.py
import numpy as np
from common import Rendezvous, run_loop, run_peers, tcp_config  # benchmarks/common.py
from kmeans_report import write_docs  # benchmarks/kmeans_report.py
from servers import REGION, redis_and_moto  # benchmarks/servers.py

import fmi_async as fmi
from fmi_async.channels.base import ChannelStats
from fmi_async.selection.cost import channel_cost
from fmi_async.selection.model import CostModel, default_models
from fmi_async.tools.cost_report import cost_report

logger = logging.getLogger(__name__)

STORES = ("redis", "s3", "dynamodb")
CHANNELS = ("tcp", "udp", "redis", "s3", "dynamodb")
MEMORY_MB = 2048.0
WORKER_TIMEOUT = 600.0


def _load_example() -> Any:
    """examples/kmeans.py (this script has its name, so it is loaded by path)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "kmeans.py"
    spec = importlib.util.spec_from_file_location("kmeans_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


example = _load_example()


# ---------------------------------------------------------------- one worker


def fmi_config(channel: str, where: str, timeout: float) -> dict[str, Any]:
    """The config of a peer whose only channel is ``channel``."""
    if channel in ("tcp", "udp"):
        config = tcp_config(where, timeout)
        if channel == "udp":
            config["backends"] = {"UDP": config["backends"].pop("TCP")}
        return config
    if channel == "redis":
        host, port = where.rsplit(":", 1)
        redis = {"enabled": True, "host": host, "port": int(port), "ttl": 600}
        return {"backends": {"Redis": redis}, "timeout": timeout}
    name = f"fmi-kmeans-{uuid.uuid5(uuid.NAMESPACE_URL, where).hex[:8]}"
    if channel == "s3":
        s3 = {"bucket_name": name, "s3_region": REGION, "create_bucket": True, "timeout": 2}
        s3.update(max_timeout=int(timeout * 1000), backoff_max=0.02)
        return {
            "backends": {"S3": {"enabled": True, "endpoint_url": where, **s3}},
            "timeout": timeout,
        }
    ddb = {"table_name": name, "region": REGION, "create_table": True, "ttl": 600}
    ddb.update(backoff_initial=0.002, backoff_max=0.02, enabled=True, endpoint_url=where)
    return {"backends": {"DynamoDB": ddb}, "timeout": timeout}


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``comm.stats()`` counted between two snapshots (channels and plans)."""
    channels: dict[str, Any] = {}
    for name, entry in after["channels"].items():
        old = before["channels"].get(name, {})
        row = {
            key: value - old.get(key, 0)
            for key, value in entry.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        requests = Counter(entry.get("requests", {}))
        requests.subtract(old.get("requests", {}))
        row["requests"] = {k: v for k, v in requests.items() if v}
        channels[name] = row
    plans = Counter(after["collectives"])
    plans.subtract(before["collectives"])
    return {"peer": after["peer"], "channels": channels, "collectives": +plans}


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One peer of one run: the epochs, timed, and what they cost in requests."""
    rank, size = args.peer, args.peers
    mine = example.make_points(
        *example.share_of(rank, size, args.points), args.dim, args.k, args.seed
    )
    start = example.make_points(0, args.k, args.dim, args.k, args.seed)
    out: dict[str, Any] = {}
    if args.pattern == "lambdaml":
        store = lambdaml.make_store(args.backend, args.where, REGION, args.run_id)
        reducer = lambdaml.StorageReducer(store, rank, size, poll=args.poll)
        logger.debug("LambdaML worker %d of %d, polling every %g s", rank, size, args.poll)
        try:
            await store.open()
            await reducer.barrier("ready")  # every worker up: the first epoch is not a start race
            store.requests.clear()
            store.bytes_sent = 0
            trace = await example.lloyd(mine, start, args.epochs, reducer)
            out["requests"], out["bytes_sent"] = dict(store.requests), store.bytes_sent
            await reducer.cleanup()
        finally:
            await store.close()
    else:
        config = fmi_config(args.backend, args.where, timeout=120)
        comm = fmi.Communicator(rank, size, config, "kmeans", run_id=args.run_id, timeout=120)
        async with comm:
            await comm.allreduce(np.zeros(args.k * (args.dim + 1)))  # connections, warm
            before = comm.stats()

            async def allreduce(vector: np.ndarray) -> np.ndarray:
                total: np.ndarray = await comm.allreduce(vector, fmi.SUM)
                return total

            trace = await example.lloyd(mine, start, args.epochs, allreduce)
            out["stats"] = stats_delta(before, comm.stats())
            await comm.barrier()
    out.update(
        centroids=trace.centroids.tobytes().hex(),
        epoch_seconds=trace.epoch_seconds,
        reduce_seconds=trace.reduce_seconds,
        reduce_began=trace.reduce_began,
        reduce_ended=trace.reduce_ended,
    )
    return out


# ---------------------------------------------------------------- one run, summarised


def summarise(
    pattern: str, backend: str, results: list[dict[str, Any]], models: CostModel, name: str
) -> dict[str, Any]:
    """Medians, share, requests and dollars of one run (``results``: its workers')."""
    epochs = len(results[0]["epoch_seconds"])
    per_epoch = [statistics.fmean(r["epoch_seconds"][e] for r in results) for e in range(epochs)]
    per_reduce = [statistics.fmean(r["reduce_seconds"][e] for r in results) for e in range(epochs)]
    # From the last worker's update to the last worker holding the sum: the
    # reduction itself, without the wait for the slowest worker's compute.
    after_last = [
        max(r["reduce_ended"][e] for r in results) - max(r["reduce_began"][e] for r in results)
        for e in range(epochs)
    ]
    busy = sum(sum(r["epoch_seconds"]) for r in results)
    in_reduce = sum(sum(r["reduce_seconds"]) for r in results)
    requests: Counter[str] = Counter()
    plans: dict[str, int] = {}
    if pattern != "fmi":
        for r in results:
            requests.update(r["requests"])
        sent = sum(r["bytes_sent"] for r in results)
        cs = ChannelStats(bytes_sent=sent, requests=Counter(requests))
        comm_usd = channel_cost("mediated", cs, models.channel(backend))
    else:
        stats = [r["stats"] for r in results]
        for s in stats:
            for entry in s["channels"].values():
                requests.update(entry["requests"])
                requests["messages"] += entry.get("messages_sent", 0)
        comm_usd = cost_report(stats, models)["total"]["channels_usd"]
        plans = dict(stats[0]["collectives"])
    return {
        "pattern": pattern,
        "backend": backend,
        "name": name,
        "epochs": per_epoch,
        "reduces": per_reduce,
        "after_last": after_last,
        "busy": busy,
        "in_reduce": in_reduce,
        "requests": dict(requests),
        "comm_usd": comm_usd,
        "faas_usd": models.faas_cost(busy, 1),
        "plans": plans,
        "centroids": results[0]["centroids"],
        "agree": all(r["centroids"] == results[0]["centroids"] for r in results),
    }


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rounds of one pattern and channel: medians over all their
    epochs, the share over all, requests and dollars per run (the mean)."""
    first, n = runs[0], len(runs)
    requests: Counter[str] = Counter()
    for r in runs:
        requests.update(r["requests"])
    busy, in_reduce = sum(r["busy"] for r in runs), sum(r["in_reduce"] for r in runs)
    return {
        **{k: first[k] for k in ("pattern", "backend", "name", "plans", "centroids")},
        "rounds": n,
        "epoch_s": statistics.median(x for r in runs for x in r["epochs"]),
        "comm_s": statistics.median(x for r in runs for x in r["reduces"]),
        "latency_s": statistics.median(x for r in runs for x in r["after_last"]),
        "share": in_reduce / busy if busy else 0.0,
        "requests": {k: round(v / n) for k, v in requests.items()},
        "comm_usd": statistics.fmean(r["comm_usd"] for r in runs),
        "faas_usd": statistics.fmean(r["faas_usd"] for r in runs),
        "agree": all(r["agree"] and r["centroids"] == first["centroids"] for r in runs),
    }


def run_one(
    pattern: str, backend: str, poll: float, args: argparse.Namespace, where: str
) -> list[dict[str, Any]]:
    run_id = f"km-{uuid.uuid4().hex[:10]}"
    pattern = "fmi" if pattern == "fmi" else "lambdaml"
    if pattern == "lambdaml":
        asyncio.run(lambdaml.create_buckets(backend, where, REGION, run_id))
    argv = [
        "--pattern", pattern, "--backend", backend, "--where", where, "--run-id", run_id,
        "--peers", str(args.peers), "--epochs", str(args.epochs), "--points", str(args.points),
        "--dim", str(args.dim), "-k", str(args.k), "--seed", str(args.seed),
        "--poll", str(poll), "--loop", args.loop,
    ]  # fmt: skip
    return run_peers(__file__, args.peers, argv, WORKER_TIMEOUT)


# ---------------------------------------------------------------- output


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def label(row: dict[str, Any]) -> str:
    return str(row["name"])


def requests_text(requests: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(requests.items()) if not k.endswith("_units"))


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LambdaML on each store over fmi on the same store, and over tcp and udp."""
    base = {r["backend"]: r for r in rows if r["pattern"] == "lambdaml"}
    out = []
    for r in rows:
        if r["pattern"] != "fmi":
            continue
        against = [r["backend"]] if r["backend"] in base else list(base)
        for store in against:
            b = base[store]
            out.append(
                {
                    "fmi": r["backend"],
                    "lambdaml": store,
                    "comm_speedup": b["comm_s"] / r["comm_s"] if r["comm_s"] else float("inf"),
                    "latency_speedup": b["latency_s"] / r["latency_s"]
                    if r["latency_s"]
                    else float("inf"),
                    "epoch_speedup": b["epoch_s"] / r["epoch_s"] if r["epoch_s"] else float("inf"),
                    "comm_cheaper": b["comm_usd"] / r["comm_usd"]
                    if r["comm_usd"]
                    else float("inf"),
                }
            )
    return out


def print_report(rows: list[dict[str, Any]], setting: str) -> None:
    print(f"\n{setting}")
    head = f"  {'pattern / channel':<32}{'epoch':>10}{'reduce':>10}{'after':>10}{'share':>7}"
    head += f"{'comm $/run':>12}{'fn $/run':>11}  requests during the epochs"
    print(head)
    for r in rows:
        print(
            f"  {label(r):<32}{fmt_s(r['epoch_s']):>10}{fmt_s(r['comm_s']):>10}"
            f"{fmt_s(r['latency_s']):>10}{r['share']:>7.1%}"
            f"{r['comm_usd']:>12.3e}{r['faas_usd']:>11.3e}  {requests_text(r['requests'])}"
        )
    print("\n  LambdaML / fmi (x: how many times faster or cheaper fmi is)")
    for q in ratios(rows):
        print(
            f"  fmi {q['fmi']:<9} vs LambdaML {q['lambdaml']:<9} "
            f"reduction x{q['comm_speedup']:.1f} (after the last update "
            f"x{q['latency_speedup']:.1f}), "
            f"epoch x{q['epoch_speedup']:.2f}, communication dollars x{q['comm_cheaper']:.1f}"
        )
    plans = {r["backend"]: r["plans"] for r in rows if r["pattern"] == "fmi"}
    print(f"\n  plans the library ran (peer 0, the epochs): {plans}")


# ---------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="4 workers, 3 epochs, 40 000 points, 1 round"
    )
    parser.add_argument("--peers", type=int, default=8, help="workers (default 8)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    parser.add_argument("--points", type=int, default=200_000, help="points in all")
    parser.add_argument("--dim", type=int, default=16, help="dimensions of a point")
    parser.add_argument("-k", type=int, default=8, help="clusters")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data set")
    parser.add_argument(
        "--poll", type=float, default=lambdaml.POLL, help="LambdaML's wait between reads (s)"
    )
    parser.add_argument(
        "--fast-poll",
        type=float,
        default=0.001,
        help="LambdaML again with this wait (s); 0: not run",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated runs, e.g. lambdaml:redis,fmi:tcp"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each (interleaved)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument(
        "--from-json", type=Path, help="no runs: report (and --write-docs) a --json file's rows"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite docs/evaluation.md and .png"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", choices=("lambdaml", "fmi"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=CHANNELS, help=argparse.SUPPRESS)
    parser.add_argument("--where", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.peers, args.epochs, args.points, args.rounds = 4, 3, 40_000, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        print(json.dumps({"result": run_loop(args.loop, worker(args))}), flush=True)
        return
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_report(saved["rows"], saved["setting"])
        if args.write_docs:
            write_docs(saved["rows"], ratios(saved["rows"]), saved["setting"])
        return
    runs = [("lambdaml", s, args.poll, f"LambdaML {s}") for s in STORES]
    if args.fast_poll > 0:
        runs += [
            ("lambdaml-fast", s, args.fast_poll, f"LambdaML {s}, {args.fast_poll * 1e3:g} ms poll")
            for s in STORES
        ]
    runs += [("fmi", c, args.poll, f"fmi {c}") for c in CHANNELS]
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if f"{r[0]}:{r[1]}" in wanted]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # one BLAS thread per worker: they share the cores
    models = CostModel(default_models(), faas_memory_mb=MEMORY_MB)
    setting = (
        f"k-means: {args.points} x {args.dim} points, k = {args.k}, "
        f"{args.peers} workers (processes), "
        f"{args.epochs} epochs, seed {args.seed}, {args.rounds} round(s); "
        f"LambdaML polls every {args.poll:g} s; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}, "
        f"loop {args.loop}"
    )
    raw: dict[str, list[dict[str, Any]]] = {name: [] for *_, name in runs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fmi-kmeans-") as tmp:
        with redis_and_moto(Path(tmp)) as ((host, port), moto_url), Rendezvous() as rendezvous:
            for round_ in range(args.rounds):  # interleaved: the load changes over time
                for pattern, backend, poll, name in runs:
                    where = {"redis": f"{host}:{port}", "tcp": rendezvous, "udp": rendezvous}
                    t0 = time.perf_counter()
                    results = run_one(pattern, backend, poll, args, where.get(backend, moto_url))
                    raw[name].append(summarise(pattern, backend, results, models, name))
                    print(
                        f"  round {round_ + 1}, {name}: {time.perf_counter() - t0:.1f} s",
                        flush=True,
                    )
    rows = [pool(r) for r in raw.values()]
    identical = all(r["agree"] and r["centroids"] == rows[0]["centroids"] for r in rows)
    print_report(rows, setting)
    print(
        f"\n  centroids identical bit for bit in every worker of every run: {identical}"
        f"\n  (total {time.perf_counter() - started:.0f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    if not identical:
        raise SystemExit("the runs ended with different centroids")
    if args.write_docs:
        write_docs(rows, ratios(rows), setting)


if __name__ == "__main__":
    main()
