"""The pipelined ring allreduce: exact results in any segmentation, and the planner's cost."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.collectives import pipelined
from fmi_async.selection.model import CostModel, default_models
from fmi_async.selection.plan import plan, plans
from tests.helpers import tcp_group
from tests.reference import assert_same, reference_fold

GROUPS = {"memory": fmi.local_peers, "tcp": tcp_group}


async def each(comms: list[fmi.Communicator], fn: Any) -> list[Any]:
    return list(await asyncio.gather(*(fn(c) for c in comms)))


@pytest.mark.parametrize("channel", sorted(GROUPS))
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
async def test_ring_pipelined_equals_ring(
    channel: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments of 3 float64s: many segments, uneven chunks and short last segments;
    every element folded as the unsegmented ring folds it (bit for bit)."""
    monkeypatch.setattr(pipelined, "SEGMENT_BYTES", 24)
    async with GROUPS[channel](size, timeout=30) as comms:
        for n in (1, size + 3, 100, 1001):
            rng = np.random.default_rng(n)
            values = [rng.standard_normal(n) for _ in range(size)]
            ring = await each(comms, lambda c: c.allreduce(values[c.rank], algorithm="ring"))
            got = await each(
                comms, lambda c: c.allreduce(values[c.rank], algorithm="ring_pipelined")
            )
            for r in range(size):
                assert got[r].tobytes() == ring[r].tobytes(), f"n={n} rank={r}"
                np.testing.assert_allclose(got[r], reference_fold(fmi.SUM, values))
        # ints, MAX, 2-D and non-contiguous inputs keep their shape; inputs are not written to
        mats = [(np.arange(20).reshape(4, 5) * (r + 1) % 7).T for r in range(size)]
        before = [m.copy() for m in mats]
        got = await each(
            comms, lambda c: c.allreduce(mats[c.rank], op=fmi.MAX, algorithm="ring_pipelined")
        )
        for r, g in enumerate(got):
            assert_same(g, reference_fold(fmi.MAX, before), f"MAX 2-D rank={r}")
        for m, b in zip(mats, before, strict=True):
            assert_same(m, b, "input unchanged")
        # an operator that changes the dtype runs the unsegmented ring
        ints = [np.arange(2 * size + 1) % (r + 2) for r in range(size)]
        got = await each(
            comms, lambda c: c.allreduce(ints[c.rank], op=fmi.LAND, algorithm="ring_pipelined")
        )
        for r, g in enumerate(got):
            assert_same(g, reference_fold(fmi.LAND, ints), f"LAND rank={r}")


async def test_ring_pipelined_results_are_distinct_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results kept by the caller are never reused for the next call's result."""
    monkeypatch.setattr(pipelined, "SEGMENT_BYTES", 1 << 12)
    async with fmi.local_peers(3) as comms:
        kept = []
        for i in range(4):
            values = [np.full(1 << 18, float(r + i)) for r in range(3)]
            kept.append(
                await each(comms, lambda c: c.allreduce(values[c.rank], algorithm="ring_pipelined"))
            )
        for i, results in enumerate(kept):
            for g in results:
                assert np.all(g == 3.0 + 3 * i), i


def _plans(models: CostModel, n: int, p: int) -> dict[str, float]:
    found = plans(
        "allreduce",
        nbytes=n,
        num_peers=p,
        channels=[("tcp", "direct")],
        models=models,
        operator=fmi.SUM,
        is_array=True,
        elements=n // 8,
    )
    return {x.algorithm: x.seconds for x in found}


def test_planner_costs_the_pipelined_ring() -> None:
    """K segments cost K message overheads per step and hide all but the last
    segment's fold: chosen where folding is slow next to a message's overhead."""
    n, p = 64 << 20, 4
    defaults = CostModel(default_models())
    costs = _plans(defaults, n, p)
    assert set(costs) >= {"ring", "ring_pipelined"}
    k = pipelined.segments(n, p)
    tcp = defaults.channel("tcp")
    extra = 2 * (p - 1) * (k - 1) * tcp.overhead
    hidden = (p - 1) * (n / p - pipelined.SEGMENT_BYTES) / defaults.reduce_bandwidth
    assert costs["ring_pipelined"] - costs["ring"] == pytest.approx(extra - hidden, rel=1e-6)
    # A fast link with a slow fold: pipelining wins, and plan() picks it.
    fast = dataclasses.replace(tcp, overhead=5e-6, bandwidth=10e9, aggregate_bandwidth=10e9)
    slow_fold = CostModel({**default_models(), "tcp": fast}, reduce_bandwidth=1e9)
    costs = _plans(slow_fold, n, p)
    assert costs["ring_pipelined"] < costs["ring"]
    chosen = plan(
        "allreduce",
        nbytes=n,
        num_peers=p,
        channels=[("tcp", "direct")],
        models=slow_fold,
        operator=fmi.SUM,
        is_array=True,
        elements=n // 8,
    )
    assert chosen.algorithm == "ring_pipelined"
    # One segment per step: the same messages as the ring, and the ring wins the tie.
    small = _plans(defaults, pipelined.SEGMENT_BYTES * p, p)
    assert small["ring_pipelined"] == pytest.approx(small["ring"])
