"""The collective suite over TCP with every peer behind its own simulated NAT.

Port-restricted cone NATs (endpoint-independent mapping) can be punched, so
every pair must end up direct; symmetric NATs on both sides cannot, so every
pair goes through the rendezvous server's relay and the results must be the
same.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from tests.helpers import nat_tcp_group
from tests.reference import AFFINE, assert_same, reference_fold, value

SIZES = [2, 3, 5, 8]
EXPECTED = {"port-restricted": "direct", "symmetric": "relayed"}


async def _suite(comms: list[fmi.Communicator]) -> None:
    n = len(comms)
    for root in sorted({0, n - 1}):
        got = await _all(
            comms, lambda c: c.bcast({"x": np.arange(4)} if c.peer_id == root else None, root=root)
        )
        for g in got:
            assert_same(g, {"x": np.arange(4)}, "bcast")
    got = await _all(comms, lambda c: c.allreduce(value("array", c.peer_id), op=fmi.SUM))
    want = reference_fold(fmi.SUM, [value("array", r) for r in range(n)])
    for g in got:
        assert_same(g, want, "allreduce")
    got = await _all(comms, lambda c: c.allreduce(value("affine", c.peer_id), op=AFFINE))
    want = reference_fold(AFFINE, [value("affine", r) for r in range(n)])
    for g in got:
        assert_same(g, want, "allreduce affine")
    got = await _all(comms, lambda c: c.gather(value("scalar", c.peer_id), root=n - 1))
    assert got[n - 1] == [value("scalar", r) for r in range(n)]
    assert all(g is None for g in got[: n - 1])
    got = await _all(comms, lambda c: c.scan(value("affine", c.peer_id), op=AFFINE))
    for r, g in enumerate(got):
        assert_same(g, reference_fold(AFFINE, [value("affine", k) for k in range(r + 1)]), "scan")


async def _all(comms: list[fmi.Communicator], call: Any) -> list[Any]:
    import asyncio

    return list(await asyncio.wait_for(asyncio.gather(*(call(c) for c in comms)), 30.0))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", sorted(EXPECTED))
async def test_collectives_behind_nat(kind: str, size: int) -> None:
    start = time.monotonic()
    async with nat_tcp_group(kind)(size, timeout=20.0) as comms:
        await _suite(comms)
        pairs = [c.stats()["channels"]["tcp"]["pairs"] for c in comms]
    assert all(pairs), "every peer paired with someone"
    outcomes = {how for p in pairs for how in p.values()}
    assert outcomes == {EXPECTED[kind]}, pairs
    assert time.monotonic() - start < 30.0
