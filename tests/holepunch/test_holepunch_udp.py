"""UDP discovery and punching for the UDP channel, from its own socket (loopback only)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from fmi_async.errors import AuthenticationError
from fmi_async.holepunch import RESERVED_MIN, UDPHolePuncher
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.natsim import NATBox, network_from_options

SECRET = b"udp-secret"
Address = tuple[str, int]


class Endpoint(asyncio.DatagramProtocol):
    """What the UDP channel does: reserved first bytes to the puncher, the rest is its own."""

    def __init__(self, puncher: UDPHolePuncher) -> None:
        self.puncher = puncher
        self.own: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        puncher.attach(lambda data, addr: self.own.put_nowait((data, addr)))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data and data[0] >= RESERVED_MIN:
            self.puncher.handle_datagram(data, (addr[0], addr[1]))
        else:
            self.own.put_nowait((data, (addr[0], addr[1])))


@asynccontextmanager
async def peers(
    srv: RendezvousServer, n: int, nat: str | None = None, **options: Any
) -> AsyncIterator[list[tuple[UDPHolePuncher, asyncio.DatagramTransport, Endpoint]]]:
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        out = []
        for _ in range(n):
            datagrams = None
            if nat is not None:
                box = await stack.enter_async_context(NATBox(nat))
                net = network_from_options({"nat": box.options()})
                assert net is not None
                datagrams = net.datagrams()
            puncher = UDPHolePuncher(*srv.address, SECRET, datagrams=datagrams, **options)
            stack.push_async_callback(puncher.close)
            transport, proto = await loop.create_datagram_endpoint(
                lambda puncher=puncher: Endpoint(puncher), local_addr=("127.0.0.1", 0)
            )
            stack.callback(transport.close)
            out.append((puncher, transport, proto))
        yield out


async def test_publish_and_punch_without_nat() -> None:
    async with RendezvousServer(SECRET) as srv, peers(srv, 2) as ps:
        run = uuid.uuid4().hex[:8]
        (a, ta, _), (b, tb, eb) = ps
        pub_a = await a.publish_udp("W/udp", run, 0, ta)
        pub_b = await b.publish_udp("W/udp", run, 1, tb)
        assert pub_a == ta.get_extra_info("sockname")[:2]  # no NAT: observed == bound
        # Only peer 0 asks; peer 1 takes part because the server invites it.
        remote = await asyncio.wait_for(a.punch_udp("W/udp", run, 0, 1, ta, 5.0), 10.0)
        assert remote == pub_b
        a.wrap(ta).sendto(b"\x75 hello", remote)
        data, src = await asyncio.wait_for(eb.own.get(), 5.0)
        assert data == b"\x75 hello" and src == pub_a
        # The invited side learned the pairing too, without punching again.
        assert await asyncio.wait_for(b.punch_udp("W/udp", run, 1, 0, tb, 5.0), 5.0) == pub_a


async def test_punch_through_port_restricted_nat_and_encapsulation() -> None:
    async with RendezvousServer(SECRET) as srv, peers(srv, 2, nat="port-restricted") as ps:
        run = uuid.uuid4().hex[:8]
        (a, ta, _), (b, tb, eb) = ps
        pub_a = await a.publish_udp("W/udp", run, 0, ta)
        pub_b = await b.publish_udp("W/udp", run, 1, tb)
        assert pub_a[0].startswith("127.0.") and pub_a[0] != "127.0.0.1"  # the NAT's address
        remote = await asyncio.wait_for(a.punch_udp("W/udp", run, 0, 1, ta, 5.0), 10.0)
        assert remote == pub_b
        a.wrap(ta).sendto(b"\x75 through", remote)
        data, src = await asyncio.wait_for(eb.own.get(), 5.0)
        assert data == b"\x75 through" and src == pub_a  # the true source, unwrapped


async def test_own_send_woken_with_the_invite_joins_the_invited_pairing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both peers behind NAT send to each other at the same moment.

    Peer 1's first send (its lookup answered) is woken in the same loop turn
    as the server's invite arrives, ahead of the task the invite starts.  It
    must wait for that pairing: a second pairing from the same side is
    answered by no one (the server answers a side's latest join), so the send
    would hang until its timeout.
    """
    async with RendezvousServer(SECRET) as srv, peers(srv, 2, nat="port-restricted") as ps:
        run = uuid.uuid4().hex[:8]
        (a, ta, _), (b, tb, _) = ps
        pub_a = await a.publish_udp("W/udp", run, 0, ta)
        pub_b = await b.publish_udp("W/udp", run, 1, tb)
        lookup_answered = asyncio.get_running_loop().create_future()
        handle = b.handle_datagram

        def invite_and_lookup_together(data: bytes, addr: Address) -> bool:
            # The first datagram after publishing is the invite; the sender is
            # woken first, so it runs before the task the invite spawns.
            if not lookup_answered.done():
                lookup_answered.set_result(None)
            return handle(data, addr)

        monkeypatch.setattr(b, "handle_datagram", invite_and_lookup_together)

        async def b_sends() -> Address | None:
            await lookup_answered
            return await b.punch_udp("W/udp", run, 1, 0, tb, 3.0)

        b_send = asyncio.create_task(b_sends())
        await asyncio.sleep(0)
        got_a, got_b = await asyncio.wait_for(
            asyncio.gather(a.punch_udp("W/udp", run, 0, 1, ta, 3.0), b_send), 5.0
        )
        assert got_a == pub_b and got_b == pub_a


async def test_symmetric_nats_get_the_relay_verdict() -> None:
    async with (
        RendezvousServer(SECRET) as srv,
        peers(srv, 2, nat="symmetric", punch_timeout=0.3) as ps,
    ):
        run = uuid.uuid4().hex[:8]
        (a, ta, _), (b, tb, _) = ps
        await a.publish_udp("W/udp", run, 0, ta)
        await b.publish_udp("W/udp", run, 1, tb)
        assert await asyncio.wait_for(a.punch_udp("W/udp", run, 0, 1, ta, 5.0), 10.0) is None
        assert await asyncio.wait_for(b.punch_udp("W/udp", run, 1, 0, tb, 5.0), 5.0) is None


async def test_wrong_secret_and_foreign_datagrams() -> None:
    async with RendezvousServer(SECRET) as srv, peers(srv, 1) as ps:
        ((a, ta, _),) = ps
        a.secret = b"wrong"
        with pytest.raises(AuthenticationError):
            await a.publish_udp("W/udp", "r", 0, ta)
        assert not a.handle_datagram(b"\x75 not ours", ("127.0.0.1", 9))
        assert not a.handle_datagram(b"\xf0garbage", ("127.0.0.1", 9))
        assert not a.handle_datagram(b"\xf1\xc1", ("127.0.0.1", 9))
        assert a.handle_datagram(b"\xf3", ("127.0.0.1", 9))  # keep-alive: ours, ignored
