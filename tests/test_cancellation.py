"""Cancellation is safe: a receive cancelled or timed out just as its message
arrives never loses it (DESIGN.md section 8), on the in-process, TCP and
Redis channels."""

from __future__ import annotations

import asyncio
import random

import pytest

ROUNDS = {"memory": 300, "tcp": 150, "redis": 60}


@pytest.mark.parametrize("channel", sorted(ROUNDS))
async def test_a_cancelled_receive_never_loses_its_message(
    channel: str, request: pytest.FixtureRequest
) -> None:
    from tests.helpers import GROUPS, storage_group

    group = (
        GROUPS[channel]
        if channel in GROUPS
        else storage_group(request.getfixturevalue(f"{channel}_config"))
    )
    rng = random.Random(7)
    rounds = ROUNDS[channel]
    async with group(2, timeout=20) as (a, b):
        cancelled = 0
        got: list[int] = []
        for i in range(rounds):
            waiter = asyncio.ensure_future(b.recv(0, tag=5))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            await a.send(i, 1, tag=5)
            # Give the message anywhere from no time to a little to arrive, then
            # cancel: the race lands on every side of the hand-over.
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.002))
            waiter.cancel()
            try:
                got.append(await waiter)
            except asyncio.CancelledError:
                cancelled += 1
                got.append(await b.recv(0, tag=5, timeout=10))  # it must still be there
        assert got == list(range(rounds))  # every message once, in order
        assert cancelled > 0  # the race was really run
