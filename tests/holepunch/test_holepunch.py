"""Pairing, arbitration, relay and failure cases of TCP hole punching (loopback only)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.tcp import TCPChannel
from fmi_async.config import Config
from fmi_async.errors import AuthenticationError, BrokenChannelError, CommTimeout
from fmi_async.holepunch import protocol as p
from fmi_async.holepunch.client import RendezvousClient
from fmi_async.holepunch.net import HostNetwork, close_socket, read_message, send_message
from fmi_async.holepunch.pairing import PairingTable
from fmi_async.holepunch.proofs import stream_key, take_handshake
from fmi_async.holepunch.punch import Membership, _punch, _relay, authenticate, pair_tcp
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.natsim import NATBox
from fmi_async.wire import dumps, encode_frame
from fmi_async.wire.seal import StreamSealer
from tests.helpers import nat_tcp_group, recv

SECRET = "punch-secret"


def config(srv: RendezvousServer, **options: Any) -> Config:
    host, port = srv.address
    # Long enough that a loaded host still punches; tests that expect the
    # relay pass a short one.
    tcp = {"host": host, "port": port, "punch_timeout": 3.0, **options}
    return Config.from_dict(
        {"backends": {"TCP": tcp}, "security": {"secret": SECRET}, "timeout": 10.0}
    )


@asynccontextmanager
async def channels(
    srv: RendezvousServer, n: int, opened: list[int] | None = None, **options: Any
) -> AsyncIterator[list[TCPChannel]]:
    run_id = uuid.uuid4().hex[:12]
    ids = list(range(n)) if opened is None else opened
    chans = [
        TCPChannel(ChannelContext(i, n, "W", run_id, config(srv, **options), Mailbox(i)))
        for i in ids
    ]
    try:
        await asyncio.gather(*(c.open() for c in chans))
        yield chans
    finally:
        await asyncio.gather(*(c.close() for c in chans))


async def send(chan: TCPChannel, dst: int, value: Any, tag: int = 0) -> None:
    await asyncio.wait_for(chan.send(dst, ("u", tag), dumps(value)), 10.0)


# ---------------------------------------------------------------- pairing table (no I/O)


def test_pairing_table_arbitrates_the_same_verdict_for_both() -> None:
    table = PairingTable(join_timeout=10.0, result_timeout=5.0, keep=30.0, max_pairings=4)
    key = ("c", "r", "tcp", 0, 1)
    first = table.join(key, 0, ("203.0.113.1", 5000), ("10.0.0.2", 4000), now=0.0)
    assert first is not None and not first.complete
    second = table.join(key, 1, ("198.51.100.1", 6000), ("10.1.0.2", 4001), now=1.0)
    assert second is first and first.complete
    assert table.report(key, 0, True, now=2.0) is None  # waits for the other side
    assert table.report(key, 1, False, now=2.5) == "relay"  # one failure: relay for both
    assert table.report(key, 0, True, now=3.0) == "relay"  # never changes afterwards
    assert table.relay_allowed("c", "r", 0, 1, now=3.0)
    assert not table.relay_allowed("c", "r", 1, 0, now=3.0)
    assert not table.relay_allowed("c", "r", 0, 1, now=40.0)  # remembered for `keep` only

    key2 = ("c", "r", "tcp", 2, 3)
    table.join(key2, 2, ("h", 1), ("l", 1), now=0.0)
    table.join(key2, 3, ("h", 2), ("l", 2), now=0.0)
    table.report(key2, 2, True, now=1.0)
    assert table.report(key2, 3, True, now=1.0) == "direct"
    assert not table.relay_allowed("c", "r", 2, 3, now=1.0)


def test_pairing_table_expiry_silence_and_bounds() -> None:
    table = PairingTable(join_timeout=10.0, result_timeout=5.0, keep=30.0, max_pairings=2)
    key = ("c", "r", "tcp", 0, 1)
    table.join(key, 0, ("h", 1), ("l", 1), now=0.0)
    assert [pp.key for pp in table.expire(now=10.0)] == [key]  # the other side never joined
    assert table.get(key) is None
    assert table.report(key, 0, True, now=10.0) is None  # an expired join has no say

    table.join(key, 0, ("h", 1), ("l", 1), now=20.0)
    table.join(key, 1, ("h", 2), ("l", 2), now=20.0)
    table.report(key, 0, True, now=21.0)
    assert not table.overdue(key, now=25.0)
    assert table.overdue(key, now=26.0)  # the other side fell silent: the server decides
    assert table.decide(key, "relay", now=26.0) == "relay"

    assert table.join(("c", "r", "tcp", 5, 6), 5, ("h", 1), ("l", 1), now=27.0) is not None
    assert table.join(("c", "r", "tcp", 7, 8), 7, ("h", 1), ("l", 1), now=27.0) is None  # full
    # A decided pairing joined again starts afresh.
    again = table.join(key, 0, ("h", 9), ("l", 9), now=28.0)
    assert again is not None and again.outcome is None and list(again.sides) == [0]


def test_pairing_table_reuses_a_tcp_relay_verdict_for_the_same_two_peers() -> None:
    table = PairingTable(
        join_timeout=10.0, result_timeout=5.0, keep=30.0, relay_memory=100.0, max_pairings=4
    )
    forth, back = ("c", "r", "tcp", 0, 1), ("c", "r", "tcp", 1, 0)
    table.join(forth, 0, ("h", 1), ("l", 1), now=0.0)
    table.join(forth, 1, ("h", 2), ("l", 2), now=0.0)
    table.report(forth, 0, False, now=1.0)
    assert table.report(forth, 1, False, now=1.0) == "relay"
    assert table.remembered_relay("c", "r", 1, 0, now=1.0)

    # The other direction: relay once both joined, before anyone punched.
    first = table.join(back, 1, ("h", 3), ("l", 3), now=2.0)
    assert first is not None and first.outcome is None  # one side alone learns nothing
    second = table.join(back, 0, ("h", 4), ("l", 4), now=2.0)
    assert second is first and first.reused and first.outcome == "relay"
    assert table.report(back, 1, True, now=2.5) == "relay"  # a late report changes nothing
    assert table.relay_allowed("c", "r", 1, 0, now=2.5) and table.reused == 1

    # Other runs and UDP pairings of the same peers are not affected.
    udp = ("c", "r", "udp", 1, 0)
    table.join(udp, 1, ("h", 5), ("l", 5), now=3.0)
    assert (pairing := table.join(udp, 0, ("h", 6), ("l", 6), now=3.0)) is not None
    assert pairing.outcome is None and not pairing.reused
    assert not table.remembered_relay("c", "other-run", 0, 1, now=3.0)

    # Reused verdicts do not extend the memory; it ends after relay_memory.
    assert table.remembered_relay("c", "r", 0, 1, now=100.9)  # decided at 1.0
    assert not table.remembered_relay("c", "r", 0, 1, now=101.0)
    table.expire(now=101.0)
    table.join(forth, 0, ("h", 7), ("l", 7), now=101.0)
    again = table.join(forth, 1, ("h", 8), ("l", 8), now=101.0)
    assert again is not None and again.outcome is None  # punches afresh

    # A direct verdict is never reused.
    table2 = PairingTable(join_timeout=10.0, result_timeout=5.0, keep=30.0, max_pairings=2)
    table2.join(forth, 0, ("h", 1), ("l", 1), now=0.0)
    table2.join(forth, 1, ("h", 2), ("l", 2), now=0.0)
    table2.report(forth, 0, True, now=1.0)
    assert table2.report(forth, 1, True, now=1.0) == "direct"
    table2.join(back, 1, ("h", 3), ("l", 3), now=2.0)
    direct = table2.join(back, 0, ("h", 4), ("l", 4), now=2.0)
    assert direct is not None and direct.outcome is None and not direct.reused


def test_pairing_table_bounds_remembered_relays() -> None:
    table = PairingTable(
        join_timeout=10.0, result_timeout=5.0, keep=1.0, relay_memory=100.0, max_pairings=2
    )
    for now, (a, b) in zip((0.0, 10.0, 20.0), ((0, 1), (2, 3), (4, 5)), strict=True):
        key = ("c", "r", "tcp", a, b)
        table.join(key, a, ("h", 1), ("l", 1), now=now)
        table.join(key, b, ("h", 2), ("l", 2), now=now)
        table.decide(key, "relay", now=now)
    assert not table.remembered_relay("c", "r", 0, 1, now=21.0)  # the oldest was dropped
    assert table.remembered_relay("c", "r", 2, 3, now=21.0)
    assert table.remembered_relay("c", "r", 5, 4, now=21.0)


# ---------------------------------------------------------------- pairing over sockets


async def test_punching_on_loopback_without_nat() -> None:
    async with RendezvousServer(SECRET.encode()) as srv, channels(srv, 3, traversal="punch") as c:
        await send(c[0], 1, "a")
        await send(c[1], 0, "b")
        await send(c[2], 0, "c")
        assert [await recv(c[1], 0), await recv(c[0], 1), await recv(c[0], 2)] == ["a", "b", "c"]
        assert c[0].stats.pairs == {1: "direct", 2: "direct"}
        assert c[2].stats.pairs == {0: "direct"}


async def test_auto_traversal_connects_plainly_without_nat() -> None:
    async with RendezvousServer(SECRET.encode()) as srv, channels(srv, 2) as c:
        await send(c[0], 1, "plain")
        assert await recv(c[1], 0) == "plain"
        assert len(srv.pairings) == 0  # no pairing was needed
        assert c[0].stats.pairs == {1: "direct"}


async def test_join_with_wrong_secret_is_rejected() -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        member = Membership("W", "r", b"not the secret")
        with pytest.raises(AuthenticationError, match=r"security\.secret"):
            await pair_tcp(
                HostNetwork(),
                srv.address,
                member,
                0,
                0,
                1,
                join_timeout=1.0,
                punch_timeout=0.5,
                step_timeout=2.0,
            )
        assert len(srv.pairings) == 0


async def test_peer_that_never_shows_times_out_naming_it() -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        # Peer 1 registers (so the lookup succeeds) but never takes part in a pairing.
        client = RendezvousClient(*srv.address, SECRET.encode())
        async with channels(srv, 2, opened=[0], traversal="punch", lookup_timeout=0.5) as c:
            await client.register("W", c[0].run_id, 1, ("127.0.0.1", 9))
            start = time.monotonic()
            with pytest.raises(CommTimeout, match=r"peer 1 .*did not"):
                await send(c[0], 1, "anyone?")
            assert time.monotonic() - start < 3.0


async def test_result_for_expired_pairing_is_refused() -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        sock, _ = await HostNetwork().connect(srv.address, timeout=2.0)
        try:
            result = p.sign(p.PunchResult("W", "r", 0, 0, 1, "tcp", True), SECRET.encode())
            deadline = asyncio.get_running_loop().time() + 2.0
            await send_message(sock, result, deadline, "server")
            answer = await read_message(sock, deadline, "server")
            assert isinstance(answer, p.Error) and answer.code == "expired"
        finally:
            close_socket(sock)


async def test_relay_refused_without_a_relay_verdict() -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        member = Membership("W", "r", SECRET.encode())
        with pytest.raises(Exception, match="no relay verdict"):
            await _relay(HostNetwork(), srv.address, member, 0, 0, 1, 2.0, "server")


async def test_impostor_on_punched_port_is_dropped_and_relay_carries_the_pair() -> None:
    """A stranger reaching the punched endpoint cannot deliver a frame.

    Peer 0 is played by the test: it joins the pairing as itself, then lets
    an impostor (who knows the endpoint but not the secret) connect to peer
    1's punched port, reports failure, and finally talks through the relay.
    """
    async with (
        RendezvousServer(SECRET.encode()) as srv,
        channels(srv, 2, opened=[1], traversal="punch", punch_timeout=1.0) as c,
    ):
        (chan,) = c
        loop = asyncio.get_running_loop()
        net = HostNetwork()
        member = Membership("W", chan.run_id, SECRET.encode())
        sock, local = await net.connect(srv.address, timeout=2.0)
        try:
            join = p.sign(p.Join("W", chan.run_id, 0, 0, 1, "tcp", local, 5.0), member.secret)
            deadline = loop.time() + 5.0
            await send_message(sock, join, deadline, "server")
            assert isinstance(await read_message(sock, deadline, "server"), p.EndpointReport)
            endpoints = await read_message(sock, deadline, "server")
            assert isinstance(endpoints, p.PeerEndpoint) and endpoints.peer == 1
            # The impostor: right endpoint, wrong secret; then raw frames anyway.
            stranger = Membership("W", chan.run_id, b"guessed")
            imp, _ = await net.connect(endpoints.public, timeout=2.0)
            with pytest.raises((AuthenticationError, BrokenChannelError)):
                await authenticate(
                    imp, stranger, 0, committer=True, other=1, deadline=loop.time() + 2.0
                )
            with pytest.raises(OSError):  # dropped: nothing more gets through
                for _ in range(20):
                    await loop.sock_sendall(imp, b"".join(encode_frame(("u", 0), dumps("forged"))))
                    await asyncio.sleep(0.02)
            close_socket(imp)
            result = p.sign(p.PunchResult("W", chan.run_id, 0, 0, 1, "tcp", False), member.secret)
            await send_message(sock, result, loop.time() + 5.0, "server")
            verdict = await read_message(sock, loop.time() + 5.0, "server")
            assert verdict == p.Verdict("relay")
        finally:
            close_socket(sock)
        relayed = await _relay(net, srv.address, member, 0, 0, 1, 5.0, "server")
        try:
            frame = b"".join(bytes(b) for b in encode_frame(("u", 0), dumps("legit")))
            handshake = take_handshake(relayed)  # sealed end to end, as peer 0's channel would
            assert handshake is not None
            key = stream_key(SECRET.encode(), "W", chan.run_id, handshake)
            await loop.sock_sendall(relayed, StreamSealer(key).seal(frame))
            assert await recv(chan, 0) == "legit"  # the first and only frame from peer 0
            with pytest.raises(CommTimeout):
                await recv(chan, 0, timeout=0.2)
        finally:
            close_socket(relayed)
        assert chan.stats.pairs == {0: "relayed"}


async def test_server_restart_keeps_pairs_and_new_pairings_work() -> None:
    srv = RendezvousServer(SECRET.encode())
    await srv.start("127.0.0.1", 0)
    host, port = srv.address
    async with channels(srv, 3, traversal="punch") as c:
        await send(c[0], 1, "before")
        assert await recv(c[1], 0) == "before"
        await srv.close()
        await send(c[0], 1, "while down")  # an established pair needs no server
        assert await recv(c[1], 0) == "while down"
        srv = RendezvousServer(SECRET.encode())
        await srv.start(host, port)
        try:
            # New pairings wait (lookup_timeout) until the peers have registered again.
            await send(c[0], 2, "after")
            await send(c[2], 1, "after too")
            assert await recv(c[2], 0) == "after"
            assert await recv(c[1], 2) == "after too"
            assert c[0].stats.pairs == {1: "direct", 2: "direct"}
        finally:
            await srv.close()


async def test_mixed_nat_and_public_peers() -> None:
    """A peer behind a NAT reaches a public peer plainly; the reverse direction punches."""
    async with RendezvousServer(SECRET.encode()) as srv, NATBox("port-restricted") as box:
        run_id = uuid.uuid4().hex[:12]
        public = TCPChannel(ChannelContext(0, 2, "W", run_id, config(srv), Mailbox(0)))
        natted = TCPChannel(
            ChannelContext(1, 2, "W", run_id, config(srv, nat=box.options()), Mailbox(1))
        )
        await asyncio.gather(public.open(), natted.open())
        try:
            await send(natted, 0, "out")
            await send(public, 1, "in")
            assert await recv(public, 1) == "out"
            assert await recv(natted, 0) == "in"
            assert natted.stats.pairs == {0: "direct"} and public.stats.pairs == {1: "direct"}
            assert len(srv.pairings) == 1  # only the way into the NAT needed punching
        finally:
            await asyncio.gather(public.close(), natted.close())


@asynccontextmanager
async def natted_pair(
    srv: RendezvousServer, box_a: NATBox, box_b: NATBox, **options: Any
) -> AsyncIterator[tuple[TCPChannel, TCPChannel]]:
    """Peers 0 and 1 of one run, behind ``box_a`` and ``box_b``, opened and closed."""
    run_id = uuid.uuid4().hex[:12]
    a = TCPChannel(
        ChannelContext(0, 2, "W", run_id, config(srv, nat=box_a.options(), **options), Mailbox(0))
    )
    b = TCPChannel(
        ChannelContext(1, 2, "W", run_id, config(srv, nat=box_b.options(), **options), Mailbox(1))
    )
    await asyncio.gather(a.open(), b.open())
    try:
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_symmetric_against_port_restricted_falls_back_to_relay() -> None:
    """RFC 5128 section 3.3.5: a symmetric NAT on one side defeats a port-restricted other."""
    async with (
        RendezvousServer(SECRET.encode()) as srv,
        NATBox("symmetric") as sym,
        NATBox("port-restricted") as cone,
    ):
        async with natted_pair(srv, sym, cone, punch_timeout=0.5) as (a, b):
            await send(a, 1, "x" * 100_000)
            assert await recv(b, 0) == "x" * 100_000
            assert a.stats.pairs == {1: "relayed"}
            assert sym.dropped + cone.dropped > 0  # the punches were really filtered


async def test_reverse_direction_of_a_relayed_pair_is_relayed_without_punching() -> None:
    """Both sides behind symmetric NATs: the second direction does not wait punch_timeout."""
    async with (
        RendezvousServer(SECRET.encode()) as srv,
        NATBox("symmetric") as nat_a,
        NATBox("symmetric") as nat_b,
    ):
        async with natted_pair(srv, nat_a, nat_b, punch_timeout=2.0) as (a, b):
            start = time.perf_counter()
            await send(a, 1, "forth")
            assert await recv(b, 0) == "forth"
            first = time.perf_counter() - start
            assert first >= 2.0  # punched for punch_timeout, then relayed
            start = time.perf_counter()
            await send(b, 0, "back")
            assert await recv(a, 1) == "back"
            second = time.perf_counter() - start
            assert second < 1.5, f"the reverse direction took {second:.3f}s"  # < punch_timeout
            assert srv.pairings.reused == 1
            assert a.stats.pairs == {1: "relayed"} and b.stats.pairs == {0: "relayed"}


async def test_relayed_pair_reports_relayed_on_both_sides_in_comm_stats() -> None:
    async with nat_tcp_group("symmetric", punch_timeout=2.0)(2, timeout=20.0) as comms:
        await asyncio.wait_for(asyncio.gather(comms[0].send(b"x", 1), comms[1].recv(0)), 10.0)
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(comms[1].send(b"y", 0), comms[0].recv(1)), 10.0)
        assert time.perf_counter() - start < 1.5  # no second punch_timeout (2 s)
        for comm in comms:
            pairs = comm.stats()["channels"]["tcp"]["pairs"]
            assert pairs == {1 - comm.peer_id: "relayed"}


async def test_full_cone_against_symmetric_punches() -> None:
    """An endpoint-independent filter lets the symmetric side's new mapping in."""
    async with (
        RendezvousServer(SECRET.encode()) as srv,
        NATBox("symmetric") as sym,
        NATBox("full-cone") as cone,
    ):
        async with natted_pair(srv, sym, cone) as (a, b):
            await send(a, 1, "hi")
            assert await recv(b, 0) == "hi"
            assert a.stats.pairs == {1: "direct"}


async def test_punch_cancelled_mid_handshake_closes_the_accepted_socket() -> None:
    """A connection accepted while punching, whose membership handshake is cut
    short by cancellation, is closed there and then, not left to the GC."""
    loop = asyncio.get_running_loop()
    net = HostNetwork("127.0.0.1")
    listener = await net.listen(0)
    port = listener.sock.getsockname()[1]  # type: ignore[attr-defined]
    member = Membership("W", "r", SECRET.encode())
    punching = asyncio.create_task(
        _punch(net, listener, port, [], member, 0, 1, True, loop.time() + 30.0, 30.0)
    )
    client = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    try:
        await asyncio.sleep(0.3)  # accepted; the handshake waits for an answer that never comes
        assert not punching.done()
        punching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await punching
        client.settimeout(5.0)
        for _ in range(100):  # whatever the handshake sent, then the end of the stream
            chunk = client.recv(65536)
            if not chunk:
                break
        else:
            pytest.fail("the accepted socket was never closed")
    finally:
        client.close()
        listener.close()
