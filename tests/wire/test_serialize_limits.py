"""The serializer's depth and count limits: SerializationError before anything is sent.

A value nested deeper than ``limits.max_depth`` or holding more than
``limits.max_items`` list, tuple and dict entries is refused by the peer
that sends it, before its collective's first message; the other peers hear
of it as an abort at once instead of waiting out the deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.config import Config
from fmi_async.errors import AbortedError, ConfigError, SerializationError
from fmi_async.wire import Limits, dumps, loads
from fmi_async.wire.serialize import MAX_DEPTH_CEILING

P = 3
DEADLINE = 30.0  # the communicators' timeout: the failure must be seen long before it
SOON = 5.0


def nested_list(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def nested_tuple(depth: int) -> Any:
    value: Any = ()
    for _ in range(depth):
        value = (value,)
    return value


DEEP = {
    "list": nested_list(10_000),
    "dict": nested_dict(10_000),
    "tuple": nested_tuple(10_000),
    "dict key": {nested_tuple(10_000): 1},
    "mixed": [{"x": (nested_list(10_000),)}],
}


@pytest.mark.parametrize("serializer", ["msgpack", "pickle"])
@pytest.mark.parametrize("limits", [None, Limits()], ids=["no limits", "default limits"])
@pytest.mark.parametrize("what", sorted(DEEP))
def test_deep_nesting_is_a_serialization_error(
    what: str, limits: Limits | None, serializer: str
) -> None:
    with pytest.raises(SerializationError) as info:
        dumps(DEEP[what], serializer, limits)
    assert not isinstance(info.value, RecursionError)


def test_the_depth_limit_is_exact_and_names_itself() -> None:
    limits = Limits(max_depth=8)
    # 8 levels of containers (the innermost list is the 8th) travel, 9 do not.
    assert loads(dumps(nested_list(7), limits=limits)) == nested_list(7)
    assert loads(dumps(nested_tuple(7), limits=limits)) == nested_tuple(7)
    with pytest.raises(SerializationError, match="max_depth"):
        dumps(nested_list(8), limits=limits)
    with pytest.raises(SerializationError, match="max_depth"):
        dumps(nested_dict(8), limits=limits)
    # The default carries what real programs nest.
    value = nested_dict(100)
    assert loads(dumps(value, limits=Limits())) == value


def test_entries_are_counted_over_the_whole_value() -> None:
    limits = Limits(max_items=10)
    assert loads(dumps(list(range(10)), limits=limits)) == list(range(10))
    with pytest.raises(SerializationError, match="max_items"):
        dumps(list(range(11)), limits=limits)
    with pytest.raises(SerializationError, match="max_items"):
        dumps({i: i for i in range(11)}, limits=limits)
    # 3 outer entries plus 3 x 3 inner ones: 12 entries in all
    with pytest.raises(SerializationError, match="max_items"):
        dumps([(1, 2, 3)] * 3, limits=limits)
    with pytest.raises(SerializationError, match="max_items"):
        dumps([(1, 2, 3)] * 3, "pickle", limits)
    # An array is one buffer, whatever its length.
    out = loads(dumps([np.arange(1000)], limits=limits))
    assert np.array_equal(out[0], np.arange(1000))


def test_the_frame_limits_are_checked_when_the_value_is_serialized() -> None:
    with pytest.raises(fmi.MessageTooLarge):
        dumps(b"x" * 5000, limits=Limits(max_total=1000))
    with pytest.raises(fmi.MessageTooLarge):
        dumps("x" * 5000, limits=Limits(max_header=1000))


def test_limits_are_validated_and_configurable() -> None:
    with pytest.raises(ConfigError, match="max_depth"):
        Limits(max_depth=0)
    with pytest.raises(ConfigError, match="max_depth"):
        Limits(max_depth=MAX_DEPTH_CEILING + 1)
    with pytest.raises(ConfigError, match="max_items"):
        Limits(max_items=0)
    config = Config.from_dict({"limits": {"max_depth": 16, "max_items": 1000}})
    assert config.limits.max_depth == 16 and config.limits.max_items == 1000
    assert Config.from_dict(config.to_dict()).limits == config.limits


# ---------------------------------------------------------------- from every peer's side


async def _outcomes(comms: list[fmi.Communicator], bad: int, value: Any) -> tuple[list[Any], float]:
    start = time.monotonic()
    results = await asyncio.gather(
        *(c.allgather(value if c.rank == bad else c.rank) for c in comms), return_exceptions=True
    )
    return results, time.monotonic() - start


BAD_VALUES = {
    "deep list": lambda: DEEP["list"],
    "deep dict key": lambda: DEEP["dict key"],
    # More entries than the default max_items: one list of pointers to the same int.
    "too many entries": lambda: [0] * (Limits().max_items + 1),
}


# S3 and DynamoDB take the variants in turn (the abort travels the same way on both).
@pytest.mark.aws_split("what")
@pytest.mark.parametrize("what", sorted(BAD_VALUES))
async def test_a_too_deep_or_too_large_value_fails_every_peer_at_once(
    group: Any, what: str
) -> None:
    bad = sorted(BAD_VALUES).index(what) % P  # the culprit differs between the cases
    async with group(P, timeout=DEADLINE) as comms:
        results, took = await _outcomes(comms, bad, BAD_VALUES[what]())
        assert isinstance(results[bad], SerializationError), results
        for rank, result in enumerate(results):
            if rank != bad:
                assert isinstance(result, AbortedError), (rank, result)
                assert result.peer == bad and result.cause == "SerializationError", result
        assert took < SOON, took  # told, not a deadline waited out
        # Still in step afterwards.
        assert await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms)) == [6] * P


async def test_a_send_over_the_configured_limits_raises_before_anything_is_sent() -> None:
    config = {"timeout": DEADLINE, "limits": {"max_depth": 4, "max_items": 100}}
    async with fmi.local_peers(2, config=config) as (a, b):
        with pytest.raises(SerializationError, match="max_depth"):
            await a.send(nested_list(4), 1)
        with pytest.raises(SerializationError, match="max_items"):
            await a.send(list(range(101)), 1)
        with pytest.raises(SerializationError, match="max_depth"):
            await a.bcast(nested_dict(10), root=0)  # the root alone: checked before it sends
        await a.send("next", 1)
        assert await b.recv(0) == "next"  # nothing of the refused sends arrived first
