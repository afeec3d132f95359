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
from fmi_async.holepunch.natsim import NATBox, network_from_options
from fmi_async.holepunch.server import RendezvousServer

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
            gateway = None
            if nat is not None:
                box = await stack.enter_async_context(NATBox(nat))
                net = network_from_options({"nat": box.options()})
                assert net is not None
                gateway = net.udp_gateway
            puncher = UDPHolePuncher(*srv.address, SECRET, udp_gateway=gateway, **options)
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
