"""UDP channel: several peers in one event loop, real loopback sockets.

Loss, duplication and reordering are injected by :class:`Lossy`, a seeded
wrapper around each channel's outgoing datagrams (both directions, so acks
are lost too).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.registry import channel_class
from fmi_async.channels.udp.channel import Address, DatagramSender, UDPChannel
from fmi_async.channels.udp.datagram import MAGIC, encode_data, session_tag
from fmi_async.config import Config
from fmi_async.errors import (
    ArgumentError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    EndOfStream,
)
from fmi_async.holepunch.server import RendezvousServer
from tests.helpers import recv, same, send

pytestmark = pytest.mark.both_loops  # the reliability layer runs in loop callbacks

SECRET = "udp-test-secret"
MiB = 1024 * 1024
log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail a test when a callback raised inside the event loop (it would only be logged)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield
    loop.set_exception_handler(previous)
    assert not errors, errors


def make_config(srv: RendezvousServer, **options: Any) -> Config:
    host, port = srv.address
    return Config.from_dict(
        {
            "backends": {"UDP": {"enabled": True, "host": host, "port": port, **options}},
            "timeout": 10.0,
            "security": {"secret": SECRET},
        }
    )


class Lossy:
    """Seeded loss, duplication and reordering (a short random delay) of sent datagrams."""

    def __init__(
        self,
        inner: DatagramSender,
        seed: int,
        loss: float = 0.1,
        dup: float = 0.05,
        reorder: float = 0.1,
        delay: float = 0.003,
    ) -> None:
        self.inner = inner
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder, self.delay = loss, dup, reorder, delay
        self.lost = self.duplicated = self.reordered = 0

    def sendto(self, data: bytes, addr: Address) -> None:
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            if self.rng.random() < self.reorder:
                self.reordered += 1
                later = self.rng.uniform(0, self.delay)
                asyncio.get_running_loop().call_later(later, self._late, data, addr)
            else:
                self.inner.sendto(data, addr)

    def _late(self, data: bytes, addr: Address) -> None:
        closing = getattr(self.inner, "is_closing", None)
        if closing is None or not closing():
            self.inner.sendto(data, addr)


@asynccontextmanager
async def udp_peers(
    n: int, opened: list[int] | None = None, lossy: dict[str, float] | None = None, **options: Any
) -> AsyncIterator[tuple[list[UDPChannel], RendezvousServer]]:
    """``n`` UDP channels of one run (only ``opened`` ones started) and their server."""
    async with RendezvousServer(SECRET.encode()) as srv:
        config = make_config(srv, **options)
        run_id = uuid.uuid4().hex[:12]
        ids = list(range(n)) if opened is None else opened
        chans = [UDPChannel(ChannelContext(i, n, "W", run_id, config, Mailbox(i))) for i in ids]
        for chan in chans:
            if lossy is not None:
                chan.wrap_transport = lambda t, seed=chan.peer_id: Lossy(t, seed, **lossy)
        try:
            await asyncio.gather(*(c.open() for c in chans))
            yield chans, srv
        finally:
            await asyncio.gather(*(c.close() for c in chans))


VALUES: list[Any] = [
    None,
    -(2**70),
    "héllo",
    b"",
    b"x" * 10_000,
    [1, [2, (3, "4")]],
    {"a": np.arange(5, dtype=np.float32), "b": {"c": None}},
    np.zeros((0, 3)),
    np.arange(100_000, dtype=np.int64).reshape(1000, 100),  # above the copy limit
    np.float64(2.5),
]


# ---------------------------------------------------------------- basic traffic


async def test_registry_finds_udp_channel() -> None:
    assert channel_class("udp") is UDPChannel
    assert UDPChannel.name == "udp" and UDPChannel.kind == "direct"


async def test_values_roundtrip_both_ways() -> None:
    async with udp_peers(2) as (chans, _):
        for i, value in enumerate(VALUES):
            await asyncio.gather(send(chans[0], 1, value, tag=i), send(chans[1], 0, value, tag=i))
        for i, value in enumerate(VALUES):
            assert same(await recv(chans[1], 0, tag=i), value), value
            assert same(await recv(chans[0], 1, tag=i), value), value
        stats = chans[0].stats
        assert stats.messages_sent == len(VALUES) == stats.messages_received
        assert stats.bytes_sent == stats.bytes_received > 100_000 * 8
        assert stats.pairs == {1: "direct"}
        assert "udp" in repr(chans[0]).lower() and "open" in repr(chans[0])


async def test_tag_matching_and_fifo() -> None:
    async with udp_peers(2) as (chans, _):
        for tag in (1, 2, 3):
            for k in range(20):
                await send(chans[0], 1, (tag, k), tag=tag)
        for tag in (3, 1, 2):  # the last tag first: the others wait in their own queues
            got = [await recv(chans[1], 0, tag) for _ in range(20)]
            assert got == [(tag, k) for k in range(20)]
        assert chans[1].mailbox.pending() == 0


async def test_many_concurrent_senders() -> None:
    async with udp_peers(6, mtu=1200) as (chans, _):
        blob = bytes(range(256)) * 40  # several fragments each

        async def sender(chan: UDPChannel) -> None:
            await asyncio.gather(
                *(send(chan, 0, (chan.peer_id, k, blob), tag=k % 3) for k in range(30))
            )

        await asyncio.gather(*(sender(c) for c in chans[1:]))
        for src in range(1, 6):
            for tag in range(3):
                got = [await recv(chans[0], src, tag) for _ in range(10)]
                # concurrent sends of one tag keep the order they were started in
                assert got == [(src, k, blob) for k in range(tag, 30, 3)]


async def test_send_to_self_is_a_copy() -> None:
    async with udp_peers(2) as (chans, _):
        arr = np.arange(10_000)
        await send(chans[0], 0, arr)
        arr[:] = 0
        assert np.array_equal(await recv(chans[0], 0), np.arange(10_000))
        assert chans[0].stats.pairs == {}


async def test_bad_destination_and_closed_channel() -> None:
    async with udp_peers(2) as (chans, _):
        with pytest.raises(ArgumentError, match="peer 5"):
            await send(chans[0], 5, 1)
        await chans[0].close()
        with pytest.raises(ClosedError):
            await send(chans[0], 1, 1)


@pytest.mark.parametrize("mtu", [65000, 1200])
async def test_large_array_byte_exact(mtu: int) -> None:
    size = 64 * MiB if mtu > 1200 else 8 * MiB
    arr = np.random.default_rng(7).integers(0, 2**63, size // 8, dtype=np.int64)
    async with udp_peers(2, mtu=mtu) as (chans, _):
        start = time.perf_counter()
        _, got = await asyncio.gather(send(chans[0], 1, arr), recv(chans[1], 0, timeout=60))
        seconds = time.perf_counter() - start
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
        log.warning(
            "udp mtu %d: %d MiB in %.2fs = %.0f MB/s",
            mtu,
            size // MiB,
            seconds,
            size / seconds / 1e6,
        )
        print(f"udp mtu {mtu}: {size / seconds / 1e6:.0f} MB/s")


# ---------------------------------------------------------------- loss


async def test_loss_reordering_and_duplication_deliver_exactly_once_in_order() -> None:
    lossy = {"loss": 0.1, "dup": 0.05, "reorder": 0.1}
    async with udp_peers(2, lossy=lossy, mtu=1200, rto_min=0.01) as (chans, _):
        sizes = [random.Random(k).choice([10, 2000, 20_000]) for k in range(60)]
        sent = [bytes([k]) * size for k, size in enumerate(sizes)]
        start = time.perf_counter()

        async def forward() -> None:
            for k, m in enumerate(sent):
                await send(chans[0], 1, (k, m))

        async def backward() -> None:
            for k in range(30):
                await send(chans[1], 0, k)

        await asyncio.gather(forward(), backward())
        got = [await recv(chans[1], 0, timeout=20) for _ in sent]
        back = [await recv(chans[0], 1, timeout=20) for _ in range(30)]
        seconds = time.perf_counter() - start
        assert got == list(enumerate(sent)) and back == list(range(30))
        assert chans[1].mailbox.pending() == 0  # nothing delivered twice
        wrapper = chans[0]._out
        assert isinstance(wrapper, Lossy) and wrapper.lost > 0
        assert chans[0].stats.requests["retransmit"] > 0
        assert chans[1].stats.requests["duplicate"] > 0
        log.warning(
            "10%% loss: %d bytes in %.2fs, %d retransmissions, %d timeouts",
            sum(sizes),
            seconds,
            chans[0].stats.requests["retransmit"],
            chans[0].stats.requests["timeout"],
        )


# ---------------------------------------------------------------- failures


async def test_peer_that_never_registers_is_a_timeout() -> None:
    async with udp_peers(2, opened=[0], lookup_timeout=0.5) as (chans, _):
        start = time.monotonic()
        with pytest.raises(CommTimeout, match="peer 1"):
            await send(chans[0], 1, "anyone?")
        assert time.monotonic() - start < 3.0


async def test_peer_that_disappears_mid_transfer_breaks_the_send() -> None:
    fast = {"rto_initial": 0.05, "rto_max": 0.2, "retries": 4}
    async with udp_peers(2, **fast) as (chans, _):
        await send(chans[0], 1, "warm up")
        assert await recv(chans[1], 0) == "warm up"
        big = np.ones(4 * MiB, dtype=np.uint8)
        task = asyncio.create_task(send(chans[0], 1, big))
        await asyncio.sleep(0.005)
        assert chans[1]._transport is not None
        chans[1]._transport.abort()  # a crash: no goodbye
        start = time.monotonic()
        with pytest.raises(BrokenChannelError, match="peer 1 is unreachable"):
            await task
        assert time.monotonic() - start < 3.0
        with pytest.raises(BrokenChannelError):  # receives from it fail at once too
            await recv(chans[0], 1, timeout=5)


async def test_closed_peer_ends_the_stream() -> None:
    async with udp_peers(2) as (chans, _):
        await send(chans[1], 0, "last words")
        await chans[1].close()
        assert await recv(chans[0], 1) == "last words"
        with pytest.raises(EndOfStream, match="peer 1 closed"):
            await recv(chans[0], 1, timeout=5)


async def test_cancelled_large_send_still_delivers_the_original_bytes() -> None:
    async with udp_peers(2, mtu=1200) as (chans, _):
        arr = np.full(2 * MiB, 7, dtype=np.uint8)
        task = asyncio.create_task(send(chans[0], 1, arr))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        arr[:] = 0  # the caller reuses its buffer
        got = await recv(chans[1], 0, timeout=20)
        assert got.shape == arr.shape and bool((got == 7).all())


async def test_garbage_datagrams_are_dropped_and_counted() -> None:
    async with udp_peers(2) as (chans, _):
        assert chans[0].address is not None
        target = chans[0].address
        tag = session_tag("W", chans[0].run_id, SECRET.encode())
        garbage = [
            b"",
            b"\x00" * 3,
            bytes(range(256)),
            bytes([0xF5]) + b"punch me",  # reserved for hole punching, no handler here
            bytes([MAGIC]) + b"\x09" * 40,  # our magic, another version
            encode_data(tag ^ 1, 1, 0, 1, 0, True, b"other run"),
            encode_data(tag, 1, 3, 1, 0, True, b"for another peer"),
            encode_data(tag, 7, 0, 1, 0, True, b"from no peer"),
        ]
        rng = random.Random(1)
        garbage += [rng.randbytes(rng.randrange(1, 1500)) for _ in range(50)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for data in garbage:
                raw.sendto(data, target)
        for _ in range(200):  # bounded: the loop needs a few turns to read them
            if chans[0].stats.requests["dropped"] >= len(garbage) - 1:
                break
            await asyncio.sleep(0.005)
        # the empty datagram is dropped too; one may still be on its way
        assert chans[0].stats.requests["dropped"] >= len(garbage) - 1
        await send(chans[1], 0, "still fine")
        assert await recv(chans[0], 1) == "still fine"


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mtu": 50}, "mtu"),
        ({"mtu": 70000}, "mtu"),
        ({"window": 0}, "window"),
        ({"rto_max": -1}, "rto_max"),
        ({"retries": 1.5}, "retries"),
        ({"recv_buffer": "big"}, "recv_buffer"),
    ],
)
async def test_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        with pytest.raises(ConfigError, match=match):
            UDPChannel(ChannelContext(0, 2, "W", "r", make_config(srv, **options), Mailbox(0)))


async def test_missing_rendezvous_is_a_config_error() -> None:
    config = Config.from_dict({"backends": {"UDP": {"enabled": True}}})
    with pytest.raises(ConfigError, match="host and port"):
        UDPChannel(ChannelContext(0, 2, "W", "r", config, Mailbox(0)))
