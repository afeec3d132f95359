"""Authenticated encryption of the direct channels: tcp, its relay, and udp.

The sans-IO parts (:mod:`fmi_async.wire.seal`, :mod:`fmi_async.channels.udp.sealing`)
are tested with byte strings; the channels on real loopback sockets, with
the test playing the attacker: it forges, alters and replays what it saw.
"""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.tcp import TCPChannel
from fmi_async.channels.udp import sealing as udp_sealing
from fmi_async.channels.udp.channel import Address, DatagramSender, UDPChannel
from fmi_async.channels.udp.datagram import encode_ack, session_tag
from fmi_async.channels.udp.sealing import Sealing
from fmi_async.config import Config
from fmi_async.errors import AuthenticationError, BrokenChannelError, ConfigError, ProtocolError
from fmi_async.holepunch.net import HostNetwork
from fmi_async.holepunch.proofs import stream_key, take_handshake
from fmi_async.holepunch.punch import Membership, authenticate
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.natsim import NATBox
from fmi_async.wire import FrameReader, dumps, encode_frame, loads
from fmi_async.wire.seal import (
    SEGMENT,
    DatagramOpener,
    DatagramSealer,
    ReplayWindow,
    StreamOpener,
    StreamSealer,
    derive_key,
    subkey,
)
from tests.helpers import recv, same, send

SECRET = "encryption-test-secret"
MiB = 1024 * 1024


# ---------------------------------------------------------------- sans-IO: keys and streams


def test_keys_differ_per_direction_connection_purpose_and_secret() -> None:
    base: dict[str, Any] = dict(
        secret=b"s", purpose="stream", comm="W", run_id="r", sender=0, receiver=1, salt=b"n" * 32
    )
    key = derive_key(**base)
    assert len(key) == 32 and derive_key(**base) == key  # both ends derive the same
    for change in (
        {"sender": 1, "receiver": 0},  # the other direction
        {"salt": b"m" * 32},  # another connection's nonces
        {"purpose": "datagram"},
        {"secret": b"t"},
        {"run_id": "q"},
        {"comm": "V"},
    ):
        assert derive_key(**(base | change)) != key, change


def _frame(value: Any) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in encode_frame(("u", 0), dumps(value)))


def _open_stream(opener: StreamOpener, data: bytes, rng: random.Random) -> list[Any]:
    """Feed ``data`` in random pieces, as the kernel would; the values of the frames."""
    reader = FrameReader()
    values: list[Any] = []
    pos = 0
    for _ in range(len(data) + 1):  # bounded: every turn moves at least one byte
        if pos == len(data):
            break
        dest = opener.get_buffer()
        n = min(dest.nbytes, rng.randint(1, 3 * SEGMENT // 2), len(data) - pos)
        dest[:n] = data[pos : pos + n]
        pos += n
        values += [loads(payload) for _, payload in opener.received(n, reader)]
    return values


def test_stream_records_round_trip_a_large_frame_and_small_ones() -> None:
    key = derive_key(b"s", "stream", "W", "r", 0, 1, b"n" * 32)
    sealer, opener = StreamSealer(key), StreamOpener(key)
    array = np.random.default_rng(1).random(700_000)  # 5.6 MB: 22 records
    values = ["small", array, b"x" * SEGMENT, 8]
    wire = b"".join(bytes(r) for v in values for r in sealer.seal_all(_frame(v)))
    assert sealer.records > 22
    assert b"small" not in wire and array.tobytes()[:64] not in wire  # encrypted
    got = _open_stream(opener, wire, random.Random(2))
    assert len(got) == 4 and all(same(a, b) for a, b in zip(got, values, strict=True))
    assert opener.pending == 0


@pytest.mark.parametrize("where", ["length", "body", "tag"])
def test_a_tampered_stream_byte_is_detected(where: str) -> None:
    key = derive_key(b"s", "stream", "W", "r", 0, 1, b"n" * 32)
    record = bytearray(StreamSealer(key).seal(_frame("pay me")))
    record[{"length": 3, "body": 10, "tag": len(record) - 1}[where]] ^= 0x01
    error = ProtocolError if where == "length" else AuthenticationError
    with pytest.raises((error, AuthenticationError)):
        _open_stream(StreamOpener(key), bytes(record), random.Random(0))


def test_a_dropped_repeated_or_reordered_record_fails_the_stream() -> None:
    key = derive_key(b"s", "stream", "W", "r", 0, 1, b"n" * 32)
    sealer = StreamSealer(key)
    first, second, third = (bytes(sealer.seal(_frame(i))) for i in range(3))
    for wire in (first + third, first + first, second + first):
        with pytest.raises(AuthenticationError, match="failed authentication"):
            _open_stream(StreamOpener(key), wire, random.Random(0))
    assert _open_stream(StreamOpener(key), first + second + third, random.Random(0)) == [0, 1, 2]


def test_both_ends_move_to_the_next_key_at_the_same_record() -> None:
    """Keys are used for a bounded number of blocks, then replaced (no counter wraps)."""
    key = b"k" * 32
    values = [np.arange(i * 37) for i in range(30)]
    sealer = StreamSealer(key, rekey_blocks=200)
    wire = b"".join(bytes(r) for v in values[:20] for r in sealer.seal_all(_frame(v)))
    wire += b"".join(sealer.seal_small(_frame(v)) for v in values[20:])  # the small-frame path
    assert sealer._keys.index >= 10  # many keys used
    got = _open_stream(StreamOpener(key, rekey_blocks=200), wire, random.Random(4))
    assert all(same(a, b) for a, b in zip(got, values, strict=True))
    with pytest.raises(AuthenticationError):  # an end that kept the first key fails
        _open_stream(StreamOpener(key), wire, random.Random(4))
    assert subkey(key, 0) == key and len({subkey(key, i) for i in range(5)}) == 5


def test_datagram_keys_change_with_the_counter_and_reordering_across_them_works() -> None:
    key = b"d" * 32
    sealer, opener = DatagramSealer(key, key_bits=2), DatagramOpener(key, key_bits=2)
    sent = [(c, sealer.seal(c.to_bytes(8, "big"), b"%d" % c)) for c in range(24)]
    tail = list(range(4, 24))
    random.Random(6).shuffle(tail)  # reordered within the window, across key changes
    order = [0, 1, 2, 3, *tail]
    assert order != sorted(order)
    for c in order:
        data = memoryview(sent[c][1])
        assert opener.open(data[:8], c, data[8:]) == b"%d" % c
    late = memoryview(sent[5][1])
    with pytest.raises(AuthenticationError, match=r"^replayed"):
        opener.open(late[:8], 5, late[8:])


# ---------------------------------------------------------------- sans-IO: datagrams


def test_replay_window_accepts_each_counter_once_within_the_window() -> None:
    window = ReplayWindow(64)
    verdicts = []
    for counter in (0, 5, 3, 5, 100, 36, 37, 99, 0):
        why = window.check(counter)
        verdicts.append(why)
        if why is None:
            window.mark(counter)
    assert verdicts == [None, None, None, "replayed", None, "too old", None, None, "too old"]


def test_datagram_opener_drops_forged_replayed_and_too_old() -> None:
    key = derive_key(b"s", "datagram", "W", "r", 0, 1, b"n" * 8)
    sealer, opener = DatagramSealer(key), DatagramOpener(key, window=16)
    sent = []
    for i in range(40):
        header = i.to_bytes(8, "big")
        sent.append((header, sealer.seal(header, b"payload %d" % i)))
    header, data = sent[39]
    view = memoryview(data)
    assert opener.open(view[:8], 39, view[8:]) == b"payload 39"
    with pytest.raises(AuthenticationError, match=r"^replayed"):
        opener.open(view[:8], 39, view[8:])
    old = memoryview(sent[3][1])
    with pytest.raises(AuthenticationError, match=r"^too old"):
        opener.open(old[:8], 3, old[8:])
    forged = bytearray(sent[38][1])
    forged[-1] ^= 1
    with pytest.raises(AuthenticationError, match=r"^forged"):
        opener.open(memoryview(forged)[:8], 38, memoryview(forged)[8:])
    late = memoryview(sent[30][1])  # reordered within the window: accepted
    assert opener.open(late[:8], 30, late[8:]) == b"payload 30"


def test_udp_envelope_counts_every_drop_by_reason() -> None:
    counters_a: Counter[str] = Counter()
    counters_b: Counter[str] = Counter()
    a = Sealing(b"s", "W", "r", 0, counters_a)
    b = Sealing(b"s", "W", "r", 1, counters_b)
    stranger = Sealing(b"wrong secret", "W", "r", 0, Counter())
    first = a.seal(1, b"u-datagram")
    assert b.open(first) == b"u-datagram"
    assert b.open(first) is None  # replayed
    assert b.open(stranger.seal(1, b"u-evil")) is None  # wrong key
    forged = bytearray(a.seal(1, b"u-second"))
    forged[udp_sealing.HEADER] ^= 0x80
    assert b.open(bytes(forged)) is None
    assert b.open(b"u plain datagram") is None
    assert b.open(b"\x76short") is None
    assert counters_b == Counter(dropped=5, replayed=1, forged=3, unsealed=1)
    assert a.open(a.seal(0, b"u-to-myself")) is None  # a datagram "from" ourselves is not ours
    # the reverse direction has its own key: b's datagram to a opens, a's own does not
    assert a.open(b.seal(0, b"u-back")) == b"u-back"


# ---------------------------------------------------------------- tcp


def tcp_config(srv: RendezvousServer, secret: str = SECRET, **security: Any) -> Config:
    host, port = srv.address
    return Config.from_dict(
        {
            "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
            "timeout": 10.0,
            "security": {"secret": secret, **security},
        }
    )


@asynccontextmanager
async def tcp_peers(n: int, **security: Any) -> AsyncIterator[list[TCPChannel]]:
    async with RendezvousServer(SECRET.encode()) as srv:
        config = tcp_config(srv, **security)
        run_id = uuid.uuid4().hex[:12]
        chans = [
            TCPChannel(ChannelContext(i, n, "W", run_id, config, Mailbox(i))) for i in range(n)
        ]
        try:
            await asyncio.gather(*(c.open() for c in chans))
            yield chans
        finally:
            await asyncio.gather(*(c.close() for c in chans))


async def test_tcp_round_trips_sealed_both_ways() -> None:
    array = np.arange(3 * MiB // 8, dtype=np.float64)  # 12 records
    async with tcp_peers(2) as (a, b):
        for value in ("hello", array, b"z" * 1000):
            await send(a, 1, value)
            await send(b, 0, value)
            assert same(await recv(b, 0), value) and same(await recv(a, 1), value)
        assert a.encrypt and a._senders[1].sealer is not None
        assert all(r.opener is not None for r in b._incoming)
        assert a._senders[1].sealer.records >= 14


async def test_tcp_without_encryption_still_works() -> None:
    async with tcp_peers(2, encrypt=False) as (a, b):
        await send(a, 1, np.arange(10))
        assert same(await recv(b, 0), np.arange(10))
        assert a._senders[1].sealer is None and "sealed" not in repr(a)


async def test_tcp_encrypt_without_a_secret_is_refused() -> None:
    config = Config.from_dict(
        {
            "backends": {"TCP": {"enabled": True, "host": "127.0.0.1", "port": 1}},
            "security": {"encrypt": True, "insecure": True},
        }
    )
    with pytest.raises(ConfigError, match=r"security\.encrypt"):
        TCPChannel(ChannelContext(0, 2, "W", "r", config, Mailbox(0)))


async def _attacker_connection(
    chan: TCPChannel, src: int, secret: str
) -> tuple[socket.socket, bytes]:
    """A proven connection to ``chan`` as peer ``src`` and the key its frames need."""
    assert chan.listen_address is not None
    sock, _ = await HostNetwork().connect(chan.listen_address, timeout=3.0)
    member = Membership(chan.comm_name, chan.run_id, secret.encode())
    deadline = asyncio.get_running_loop().time() + 3.0
    try:
        await authenticate(sock, member, src, committer=True, other=chan.peer_id, deadline=deadline)
    except BaseException:
        sock.close()
        raise
    handshake = take_handshake(sock)
    assert handshake is not None and (handshake.writer, handshake.reader) == (src, chan.peer_id)
    return sock, stream_key(secret.encode(), chan.comm_name, chan.run_id, handshake)


async def test_tcp_a_tampered_frame_fails_that_connection_only() -> None:
    async with tcp_peers(3) as chans:
        loop = asyncio.get_running_loop()
        sock, key = await _attacker_connection(chans[1], 2, SECRET)
        try:
            sealer = StreamSealer(key)
            await loop.sock_sendall(sock, sealer.seal(_frame("first")))
            assert await recv(chans[1], 2) == "first"
            record = sealer.seal(_frame("second"))
            record[-20] ^= 0x01  # one bit of the ciphertext, on the way
            await loop.sock_sendall(sock, record)
            with pytest.raises(BrokenChannelError, match="failed authentication"):
                await recv(chans[1], 2)
        finally:
            sock.close()
        assert chans[1].stats.requests["forged"] == 1
        await send(chans[0], 1, "others are unaffected")
        assert await recv(chans[1], 0) == "others are unaffected"


async def test_tcp_plain_frames_after_the_handshake_are_refused() -> None:
    async with tcp_peers(2) as (_, b):
        sock, _ = await _attacker_connection(b, 0, SECRET)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, _frame("unsealed"))
            with pytest.raises(BrokenChannelError, match="dropped"):
                await recv(b, 0)
        finally:
            sock.close()


async def test_tcp_wrong_secret_is_refused_before_any_frame() -> None:
    async with tcp_peers(2) as (_, b):
        with pytest.raises((AuthenticationError, BrokenChannelError)):
            await _attacker_connection(b, 0, "not the secret")
        assert b.stats.messages_received == 0


async def test_tcp_connection_keys_differ_per_connection_and_direction() -> None:
    member = Membership("W", "r", SECRET.encode())
    keys = []
    for _ in range(2):
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        try:
            deadline = asyncio.get_running_loop().time() + 5.0
            await asyncio.gather(
                authenticate(left, member, 0, committer=True, other=1, deadline=deadline),
                authenticate(right, member, 1, committer=False, other=None, deadline=deadline),
            )
            mine, theirs = take_handshake(left), take_handshake(right)
            assert mine == theirs and mine is not None  # both ends agree
            keys.append(stream_key(member.secret or b"", "W", "r", mine))
            reverse = type(mine)(1, 0, mine.reader_nonce, mine.writer_nonce)
            assert stream_key(member.secret or b"", "W", "r", reverse) != keys[-1]
        finally:
            left.close()
            right.close()
    assert keys[0] != keys[1]


async def test_relayed_tcp_pair_is_sealed_end_to_end() -> None:
    """Symmetric NAT on one side: the pair is relayed, and what the relay splices is sealed."""
    async with (
        RendezvousServer(SECRET.encode()) as srv,
        NATBox("symmetric") as sym,
        NATBox("port-restricted") as cone,
    ):
        run_id = uuid.uuid4().hex[:12]
        host, port = srv.address

        def config(box: NATBox) -> Config:
            tcp = {"enabled": True, "host": host, "port": port, "nat": box.options()}
            tcp |= {"punch_timeout": 0.5}
            return Config.from_dict(
                {"backends": {"TCP": tcp}, "timeout": 10.0, "security": {"secret": SECRET}}
            )

        a = TCPChannel(ChannelContext(0, 2, "W", run_id, config(sym), Mailbox(0)))
        b = TCPChannel(ChannelContext(1, 2, "W", run_id, config(cone), Mailbox(1)))
        await asyncio.gather(a.open(), b.open())
        try:
            value = np.arange(100_000)
            await send(a, 1, value)
            assert same(await recv(b, 0), value)
            assert a.stats.pairs == {1: "relayed"}
            assert a._senders[1].sealer is not None and a._senders[1].sealer.records >= 1
        finally:
            await asyncio.gather(a.close(), b.close())


# ---------------------------------------------------------------- udp


class Recorder:
    """Passes every datagram on and keeps a copy: what an on-path observer sees."""

    def __init__(self, inner: DatagramSender) -> None:
        self.inner = inner
        self.seen: list[tuple[bytes, Address]] = []

    def sendto(self, data: bytes, addr: Address) -> None:
        self.seen.append((bytes(data), addr))
        self.inner.sendto(data, addr)


@asynccontextmanager
async def udp_pair(**security: Any) -> AsyncIterator[tuple[UDPChannel, UDPChannel, Recorder]]:
    async with RendezvousServer(SECRET.encode()) as srv:
        host, port = srv.address
        config = Config.from_dict(
            {
                "backends": {"UDP": {"enabled": True, "host": host, "port": port}},
                "timeout": 10.0,
                "security": {"secret": SECRET, **security},
            }
        )
        run_id = uuid.uuid4().hex[:12]
        a, b = (UDPChannel(ChannelContext(i, 2, "W", run_id, config, Mailbox(i))) for i in (0, 1))
        recorders: list[Recorder] = []

        def record(out: DatagramSender) -> DatagramSender:
            recorders.append(Recorder(out))
            return recorders[-1]

        a.wrap_transport = record
        try:
            await asyncio.gather(a.open(), b.open())
            yield a, b, recorders[0]
        finally:
            await asyncio.gather(a.close(), b.close())


async def _until(condition: Any, what: str) -> None:
    for _ in range(400):  # bounded: 2 s
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def _closing_ack(a: UDPChannel, b: UDPChannel) -> bytes:
    """The forgery of the unsealed protocol: "peer 0 is closing", with the right tag
    and epoch (an on-path attacker read both in clear before datagrams were sealed)."""
    tag = session_tag(a.comm_name, a.run_id, a.config.secret)
    epoch = b._peer(0).link.sender.epoch  # an ack names the half it acknowledges
    return encode_ack(tag, 0, 1, epoch, 0, 256, [], closing=True)


@pytest.mark.both_loops
async def test_udp_forged_and_replayed_datagrams_are_dropped_counted_and_the_job_completes() -> (
    None
):
    async with udp_pair() as (a, b, observed):
        await send(a, 1, "before")
        await send(a, 1, np.arange(50_000))  # many fragments to replay
        assert await recv(b, 0) == "before"
        assert same(await recv(b, 0), np.arange(50_000))
        captured = [data for data, _ in observed.seen]
        assert captured and all(d[0] == udp_sealing.SEALED for d in captured)
        assert all(b"before" not in d for d in captured)  # encrypted
        assert b.address is not None
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for data in captured:  # replay everything it saw
                attacker.sendto(data, b.address)
            header = captured[-1][: udp_sealing.HEADER]
            counter = int.from_bytes(header[13:21], "big")
            for bump in (1, 10**6):  # the observed header, a fresh counter, its own body
                forged = header[:13] + (counter + bump).to_bytes(8, "big")
                attacker.sendto(forged + bytes(64), b.address)
            attacker.sendto(_closing_ack(a, b), b.address)  # the old one-datagram kill
            drops = len(captured) + 3
            await _until(lambda: b.stats.requests["dropped"] >= drops, "every forgery dropped")
        finally:
            attacker.close()
        requests = b.stats.requests
        assert requests["replayed"] == len(captured)
        assert requests["forged"] == 2 and requests["unsealed"] == 1
        # the job goes on, both ways
        await send(a, 1, "after")
        await send(b, 0, "reply")
        assert await recv(b, 0) == "after"
        assert await recv(a, 1) == "reply"


async def test_udp_without_encryption_falls_to_one_forged_datagram() -> None:
    """The same forgery against ``encrypt: false`` ends the stream: the test above can fail."""
    async with udp_pair(encrypt=False) as (a, b, observed):
        await send(a, 1, "before")
        assert await recv(b, 0) == "before"
        assert all(d[0] != udp_sealing.SEALED for d, _ in observed.seen)
        assert b.address is not None
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            attacker.sendto(_closing_ack(a, b), b.address)
        finally:
            attacker.close()
        await _until(lambda: b._peers[0].link.remote_closed, "the forged close taken")


async def test_udp_round_trips_sealed_with_loss_and_reordering() -> None:
    rng = random.Random(5)

    class Lossy(Recorder):
        def sendto(self, data: bytes, addr: Address) -> None:
            if rng.random() < 0.05:
                return
            if rng.random() < 0.1:
                later = rng.uniform(0, 0.003)
                asyncio.get_running_loop().call_later(later, self.inner.sendto, data, addr)
                return
            self.inner.sendto(data, addr)

    async with udp_pair() as (a, b, _):
        a.wrap_transport = None
        assert a._out is not None
        a._out = Lossy(a._out)
        value = np.random.default_rng(3).random(200_000)
        await send(a, 1, value)
        assert same(await recv(b, 0), value)
        assert b.stats.requests["forged"] == 0  # loss and reordering are not forgery
        assert a.params.mtu == 1200 - udp_sealing.OVERHEAD
