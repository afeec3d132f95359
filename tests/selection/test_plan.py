"""The selection layer: plan() is deterministic, total, identical across
processes, honours hints and overrides, and every plan it can return runs
correctly; models load FMI's units and convert them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fmi_async as fmi
from fmi_async.config import Config
from fmi_async.errors import ConfigError
from fmi_async.selection.model import (
    REDUCE_BANDWIDTH,
    CostModel,
    default_models,
    load_cost_model,
    load_models,
)
from fmi_async.selection.plan import OPERATIONS, Hint, plan, plans
from fmi_async.selection.rounds import Shape, folds
from tests.reference import REDUCTIONS, assert_same, reference_fold, value

ROOT = Path(__file__).resolve().parents[2]
MODELS = CostModel(default_models())
CHANNELS = [
    ("memory", "direct"),
    ("tcp", "direct"),
    ("redis", "mediated"),
    ("s3", "mediated"),
    ("dynamodb", "mediated"),
    ("udp", "direct"),
]
OPERATORS = {
    "none": None,
    "sum": fmi.SUM,
    "noncommutative": fmi.Op(lambda a, b: a, commutative=False),
    "nonassociative": fmi.Op(lambda a, b: a, associative=False),
}

calls = st.fixed_dictionaries(
    {
        "op": st.sampled_from(OPERATIONS),
        "nbytes": st.none() | st.integers(0, 1 << 34),
        "num_peers": st.integers(1, 4096),
        "channels": st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=6, unique=True),
        "operator": st.sampled_from(sorted(OPERATORS)),
        "is_array": st.booleans(),
        "elements": st.none() | st.integers(0, 1 << 30),
        "root": st.integers(0, 7),
        "hint": st.sampled_from(list(Hint)),
    }
)


def _plan(call: dict) -> str:
    args = dict(call)
    args["operator"] = OPERATORS[args["operator"]]
    args["root"] = args["root"] % args["num_peers"]
    return plan(**args, models=MODELS).ident


@settings(max_examples=400, deadline=None)
@given(calls)
def test_plan_is_total_and_deterministic(call: dict) -> None:
    first = _plan(call)
    shuffled = dict(call, channels=list(reversed(call["channels"])))
    assert _plan(call) == first
    assert _plan(shuffled) == first  # the order channels are listed in does not matter


@settings(max_examples=200, deadline=None)
@given(calls)
def test_plan_minimises_what_the_hint_asks(call: dict) -> None:
    args = dict(call, operator=OPERATORS[call["operator"]], root=call["root"] % call["num_peers"])
    hint = args.pop("hint")
    chosen = plan(**args, hint=hint, models=MODELS)
    every = plans(**{k: v for k, v in args.items()}, models=MODELS)
    assert chosen in every
    if hint is Hint.FAST:
        assert chosen.seconds <= min(p.seconds for p in every) * (1 + 1e-8)
    else:
        assert chosen.usd <= min(p.usd for p in every) * (1 + 1e-8)
    assert all(p.seconds >= 0 and p.usd >= 0 for p in every)


def test_plan_is_identical_across_processes() -> None:
    grid = [
        {
            "op": op,
            "nbytes": n,
            "num_peers": p,
            "channels": CHANNELS,
            "operator": o,
            "is_array": True,
            "elements": (n or 8) // 8,
            "root": 0,
            "hint": h,
        }
        for op in OPERATIONS
        for n in (None, 8, 1 << 20, 64 << 20)
        for p in (2, 5, 64)
        for o in ("sum", "noncommutative")
        for h in Hint
    ]
    here = [_plan(c) for c in grid]
    script = (
        "import json, sys\n"
        "from tests.selection.test_plan import _plan, Hint\n"
        "grid = json.load(sys.stdin)\n"
        "for c in grid:\n"
        "    c['channels'] = [tuple(x) for x in c['channels']]; c['hint'] = Hint(c['hint'])\n"
        "print(json.dumps([_plan(c) for c in grid]))\n"
    )
    payload = json.dumps([dict(c, hint=c["hint"].value) for c in grid])
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            input=payload,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=120,
            check=True,
        )
        assert json.loads(out.stdout) == here


def test_hints_pick_different_plans_where_the_model_says_so() -> None:
    kw = dict(num_peers=8, channels=CHANNELS[1:4], models=MODELS, operator=fmi.SUM)
    fast = plan("bcast", nbytes=8, hint=Hint.FAST, **kw)
    cheap = plan("bcast", nbytes=8, hint=Hint.CHEAP, **kw)
    assert fast.seconds <= cheap.seconds and cheap.usd <= fast.usd
    assert fast.ident != cheap.ident


def test_overrides_and_bad_overrides() -> None:
    kw = dict(nbytes=1 << 20, num_peers=4, channels=CHANNELS[:4], models=MODELS)
    assert plan("bcast", channel="s3", **kw).channel == "s3"
    chosen = plan("allreduce", algorithm="mediated:root", operator=fmi.SUM, **kw)
    assert (chosen.family, chosen.algorithm) == ("mediated", "root")
    with pytest.raises(fmi.ArgumentError, match="valid choices"):
        plan("allreduce", algorithm="ring", operator=fmi.SUM, is_array=False, **kw)
    with pytest.raises(fmi.ArgumentError, match="not enabled"):
        plan("bcast", channel="mpi", **kw)
    with pytest.raises(fmi.ArgumentError, match="no collective"):
        plan("broadcast", **kw)


def test_fmi_model_section_is_converted_to_si_units() -> None:
    cfg = Config.load(ROOT / "config" / "fmi.json")
    models = load_models(cfg.model)
    assert models["s3"].overhead == pytest.approx(40.578e-3)
    assert models["s3"].bandwidth == pytest.approx(50e6)
    assert models["s3"].request_prices["GetObject"] == pytest.approx(4e-7)
    assert models["redis"].aggregate_bandwidth == pytest.approx(400e6)
    assert models["tcp"].overhead == pytest.approx(0.34e-3)
    assert models["tcp"].infra_per_hour == pytest.approx(0.0134)
    ours = load_models({"tcp": {"overhead_s": 2e-5, "bandwidth_Bps": 3e9}})
    assert (ours["tcp"].overhead, ours["tcp"].bandwidth) == (2e-5, 3e9)
    with pytest.raises(fmi.ConfigError):
        load_models({"tcp": {"overhead": "fast"}})


# ---------------------------------------------------------------- every plan runs


def _direct_plans(op: str, operator: fmi.Op | None, is_array: bool) -> list[str]:
    return sorted(
        {
            f"{p.family}:{p.algorithm}"
            for p in plans(
                op,
                nbytes=64,
                num_peers=4,
                channels=[("memory", "direct")],
                models=MODELS,
                operator=operator,
                is_array=is_array,
                elements=64,
            )
        }
    )


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
async def test_every_direct_plan_runs_correctly(size: int) -> None:
    async with fmi.local_peers(size, timeout=20) as comms:
        for case, (kind, op) in REDUCTIONS.items():
            values = [value(kind, r) for r in range(size)]
            arr = isinstance(values[0], np.ndarray)
            want = reference_fold(op, values)
            for name in ("allreduce", "reduce", "scan", "exscan"):
                for alg in _direct_plans(name, op, arr):
                    if name == "allreduce":
                        got = await asyncio.gather(
                            *(c.allreduce(values[c.rank], op=op, algorithm=alg) for c in comms)
                        )
                        for g in got:
                            assert_same(g, want, f"{case} {alg}")
                    elif name == "reduce":
                        got = await asyncio.gather(
                            *(
                                c.reduce(values[c.rank], op=op, root=size - 1, algorithm=alg)
                                for c in comms
                            )
                        )
                        assert_same(got[-1], want, f"{case} {alg}")
                    else:
                        fn = "scan" if name == "scan" else "exscan"
                        got = await asyncio.gather(
                            *(getattr(c, fn)(values[c.rank], op=op, algorithm=alg) for c in comms)
                        )
                        for r, g in enumerate(got):
                            if fn == "scan":
                                ref = reference_fold(op, values[: r + 1])
                            else:
                                ref = None if r == 0 else reference_fold(op, values[:r])
                            assert_same(g, ref, f"{fn} {case} {alg} rank {r}")
        stats = comms[0].stats()
        assert stats["predicted"]["seconds"] >= 0 and stats["cost"]["total_usd"] >= 0


def test_compute_entry_of_the_model_section() -> None:
    """``model.compute.reduce_bandwidth_Bps`` sets gamma; bad values say what to fix."""
    config = Config.from_dict({"model": {"Compute": {"reduce_bandwidth_Bps": 5e8}}})
    models = load_cost_model(config.model)
    assert models.reduce_bandwidth == 5e8
    assert load_cost_model({}).reduce_bandwidth == REDUCE_BANDWIDTH
    with pytest.raises(ConfigError, match="reduce_bandwidth_Bps"):
        load_cost_model({"compute": {"reduce_bandwidth_Bps": 0}})
    with pytest.raises(ConfigError, match="unknown keys"):
        load_cost_model({"compute": {"flops": 1}})
    # A slower fold makes every reduction slower, and nothing else.
    slow = load_cost_model({"compute": {"reduce_bandwidth_Bps": 1e6}})
    kw = {"nbytes": 1 << 20, "num_peers": 4, "channels": [("tcp", "direct")]}
    for op, extra in [("allreduce", {"operator": fmi.SUM}), ("bcast", {})]:
        fast_plans = plans(op, models=models, **kw, **extra)  # type: ignore[arg-type]
        slow_plans = plans(op, models=slow, **kw, **extra)  # type: ignore[arg-type]
        for f, s in zip(fast_plans, slow_plans, strict=True):
            assert (s.seconds > f.seconds) if op == "allreduce" else (s.seconds == f.seconds)


@pytest.mark.parametrize("peers", [2, 3, 4, 5, 8, 16])
def test_folds_count_what_the_algorithms_fold(peers: int) -> None:
    """Whole-group folds: (P-1) operands of n for every algorithm that folds each
    operand once; recursive doubling folds on every peer in every round."""
    n = 1000.0
    shape = Shape("allreduce", n, peers, 0, fmi.SUM, True, 1000)
    every = (peers - 1) * n
    for alg in ("ring", "linear"):
        path, total = folds("direct", alg, shape)
        assert total == every and 0 < path <= total
    pof2 = 1 << (peers.bit_length() - 1)
    path, total = folds("direct", "recursive_doubling", shape)
    levels = pof2.bit_length() - 1
    assert total == (pof2 * levels + peers - pof2) * n >= every
    assert path == (levels + (peers != pof2)) * n
    for alg in ("root", "split"):
        assert folds("mediated", alg, shape)[1] == every
    assert folds("direct", "binomial", Shape("bcast", n, peers, 0, None, True, 1000)) == (0, 0)


def test_one_event_loop_two_peers_allreduce_folds_once() -> None:
    """On a channel whose peers share one event loop, recursive doubling and a
    reduce-then-bcast move the same bytes at P = 2, but recursive doubling
    folds on both peers: the model picks the one that folds once."""
    chosen = plan(
        "allreduce",
        nbytes=8 << 20,
        num_peers=2,
        channels=[("memory", "direct")],
        models=MODELS,
        operator=fmi.SUM,
        is_array=True,
        elements=1 << 20,
        hint=Hint.FAST,
    )
    assert chosen.algorithm == "linear", chosen


def _allreduce(models: CostModel, channel: str, nbytes: int, peers: int = 8) -> str:
    chosen = plan(
        "allreduce",
        nbytes=nbytes,
        num_peers=peers,
        channels=[(channel, "mediated")],
        models=models,
        operator=fmi.SUM,
        is_array=True,
        elements=nbytes // 8,
    )
    return f"{chosen.family}:{chosen.algorithm}"


@pytest.mark.parametrize("channel", ["redis", "s3", "dynamodb"])
def test_small_storage_allreduce_is_not_split(channel: str) -> None:
    # A k-means iteration over storage (8 peers, k x d sums and k counts):
    # both storage-native allreduces take four request times, but the split
    # one makes 3(P-1)+1 requests on every peer against at most P on one, and
    # a peer's requests in flight do not overlap their own client work.
    for nbytes in (64, 1024):
        assert _allreduce(MODELS, channel, nbytes) == "mediated:root"
    # Large arrays still split (each peer moves about twice the array).
    assert _allreduce(MODELS, channel, 8 << 20) == "mediated:split"


def test_fan_out_is_what_separates_root_from_split() -> None:
    models = load_cost_model({"s3": {"request_gap_s": 0.0}})
    assert models.channel("s3").request_gap == 0.0
    m = MODELS.channel("s3")
    assert m.request_gap > 0 and m.fan_out(1) == 0 and m.fan_out(8) == 7 * m.request_gap
    shape = {"nbytes": 1024, "num_peers": 8, "channels": [("s3", "mediated")]}
    kw = {"operator": fmi.SUM, "is_array": True, "elements": 128}
    with_gap = {p.algorithm: p.seconds for p in plans("allreduce", models=MODELS, **shape, **kw)}
    without = {p.algorithm: p.seconds for p in plans("allreduce", models=models, **shape, **kw)}
    # Rank 0 fetches P-1 values at once; every split peer fans out 2(P-1), then P-1.
    assert with_gap["root"] - without["root"] == pytest.approx(6 * m.request_gap)
    assert with_gap["split"] - without["split"] == pytest.approx((13 + 6) * m.request_gap)


def test_calibrated_storage_on_one_machine_keeps_the_root_allreduce() -> None:
    # What `fmi calibrate` wrote for S3 on a moto server (peers of the
    # measurement in one process): a request costs 13.7 ms and the work of the
    # whole group is done one request at a time.  A direct allreduce over storage
    # then pays every request a message makes (put, get and the reader's delete),
    # as the storage-native one does: it was counted at two, and direct:linear won.
    calibrated = load_cost_model(
        {
            "s3": {
                "overhead_s": 0.0137186,
                "bandwidth_Bps": 3.38906e8,
                "aggregate_bandwidth_Bps": 7.08389e7,
                "concurrency": 1.0,
            }
        }
    )
    for nbytes in (64, 1024):
        assert _allreduce(calibrated, "s3", nbytes) == "mediated:root"
