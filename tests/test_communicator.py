"""Communicator behaviour beyond the collective results: matching, private key
space, concurrency, deadlines, bad input, configuration and life cycle."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

import fmi_async as fmi

ROOT = Path(__file__).resolve().parent.parent


async def test_tag_matching_early_message_never_blocks(group) -> None:
    async with group(2, timeout=5) as (a, b):
        await a.send("late-tag-2", 1, tag=2)
        await a.send("first-tag-1", 1, tag=1)
        await a.send("second-tag-1", 1, tag=1)
        await a.send({"k": np.arange(3)}, 1, tag="named")
        assert await b.recv(0, tag=1) == "first-tag-1"
        assert await b.recv(0, tag=1) == "second-tag-1"
        assert await b.recv(0, tag=2) == "late-tag-2"
        got = await b.recv(0, tag="named")
        assert np.array_equal(got["k"], np.arange(3))


async def test_send_to_self_and_buffer_reuse(group) -> None:
    async with group(2, timeout=5) as (a, b):
        arr = np.arange(10)
        await a.send(arr, 0)
        await a.send(arr, 1)
        arr[:] = -1  # the sender may reuse its buffer at once
        assert np.array_equal(await a.recv(0), np.arange(10))
        assert np.array_equal(await b.recv(0), np.arange(10))


async def test_collectives_never_match_user_messages(group) -> None:
    """User messages with any tag and collectives interleave without mixing."""
    async with group(3, timeout=5) as comms:

        async def peer(c: fmi.Communicator) -> tuple[object, ...]:
            nxt, prv = (c.rank + 1) % 3, (c.rank - 1) % 3
            await c.send(("user", c.rank), nxt, tag=0)
            total = await c.allreduce(c.rank)
            await c.send(("user2", c.rank), nxt, tag=1)
            b = await c.bcast("B" if c.rank == 0 else None)
            m1 = await c.recv(prv, tag=1)
            m0 = await c.recv(prv, tag=0)
            return total, b, m0, m1

        out = await asyncio.gather(*(peer(c) for c in comms))
        for r, (total, b, m0, m1) in enumerate(out):
            assert total == 3 and b == "B"
            assert m0 == ("user", (r - 1) % 3) and m1 == ("user2", (r - 1) % 3)


async def test_concurrent_collectives_in_flight(group) -> None:
    """Several collectives started together (same order on every peer) never mix."""
    async with group(5, timeout=10) as comms:

        async def peer(c: fmi.Communicator) -> list[object]:
            return list(
                await asyncio.gather(
                    c.allreduce(c.rank),
                    c.bcast(c.rank * 100, root=3),
                    c.allgather(c.rank),
                    c.scan(np.full(4, c.rank)),
                    c.gather(str(c.rank), root=1),
                    c.allreduce(np.full(3, c.rank + 1), op=fmi.PROD),
                    c.barrier(),
                )
            )

        out = await asyncio.gather(*(peer(c) for c in comms))
        for r, res in enumerate(out):
            assert res[0] == 10
            assert res[1] == 300
            assert res[2] == [0, 1, 2, 3, 4]
            assert np.array_equal(res[3], np.full(4, sum(range(r + 1))))
            assert res[4] == (["0", "1", "2", "3", "4"] if r == 1 else None)
            assert np.array_equal(res[5], np.full(3, 120))


async def test_peer_that_never_arrives_times_out_with_names(group) -> None:
    async with group(3, timeout=5) as comms:
        start = time.monotonic()
        # Peer 2 never joins the allreduce.
        errors = await asyncio.gather(
            *(c.allreduce(1, timeout=0.5) for c in comms[:2]), return_exceptions=True
        )
        assert time.monotonic() - start < 3
        # The first to time out announces it (DESIGN.md section 8): the other one
        # raises its own CommTimeout, or AbortedError naming that timeout when the
        # announcement beats its own timer (their deadlines differ by microseconds).
        assert any(isinstance(e, fmi.CommTimeout) and isinstance(e, TimeoutError) for e in errors)
        for e in errors:
            if isinstance(e, fmi.AbortedError):
                assert e.cause == "CommTimeout" and e.peer in (0, 1), e
            else:
                assert isinstance(e, fmi.CommTimeout), e
        # Every error names the operation and the channel; the peer that waits
        # on peer 2 directly (which one depends on the plan) names it, in its
        # CommTimeout or, when the other's announcement came first, in its AbortedError.
        messages = [str(e) for e in errors]
        assert all("allreduce" in m and "channel" in m for m in messages), messages
        assert any("peer 2" in m for m in messages), messages
        with pytest.raises(fmi.CommTimeout, match=r"peer 1 .*tag 9"):
            await comms[0].recv(1, tag=9, timeout=0.2)
        # Peer 2 comes late to the allreduce the others abandoned: it is told at once
        # (direct channels) or at its first look for an abort (storage), and the group is
        # in step again, so the final barrier of close() succeeds.
        start = time.monotonic()
        with pytest.raises(fmi.AbortedError, match=r"aborted by peer [01]: CommTimeout"):
            await comms[2].allreduce(1, timeout=4)
        assert time.monotonic() - start < 2
        assert await asyncio.gather(*(c.allreduce(1) for c in comms)) == [3, 3, 3]


@pytest.mark.aws_split("first")  # S3 and DynamoDB take one each
@pytest.mark.parametrize("first", [0, 1])
async def test_the_missing_peer_is_named_whichever_peer_gives_up_first(group, first) -> None:
    # Peer ``first`` gives up well before the other, whose wait the announcement
    # then ends: the missing peer 2 is still named by whichever of them waited on it.
    async with group(3, timeout=5) as comms:
        timeouts = [3.0, 3.0]
        timeouts[first] = 0.3
        errors = await asyncio.gather(
            *(c.allreduce(1, timeout=t) for c, t in zip(comms, timeouts, strict=False)),
            return_exceptions=True,
        )
        assert isinstance(errors[first], fmi.CommTimeout), errors
        assert isinstance(errors[1 - first], fmi.AbortedError), errors
        assert errors[1 - first].peer == first, errors
        assert any("from peer 2" in str(e) for e in errors), errors
        await asyncio.sleep(0.3)  # the announcement travels to peer 2 too
        with pytest.raises(fmi.AbortedError, match=f"aborted by peer {first}: CommTimeout"):
            await comms[2].allreduce(1, timeout=2)
        assert await asyncio.gather(*(c.allreduce(1) for c in comms)) == [3, 3, 3]


async def test_bad_point_to_point_arguments_raise_before_sending(group) -> None:
    # Point-to-point calls take no sequence number: a bad one leaves nothing behind.
    # (Collective argument errors are announced to the other peers: tests/test_failures.py.)
    async with group(3, timeout=2) as comms:
        c = comms[0]
        with pytest.raises(fmi.SerializationError):
            await c.send({1, 2}, 1)
        with pytest.raises(fmi.ArgumentError, match="out of range"):
            await c.send(1, 7)
        with pytest.raises(fmi.ArgumentError):
            await c.recv(1, tag=1.5)  # type: ignore[arg-type]
        # Nothing of the above was sent: the next collectives line up.
        assert await asyncio.gather(*(x.allreduce(x.rank) for x in comms)) == [3, 3, 3]
        assert all(x.stats()["channels"][x._channel().name]["messages_sent"] >= 1 for x in comms)


async def test_mismatched_shapes_are_reported(group) -> None:
    async with group(2, timeout=2) as (a, b):
        with pytest.raises((fmi.PlanMismatchError, fmi.CommTimeout)) as info:
            await asyncio.gather(
                a.allreduce(np.zeros(3)), b.allreduce(np.zeros(4)), return_exceptions=False
            )
        assert isinstance(info.value, fmi.PlanMismatchError)
        assert "[3]" in str(info.value) and "[4]" in str(info.value)


def test_shape_mismatch_in_operator() -> None:
    with pytest.raises(fmi.ShapeMismatchError, match=r"\(3,\) and \(4,\)"):
        fmi.SUM(np.zeros(3), np.zeros(4))
    with pytest.raises(fmi.OperatorError):
        fmi.SUM("a", 1)


def test_fmi_config_loads_unchanged_and_validates() -> None:
    cfg = fmi.Config.load(ROOT / "config" / "fmi.json")
    assert cfg.enabled() == ["tcp"]
    assert cfg.backends["s3"]["bucket_name"] == "my-fmi-bucket"
    assert cfg.model["redis"]["bandwidth_single"] == 100.0
    raw = json.loads((ROOT / "config" / "fmi.json").read_text())
    assert fmi.Config.load(json.dumps(raw)) == cfg
    with pytest.raises(fmi.ConfigError, match="unknown backend"):
        fmi.Config.from_dict({"backends": {"Carrier-Pigeon": {}}})
    with pytest.raises(fmi.ConfigError, match="timeout"):
        fmi.Config.from_dict({"timeout": -1})
    with pytest.raises(fmi.ConfigError, match="unknown key"):
        fmi.Config.from_dict({"backend": {}})
    with pytest.raises(fmi.ConfigError, match="cannot read"):
        fmi.Config.load("/nonexistent/fmi.json")


async def test_life_cycle_and_repr() -> None:
    with pytest.raises(fmi.ArgumentError):
        fmi.Communicator(3, 3)
    with pytest.raises(fmi.ConfigError, match="no channel is enabled"):
        async with fmi.Communicator(0, 1):
            pass
    async with fmi.local_peers(2) as comms:
        assert "peer=0/2" in repr(comms[0]) and "open" in repr(comms[0])
        comms[0].hint(fmi.Hint.CHEAP)
        assert comms[0].stats()["hint"] == "cheap"
    assert "closed" in repr(comms[0])
    with pytest.raises(fmi.ClosedError):
        await comms[0].send(1, 1)


async def test_recv_waiter_is_woken_by_close() -> None:
    async with fmi.local_peers(2, timeout=5) as (a, _b):
        waiter = asyncio.ensure_future(a.recv(1))
        await asyncio.sleep(0)
        await a.close()
        with pytest.raises(fmi.ClosedError):
            await waiter


def test_public_api_is_curated() -> None:
    for name in fmi.__all__:
        assert hasattr(fmi, name), name
    assert issubclass(fmi.CommTimeout, TimeoutError)
    assert issubclass(fmi.BrokenChannelError, ConnectionError)
    assert all(
        issubclass(getattr(fmi, n), fmi.FMIError) for n in fmi.__all__ if n.endswith("Error")
    )
