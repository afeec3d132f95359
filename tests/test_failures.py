"""Failure semantics (DESIGN.md section 8), from every peer's side.

A result is right, or every peer of the collective raises an FMIError soon:
a bad argument on one peer, peers that disagree on the operator, root or
shape, a cancelled or timed-out collective -- and afterwards the
communicator still computes the right answers, on every channel.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.errors import AbortedError

P = 3
DEADLINE = 30.0  # the communicators' timeout: every failure must be seen long before it
SOON = 5.0  # seconds within which every peer must have raised (storage polls in slices)

Call = Callable[[fmi.Communicator, bool], Awaitable[Any]]

# One bad argument per class, given by one peer while the others call correctly.
BAD_CALLS: dict[str, tuple[Call, type[BaseException]]] = {
    "root -1": (lambda c, bad: c.bcast(1, root=-1 if bad else 0), fmi.RootError),
    "root too large": (lambda c, bad: c.reduce(1, root=P if bad else 1), fmi.RootError),
    "root not an int": (lambda c, bad: c.gather(1, root="0" if bad else 0), fmi.RootError),
    "scatter list length": (
        lambda c, bad: c.scatter(list(range(P - 1 if bad else P)) if c.rank == 0 else None),
        fmi.SizeMismatchError,
    ),
    "alltoall list length": (
        lambda c, bad: c.alltoall(list(range(P + 1 if bad else P))),
        fmi.SizeMismatchError,
    ),
    "unknown operator": (
        lambda c, bad: c.allreduce(1, op="median" if bad else "SUM"),
        fmi.OperatorError,
    ),
    "unserializable value": (
        lambda c, bad: c.allgather(object() if bad else 1),
        fmi.SerializationError,
    ),
    "unknown algorithm": (
        lambda c, bad: c.allreduce(1, algorithm="telepathy" if bad else None),
        fmi.ArgumentError,
    ),
    "nan timeout": (
        lambda c, bad: c.barrier(timeout=math.nan if bad else None),
        fmi.ArgumentError,
    ),
    "string timeout": (
        lambda c, bad: c.scan(1, timeout="5" if bad else None),
        fmi.ArgumentError,
    ),
}


ROOTED = {"root -1", "root too large", "root not an int", "scatter list length"}


async def _outcomes(
    comms: list[fmi.Communicator], call: Callable[[fmi.Communicator], Awaitable[Any]]
) -> tuple[list[Any], float]:
    start = time.monotonic()
    results = await asyncio.gather(*(call(c) for c in comms), return_exceptions=True)
    return results, time.monotonic() - start


# Each half of BAD_CALLS in a row on one group; S3 and DynamoDB take a half each
# (a storage peer learns of an abort at its first look, half a second in).
@pytest.mark.aws_split("half")
@pytest.mark.parametrize("half", [0, 1])
async def test_a_bad_argument_on_one_peer_fails_every_peer_and_keeps_them_in_step(
    group, half: int
) -> None:
    async with group(P, timeout=DEADLINE) as comms:
        for i, (name, (call, error)) in enumerate(BAD_CALLS.items()):
            if i % 2 != half:
                continue
            bad = i % P  # the culprit rotates over the peers
            results, took = await _outcomes(comms, lambda c: call(c, c.rank == bad))
            assert isinstance(results[bad], error), (name, results)
            for rank, result in enumerate(results):
                if rank == bad:
                    continue
                if result is None and name in ROOTED:
                    continue  # a non-root's part ended with its send: its result is None
                # The others learn who gave up and why, instead of waiting out the deadline.
                assert isinstance(result, AbortedError), (name, rank, result)
                assert result.peer == bad and result.cause == error.__name__, (name, result)
                assert f"peer {bad}" in str(result)
            assert took < SOON, (name, took)
            # Still in step: the next collective is right on every peer.
            assert await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms)) == [6] * P


async def test_the_same_bad_argument_everywhere_raises_it_everywhere(group) -> None:
    async with group(P, timeout=DEADLINE) as comms:
        results, took = await _outcomes(comms, lambda c: c.bcast(1, root=7))
        assert all(isinstance(r, fmi.RootError) for r in results), results
        assert took < SOON
        assert await asyncio.gather(*(c.allgather(c.rank) for c in comms)) == [[0, 1, 2]] * P


DISAGREEMENTS: dict[str, Callable[[fmi.Communicator], Awaitable[Any]]] = {
    "operator": lambda c: c.allreduce(c.rank + 1, op="MAX" if c.rank == P - 1 else "SUM"),
    "operator, arrays": lambda c: c.allreduce(np.arange(4.0), op="PROD" if c.rank else "SUM"),
    "root": lambda c: c.bcast(c.rank, root=1 if c.rank == 0 else 0),
    "shape": lambda c: c.allreduce(np.zeros(3 if c.rank == 1 else 4)),
    "dtype": lambda c: c.allreduce(np.zeros(4, np.float32 if c.rank == 2 else np.float64)),
    "collective": lambda c: c.allgather(1) if c.rank == 0 else c.allreduce(1),
    "algorithm": lambda c: c.allreduce(
        np.ones(8), algorithm="linear" if c.rank == 0 else "recursive_doubling"
    ),
}


# Every channel but the moto-backed two meets every disagreement; S3 and DynamoDB
# take turns (the probes travel the same way on both, and each costs them seconds).
@pytest.mark.aws_split("what")
@pytest.mark.parametrize("what", sorted(DISAGREEMENTS))
async def test_peers_that_disagree_all_raise_soon(group, what: str) -> None:
    async with group(P, timeout=DEADLINE) as comms:
        results, took = await _outcomes(comms, DISAGREEMENTS[what])
        # Never a value computed from mismatched calls: every peer that returned
        # a value is a non-root of a rooted collective (whose result is None).
        for rank, result in enumerate(results):
            assert isinstance(result, fmi.FMIError) or result is None, (what, rank, result)
        errors = [r for r in results if isinstance(r, fmi.FMIError)]
        assert errors, results
        assert any(isinstance(e, fmi.PlanMismatchError) for e in errors) or any(
            isinstance(e, AbortedError) and e.cause == "PlanMismatchError" for e in errors
        ), results
        assert took < SOON, (what, took)
        assert await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms)) == [6] * P


async def test_a_cancelled_collective_fails_the_others_and_leaves_a_usable_group(group) -> None:
    async with group(P, timeout=DEADLINE) as comms:
        tasks = [asyncio.ensure_future(c.allreduce(np.full(1000, c.rank + 1.0))) for c in comms]
        await asyncio.sleep(0)
        tasks[0].cancel()  # peer 0 gives up before anything arrived
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        for rank in range(1, P):
            r = results[rank]
            # A peer may already hold the right result; otherwise it was told.
            if isinstance(r, np.ndarray):
                assert np.array_equal(r, np.full(1000, 6.0))
            else:
                assert isinstance(r, AbortedError) and r.peer == 0, r
        assert await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms)) == [6] * P


async def test_a_timed_out_collective_is_announced_and_its_messages_evicted() -> None:
    big = 1 << 20  # 8 MiB of float64
    async with fmi.local_peers(2, timeout=DEADLINE) as (a, b):
        # a gives up before b arrives; b then learns at once instead of waiting.
        with pytest.raises(fmi.CommTimeout):
            await a.allreduce(np.ones(big), timeout=0.2)
        start = time.monotonic()
        with pytest.raises(AbortedError, match="aborted by peer 0: CommTimeout"):
            await b.allreduce(np.ones(big))
        assert time.monotonic() - start < 1.0
        await asyncio.sleep(0)
        # Nothing of the abandoned collective stays queued on either side.
        assert a._mailbox.pending() == 0 and b._mailbox.pending() == 0
        assert a._mailbox.dropped + b._mailbox.dropped >= 1
        out = await asyncio.gather(a.allreduce(np.ones(big)), b.allreduce(np.ones(big)))
        assert all(np.array_equal(o, np.full(big, 2.0)) for o in out)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, 0, "5", True, None])
async def test_timeouts_must_be_positive_finite_numbers(bad: Any) -> None:
    if bad is not None:
        with pytest.raises(fmi.ArgumentError, match="timeout"):
            fmi.Communicator(0, 1, {"backends": {"Memory": {}}}, timeout=bad)
    async with fmi.local_peers(2, timeout=5) as (a, b):
        if bad is None:
            return
        with pytest.raises(fmi.ArgumentError, match="timeout"):
            await a.recv(1, timeout=bad)
        with pytest.raises(fmi.ArgumentError, match="timeout"):
            await a.send(1, 1, timeout=bad)
        # A collective's bad timeout on both peers: both raise it, both stay in step.
        results = await asyncio.gather(
            a.allreduce(1, timeout=bad), b.allreduce(1, timeout=bad), return_exceptions=True
        )
        assert all(isinstance(r, fmi.ArgumentError) for r in results), results
        assert await asyncio.gather(a.allreduce(1), b.allreduce(2)) == [3, 3]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1, 0, "60"])
def test_config_timeout_must_be_positive_finite(bad: Any) -> None:
    with pytest.raises(fmi.ConfigError, match="timeout"):
        fmi.Config.from_dict({"timeout": bad})


async def test_failed_storage_receives_leave_no_unretrieved_task_errors(
    request: pytest.FixtureRequest,
) -> None:
    import gc

    from tests.helpers import storage_group

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        async with storage_group(request.getfixturevalue("redis_config"))(3) as comms:
            # Peers 1 and 2 never join: both of peer 0's receives fail together.
            with pytest.raises(fmi.CommTimeout):
                await comms[0].reduce_scatter(
                    np.ones(3), timeout=1.0, algorithm="mediated:fetch_fold"
                )
            # Peers 1 and 2 come late: peer 0's parts are stored, so each gets the right
            # part or is told of the abort; either way the group is in step for close.
            late = await asyncio.gather(
                *(c.reduce_scatter(np.ones(3), algorithm="mediated:fetch_fold") for c in comms[1:]),
                return_exceptions=True,
            )
            for r in late:
                assert isinstance(r, fmi.FMIError) or np.array_equal(r, [3.0]), late
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)
    assert not [c for c in reported if "never retrieved" in str(c.get("message"))], reported
