"""TCP channel: several peers in one event loop, real loopback sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import uvloop

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.registry import channel_class
from fmi_async.channels.tcp import TCPChannel
from fmi_async.config import Config
from fmi_async.errors import (
    ArgumentError,
    AuthenticationError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    EndOfStream,
)
from fmi_async.holepunch import protocol as hp
from fmi_async.holepunch.client import RendezvousClient
from fmi_async.holepunch.net import HostNetwork
from fmi_async.holepunch.punch import Membership, authenticate
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.wire import dumps, encode_frame, loads
from tests.helpers import recv, same, send

LOOPBACK = "127.0.0.1"
SECRET = "tcp-test-secret"
MiB = 1024 * 1024


def make_config(srv: RendezvousServer, secret: str | None = SECRET, **options: Any) -> Config:
    host, port = srv.address
    data: dict[str, Any] = {
        "backends": {"TCP": {"enabled": True, "host": host, "port": port, **options}},
        "timeout": 10.0,
    }
    if secret is not None:
        data["security"] = {"secret": secret}
    return Config.from_dict(data)


@asynccontextmanager
async def tcp_peers(
    n: int, opened: list[int] | None = None, **options: Any
) -> AsyncIterator[tuple[list[TCPChannel], RendezvousServer]]:
    """``n`` TCP channels of one run (only ``opened`` ones started) and their server."""
    async with RendezvousServer(SECRET.encode()) as srv:
        config = make_config(srv, **options)
        run_id = uuid.uuid4().hex[:12]
        ids = list(range(n)) if opened is None else opened
        chans = [TCPChannel(ChannelContext(i, n, "W", run_id, config, Mailbox(i))) for i in ids]
        try:
            await asyncio.gather(*(c.open() for c in chans))
            yield chans, srv
        finally:
            await asyncio.gather(*(c.close() for c in chans))


VALUES: list[Any] = [
    None,
    True,
    -(2**70),
    3.5,
    "héllo",
    b"",
    b"x" * 10_000,
    [1, [2, (3, "4")]],
    {"a": np.arange(5, dtype=np.float32), "b": {"c": None}},
    np.zeros((0, 3)),
    np.arange(300_000, dtype=np.int64).reshape(1000, 300),  # above the one-write limit
    np.float64(2.5),
]


# ---------------------------------------------------------------- basic traffic


async def test_registry_finds_tcp_channel() -> None:
    assert channel_class("tcp") is TCPChannel
    assert TCPChannel.name == "tcp" and TCPChannel.kind == "direct"


async def test_values_roundtrip_both_ways() -> None:
    async with tcp_peers(2) as (chans, _):
        for i, value in enumerate(VALUES):
            await send(chans[0], 1, value, tag=i)
            await send(chans[1], 0, value, tag=i)
        for i, value in enumerate(VALUES):
            assert same(await recv(chans[1], 0, tag=i), value), value
            assert same(await recv(chans[0], 1, tag=i), value), value
        stats = chans[0].stats
        assert stats.messages_sent == len(VALUES) and stats.messages_received == len(VALUES)
        assert stats.bytes_sent == stats.bytes_received > 300_000 * 8
        assert stats.pairs == {1: "direct"}


async def test_tag_matching_and_fifo() -> None:
    async with tcp_peers(2) as (chans, _):
        for tag in (1, 2, 3):
            for k in range(20):
                await send(chans[0], 1, (tag, k), tag=tag)
        # Receive the last tag first: earlier tags wait in their own queues.
        for tag in (3, 1, 2):
            assert [await recv(chans[1], 0, tag) for _ in range(20)] == [
                (tag, k) for k in range(20)
            ]
        assert chans[1].mailbox.pending() == 0


async def test_send_to_self_is_a_copy() -> None:
    async with tcp_peers(2) as (chans, _):
        arr = np.arange(10_000)
        await send(chans[0], 0, arr)
        arr[:] = 0
        assert np.array_equal(await recv(chans[0], 0), np.arange(10_000))
        assert chans[0].stats.pairs == {}  # no connection needed


async def test_bad_destination() -> None:
    async with tcp_peers(2) as (chans, _):
        with pytest.raises(ArgumentError, match="peer 5"):
            await send(chans[0], 5, 1)


@pytest.mark.parametrize(
    "mib", [64, pytest.param(256, marks=pytest.mark.slow)], ids=["64MiB", "256MiB"]
)
async def test_large_array_byte_exact_and_bounded_memory(mib: int) -> None:
    """The receiver allocates the array once; the sender adds about one chunk."""
    async with tcp_peers(2) as (chans, _):
        arr = np.random.default_rng(1).integers(0, 2**63, mib * MiB // 8, dtype=np.int64)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            receiving = asyncio.create_task(chans[1].recv(0, ("u", 9), 30.0))
            await chans[0].send(1, ("u", 9), dumps(arr))
            got = loads(await receiving)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert got.dtype == arr.dtype and got.tobytes() == arr.tobytes()
        # Sender's array + everything the transfer allocated, in both peers together.
        assert (arr.nbytes + peak) / arr.nbytes < 2.5, peak / arr.nbytes


async def test_many_concurrent_senders() -> None:
    n = 6
    per_sender = 8
    async with tcp_peers(n) as (chans, _):

        async def sender(i: int) -> None:
            # Concurrent sends from one peer to one destination: frames must not interleave.
            await asyncio.gather(
                *(
                    send(chans[i], 0, np.full(40_000 * (k % 3 + 1), i * 100 + k), tag=k)
                    for k in range(per_sender)
                )
            )

        async def receiver() -> list[list[Any]]:
            return [
                [await recv(chans[0], i, tag=k, timeout=20.0) for k in range(per_sender)]
                for i in range(1, n)
            ]

        result, *_ = await asyncio.wait_for(
            asyncio.gather(receiver(), *(sender(i) for i in range(1, n))), 30.0
        )
        for i, arrays in enumerate(result, start=1):
            for k, got in enumerate(arrays):
                assert np.array_equal(got, np.full(40_000 * (k % 3 + 1), i * 100 + k))
        assert sorted(r.src for r in chans[0]._incoming if r.src is not None) == list(range(1, n))


async def test_simultaneous_exchange_all_pairs() -> None:
    n = 4
    async with tcp_peers(n) as (chans, _):
        await asyncio.wait_for(
            asyncio.gather(
                *(send(chans[i], j, (i, j)) for i in range(n) for j in range(n) if i != j)
            ),
            10.0,
        )
        for i in range(n):
            for j in range(n):
                if i != j:
                    assert await recv(chans[j], i) == (i, j)
        # One outgoing connection per destination, whoever sent first.
        assert all(sorted(c._senders) == [j for j in range(n) if j != c.peer_id] for c in chans)


# ---------------------------------------------------------------- failures


async def test_peer_that_never_registers_times_out() -> None:
    async with tcp_peers(3, opened=[0, 1], lookup_timeout=0.3) as (chans, _):
        start = time.monotonic()
        with pytest.raises(CommTimeout, match="peer 2"):
            await send(chans[0], 2, "hello?")
        assert time.monotonic() - start < 3.0
        await send(chans[0], 1, "still fine")
        assert await recv(chans[1], 0) == "still fine"


async def test_wrong_secret_fails_open() -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        chan = TCPChannel(ChannelContext(0, 2, "W", "r", make_config(srv, "other"), Mailbox(0)))
        with pytest.raises(AuthenticationError, match="secret"):
            await chan.open()
        assert not chan.is_open


async def test_unreachable_rendezvous_fails_open() -> None:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    config = Config.from_dict(
        {
            "backends": {"TCP": {"host": LOOPBACK, "port": port, "connect_timeout": 1.0}},
            "security": {"secret": SECRET},
        }
    )
    chan = TCPChannel(ChannelContext(0, 2, "W", "r", config, Mailbox(0)))
    with pytest.raises(BrokenChannelError, match=f"{LOOPBACK}:{port}"):
        await chan.open()
    assert "closed" in repr(chan)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="host and port"):
        TCPChannel(
            ChannelContext(0, 2, "W", "r", Config.from_dict({"backends": {"TCP": {}}}), Mailbox(0))
        )
    fmi_style = Config.from_dict(
        {
            "backends": {"Direct": {"host": "h", "port": 10000, "max_timeout": 1500}},
            "security": {"secret": SECRET},
        }
    )
    chan = TCPChannel(ChannelContext(0, 2, "W", "r", fmi_style, Mailbox(0)))
    assert chan.connect_timeout == 1.5 and chan.rendezvous == ("h", 10000)
    assert "new" in repr(chan)


async def raw_connection(chan: TCPChannel) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert chan.listen_address is not None
    return await asyncio.open_connection(*chan.listen_address)


async def proven_connection(
    chan: TCPChannel, src: int, secret: str | None = SECRET, **changes: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``chan`` that passed (or tried) the membership handshake as ``src``."""
    assert chan.listen_address is not None
    sock, _ = await HostNetwork().connect(chan.listen_address, timeout=3.0)
    member = Membership(
        changes.get("comm", chan.comm_name),
        changes.get("run_id", chan.run_id),
        secret.encode() if secret else None,
    )
    try:
        deadline = asyncio.get_running_loop().time() + 3.0
        dst = changes.get("dst", chan.peer_id)
        await authenticate(sock, member, src, committer=True, other=dst, deadline=deadline)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FMR\x01\xff\xff\xff\xff",  # oversize hello
        b"FMR\x01\x00\x00\x00\x00",  # empty hello
    ],
    ids=["zeros", "http", "oversize", "empty"],
)
async def test_garbage_before_hello_closes_only_that_connection(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with tcp_peers(2) as (chans, _):
        reader, writer = await raw_connection(chans[1])
        try:
            writer.write(data)
            assert await closed_by_peer(reader)
        finally:
            writer.close()
        assert "closing a connection" in caplog.text
        await send(chans[0], 1, "after garbage")
        assert await recv(chans[1], 0) == "after garbage"


@pytest.mark.parametrize(
    ("changes", "secret"),
    [
        ({"run_id": "another-run"}, SECRET),
        ({"comm": "OTHER"}, SECRET),
        ({"dst": 0}, SECRET),
        ({"src": 1}, SECRET),  # claims to be the receiver itself
        ({"src": 9}, SECRET),
        ({}, "wrong secret"),
        ({}, None),
    ],
)
async def test_impostor_on_listening_port_is_dropped(
    changes: dict[str, Any], secret: str | None
) -> None:
    """A stranger who reaches a peer's port fails the proof and never delivers a frame."""
    async with tcp_peers(3) as (chans, _):
        src = changes.pop("src", 2)
        with pytest.raises((AuthenticationError, BrokenChannelError, CommTimeout)):
            _, writer = await proven_connection(chans[1], src, secret, **changes)
            writer.close()
        # Even bytes pushed before the proof completes are never read as frames.
        raw_reader, raw_writer = await raw_connection(chans[1])
        raw_writer.writelines(encode_frame(("u", 0), dumps("forged")))
        assert await closed_by_peer(raw_reader)
        raw_writer.close()
        with pytest.raises(CommTimeout):
            await recv(chans[1], 2, timeout=0.1)


async def test_replayed_handshake_is_dropped() -> None:
    """Recorded handshake bytes are useless on a new connection: the nonce differs."""
    async with tcp_peers(3) as (chans, _):
        assert chans[1].listen_address is not None
        sock, _ = await HostNetwork().connect(chans[1].listen_address, timeout=3.0)
        member = Membership(chans[1].comm_name, chans[1].run_id, SECRET.encode())
        loop = asyncio.get_running_loop()
        mine = b"n" * hp.NONCE_LEN
        await loop.sock_sendall(
            sock, hp.encode(hp.Challenge(member.comm, member.run_id, 2, 1, mine))
        )
        # A response computed for some other nonce (as an eavesdropper would have).
        stale = hp.response_proof(
            member.secret, member.comm, member.run_id, 2, 1, b"x" * hp.NONCE_LEN, mine
        )
        await loop.sock_sendall(sock, hp.encode(hp.Response(2, stale, commit=True)))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.writelines(encode_frame(("u", 0), dumps("forged")))
        assert await closed_by_peer(reader)
        writer.close()
        with pytest.raises(CommTimeout):
            await recv(chans[1], 2, timeout=0.1)


async def test_silent_connection_closed_after_hello_timeout() -> None:
    async with tcp_peers(2, connect_timeout=0.3) as (chans, _):
        reader, writer = await raw_connection(chans[1])
        try:
            start = time.monotonic()
            assert await closed_by_peer(reader)
            assert time.monotonic() - start < 2.0
        finally:
            writer.close()


async def test_close_drops_connections_still_proving_membership() -> None:
    """Closing a channel while a connection is mid-handshake closes that socket
    at once (not at garbage collection, with a ResourceWarning)."""
    async with tcp_peers(2, connect_timeout=30.0) as (chans, _):
        reader, writer = await raw_connection(chans[1])
        try:
            await asyncio.sleep(0.2)  # accepted; its handshake waits for a hello
            await chans[1].close()
            assert await closed_by_peer(reader)
        finally:
            writer.close()


async def test_truncated_frame_fails_waiters_of_that_source() -> None:
    async with tcp_peers(3) as (chans, _):
        waiter = asyncio.create_task(recv(chans[1], 2, tag=4, timeout=10.0))
        other = asyncio.create_task(recv(chans[1], 0, tag=4, timeout=10.0))
        chans[1].encrypt = False  # plain frames (sealed ones: tests/channels/test_encryption.py)
        _, writer = await proven_connection(chans[1], 2)
        frame = b"".join(bytes(b) for b in encode_frame(("u", 3), dumps(np.arange(1000))))
        writer.write(frame)  # one whole frame, then half of the next
        writer.write(frame[: len(frame) // 2])
        await writer.drain()
        assert await recv(chans[1], 2, tag=3) is not None
        chans[1].encrypt = True  # the connection from peer 0 below is sealed
        writer.close()
        with pytest.raises(BrokenChannelError, match="middle of a message"):
            await asyncio.wait_for(waiter, 5.0)
        assert not other.done()  # other sources are unaffected
        await send(chans[0], 1, "fine", tag=4)
        assert await asyncio.wait_for(other, 5.0) == "fine"


async def test_garbage_frame_after_hello(caplog: pytest.LogCaptureFixture) -> None:
    async with tcp_peers(3) as (chans, _):
        waiter = asyncio.create_task(recv(chans[1], 2, timeout=10.0))
        chans[1].encrypt = False  # plain frames (sealed ones: tests/channels/test_encryption.py)
        reader, writer = await proven_connection(chans[1], 2)
        try:
            writer.write(b"NOT A FRAME AT ALL")
            assert await closed_by_peer(reader)
        finally:
            writer.close()
        with pytest.raises(BrokenChannelError, match="bad frame magic"):
            await asyncio.wait_for(waiter, 5.0)
        assert any(r.levelno == logging.WARNING and "magic" in r.message for r in caplog.records)


async def test_clean_close_of_sender_ends_stream() -> None:
    async with tcp_peers(2) as (chans, _):
        await send(chans[0], 1, "last words")
        waiter = asyncio.create_task(recv(chans[1], 0, tag=1, timeout=10.0))
        await chans[0].close()
        assert await recv(chans[1], 0) == "last words"  # delivered before the end
        with pytest.raises(EndOfStream, match="peer 0 closed"):
            await asyncio.wait_for(waiter, 5.0)


async def test_stalled_receiver_hits_send_deadline() -> None:
    """A peer that accepts but never reads: the send gives up, the connection goes."""
    accepted: list[socket.socket] = []
    member = Membership("W", "r", SECRET.encode())

    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen()
    listener.setblocking(False)

    async def accept_and_prove() -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        accepted.append(conn)
        await authenticate(conn, member, 1, committer=False, other=None, deadline=loop.time() + 5)

    stall_task = asyncio.create_task(accept_and_prove())
    try:
        async with RendezvousServer(SECRET.encode()) as srv:
            config = Config.from_dict(make_config(srv).to_dict() | {"timeout": 0.5})
            chan = TCPChannel(ChannelContext(0, 2, "W", "r", config, Mailbox(0)))
            await chan.open()
            try:
                client = RendezvousClient(*srv.address, SECRET.encode())
                await client.register("W", "r", 1, listener.getsockname())
                start = time.monotonic()
                with pytest.raises(CommTimeout, match="did not read"):
                    await send(chan, 1, np.zeros(64 * MiB // 8))
                assert time.monotonic() - start < 5.0
                assert not chan._senders[1].usable
            finally:
                await chan.close()
    finally:
        stall_task.cancel()
        for conn in accepted:
            conn.close()
        listener.close()


async def test_cancelled_send_invalidates_connection_then_reconnects() -> None:
    async with tcp_peers(2) as (chans, _):
        await send(chans[0], 1, "first")
        assert await recv(chans[1], 0) == "first"
        first = chans[0]._senders[1]
        (receiver,) = chans[1]._incoming
        assert receiver.transport is not None
        receiver.transport.pause_reading()  # so the next send cannot finish
        task = asyncio.create_task(send(chans[0], 1, np.ones(32 * MiB // 8), tag=1))
        for _ in range(200):  # until the frame is partly written
            if first._paused:
                break
            await asyncio.sleep(0.01)
        assert first._paused and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not first.usable  # half a frame went out: that stream is unusable
        await send(chans[0], 1, "after cancel", tag=2)  # new connection, clean stream
        assert chans[0]._senders[1] is not first
        assert await recv(chans[1], 0, tag=2) == "after cancel"


# ---------------------------------------------------------------- lifecycle


async def test_close_is_idempotent_and_fails_waiters() -> None:
    async with tcp_peers(2) as (chans, _):
        await send(chans[0], 1, 1)
        waiter = asyncio.create_task(recv(chans[0], 1, timeout=10.0))
        await asyncio.sleep(0)
        await chans[0].close()
        await chans[0].close()
        with pytest.raises(ClosedError):
            await asyncio.wait_for(waiter, 2.0)
        with pytest.raises(ClosedError):
            await send(chans[0], 1, 2)
        assert "closed" in repr(chans[0]) and "out=[]" in repr(chans[0])
        with pytest.raises(ClosedError):
            await chans[0].open()


async def test_repr_shows_connections() -> None:
    async with tcp_peers(2) as (chans, _):
        await send(chans[0], 1, 1)
        await recv(chans[1], 0)
        assert "open" in repr(chans[0]) and "out=[1]" in repr(chans[0])
        assert "in=[0]" in repr(chans[1]) and "listen=127.0.0.1:" in repr(chans[1])


def assert_nodelay(chans: list[TCPChannel]) -> None:
    transports = [s.transport for c in chans for s in c._senders.values()]
    transports += [r.transport for c in chans for r in c._incoming]
    assert transports
    for transport in transports:
        assert transport is not None
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_nodelay_on_every_socket() -> None:
    async with tcp_peers(2) as (chans, _):
        await send(chans[0], 1, 1)
        await send(chans[1], 0, 1)
        await recv(chans[0], 1)
        await recv(chans[1], 0)
        assert_nodelay(chans)


# ---------------------------------------------------------------- uvloop


async def _scenario() -> None:
    async with tcp_peers(3) as (chans, _):
        big = np.arange(4 * MiB, dtype=np.int64)
        await asyncio.gather(
            send(chans[0], 1, big), send(chans[2], 1, "small"), send(chans[1], 0, {"x": 1})
        )
        assert np.array_equal(await recv(chans[1], 0), big)
        assert await recv(chans[1], 2) == "small"
        assert await recv(chans[0], 1) == {"x": 1}
        assert_nodelay(chans)
        reader, writer = await raw_connection(chans[1])
        writer.write(b"junk" * 10)
        assert await closed_by_peer(reader)
        writer.close()
        with pytest.raises(CommTimeout):
            await recv(chans[2], 0, timeout=0.05)


def test_on_uvloop() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(_scenario(), 30.0))
        assert isinstance(runner.get_loop(), uvloop.Loop)
