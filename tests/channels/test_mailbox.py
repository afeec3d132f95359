"""The matching layer: FIFO per (source, key), deadlines, failure propagation."""

from __future__ import annotations

import asyncio
import time

import pytest

import fmi_async as fmi
from fmi_async.channels.mailbox import Mailbox
from fmi_async.wire import Payload


def p(text: str) -> Payload:
    return Payload(text.encode())


async def test_fifo_per_source_and_key() -> None:
    box = Mailbox(0)
    box.deliver(1, ("u", 1), p("a"))
    box.deliver(2, ("u", 1), p("b"))
    box.deliver(1, ("u", 1), p("c"))
    box.deliver(1, ("u", 2), p("d"))
    assert (await box.take(1, ("u", 2), 1, "t")).header == b"d"
    assert (await box.take(1, ("u", 1), 1, "t")).header == b"a"
    assert (await box.take(1, ("u", 1), 1, "t")).header == b"c"
    assert (await box.take(2, ("u", 1), 1, "t")).header == b"b"
    assert box.pending() == 0


async def test_waiters_are_served_in_order_and_time_out() -> None:
    box = Mailbox(0)
    first = asyncio.ensure_future(box.take(1, ("u", 0), 5, "t"))
    second = asyncio.ensure_future(box.take(1, ("u", 0), 5, "t"))
    await asyncio.sleep(0)
    box.deliver(1, ("u", 0), p("x"))
    box.deliver(1, ("u", 0), p("y"))
    assert (await first).header == b"x" and (await second).header == b"y"
    start = time.monotonic()
    with pytest.raises(
        fmi.CommTimeout, match=r"peer 0 waited .* from peer 3 \(tag 4\) on channel t"
    ):
        await box.take(3, ("u", 4), 0.05, "t")
    assert time.monotonic() - start < 1
    assert "waiting=0" in repr(box)  # the expired waiter was removed


async def test_broken_source_fails_now_and_later_until_it_returns() -> None:
    box = Mailbox(0)
    box.deliver(1, ("u", 0), p("queued"))
    waiting = asyncio.ensure_future(box.take(1, ("u", 9), 5, "t"))
    await asyncio.sleep(0)
    box.fail_source(1, fmi.BrokenChannelError("gone"))
    with pytest.raises(fmi.BrokenChannelError):
        await waiting
    assert (await box.take(1, ("u", 0), 5, "t")).header == b"queued"  # nothing lost
    start = time.monotonic()
    with pytest.raises(fmi.BrokenChannelError):
        await box.take(1, ("u", 0), 5, "t")  # fails at once, not after 5 s
    assert time.monotonic() - start < 1
    # Another source is unaffected; after the source reconnects, receives wait again.
    box.deliver(2, ("u", 0), p("ok"))
    assert (await box.take(2, ("u", 0), 1, "t")).header == b"ok"
    box.clear_source(1)
    with pytest.raises(fmi.CommTimeout):
        await box.take(1, ("u", 0), 0.05, "t")
