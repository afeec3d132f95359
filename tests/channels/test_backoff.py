"""The retry/polling policy object shared by the storage channels."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from fmi_async.channels.backoff import Backoff, poll_until
from fmi_async.channels.options import StorageOptions, parse_options
from fmi_async.errors import ConfigError


def _s3(raw: dict[str, object]) -> StorageOptions:
    """A storage backend's section as its typed options (what the channel reads)."""
    return parse_options(StorageOptions, raw, "S3")


def take(backoff: Backoff, n: int, seed: int = 0) -> list[float]:
    return list(itertools.islice(backoff.delays(random.Random(seed)), n))


def test_delays_grow_by_the_multiplier_up_to_the_maximum() -> None:
    assert take(Backoff(initial=0.01, maximum=0.05, multiplier=2, jitter=0), 5) == pytest.approx(
        [0.01, 0.02, 0.04, 0.05, 0.05]
    )


def test_jitter_stays_within_the_random_fraction() -> None:
    backoff = Backoff(initial=0.1, maximum=0.1, multiplier=1, jitter=0.5)
    delays = take(backoff, 200, seed=3)
    assert all(0.05 <= d <= 0.1 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # actually random


def test_options_honour_fmi_milliseconds_and_our_keys() -> None:
    assert Backoff.from_options(_s3({"timeout": 20})).initial == pytest.approx(0.02)
    mixed = Backoff.from_options(_s3({"timeout": 20, "backoff_initial": 0.001}))
    assert mixed.initial == pytest.approx(0.001)
    big = Backoff.from_options(_s3({"timeout": 2000}))
    assert big.maximum >= big.initial == pytest.approx(2.0)


@pytest.mark.parametrize(
    "options",
    [
        {"backoff_initial": 0},
        {"backoff_initial": 1, "backoff_max": 0.5},
        {"backoff_multiplier": 0.5},
        {"backoff_jitter": 2},
        {"timeout": "fast"},
        {"backoff_max": True},
    ],
)
def test_bad_options_are_config_errors_naming_the_key(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"backoff|backends\.S3"):
        Backoff.from_options(_s3(options))


async def test_poll_until_returns_the_first_result() -> None:
    calls = 0

    async def attempt() -> str | None:
        nonlocal calls
        calls += 1
        return "done" if calls == 4 else None

    loop = asyncio.get_running_loop()
    fast = Backoff(initial=0.001, maximum=0.002)
    assert await poll_until(attempt, loop.time() + 5, fast) == "done"
    assert calls == 4


async def test_poll_until_gives_up_at_the_deadline_after_a_last_attempt() -> None:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def attempt() -> int | None:
        times.append(loop.time())
        return None

    start = loop.time()
    assert await poll_until(attempt, start + 0.3, Backoff(initial=0.05, maximum=10)) is None
    # The last attempt is made at the deadline, not after the next (up to 10 s)
    # wait; the upper bounds leave room for a loaded host's scheduling delays.
    assert 0.3 <= times[-1] - start < 1.0
    assert loop.time() - start < 1.0
