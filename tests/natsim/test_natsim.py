"""The userspace NAT box: mapping and filtering as RFC 4787 / RFC 5382 describe.

Only loopback traffic: the box's public addresses are 127.0.X.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fmi_async.errors import ArgumentError, ConfigError
from fmi_async.holepunch.net import Address, close_socket
from fmi_async.natsim import (
    PRESETS,
    NATBehavior,
    NATBox,
    NATDatagramTransport,
    NATNetwork,
    decapsulate,
    encapsulate,
    network_from_options,
)

DEADLINE = 5.0


@asynccontextmanager
async def observer(host: str = "127.0.0.1") -> AsyncIterator[tuple[Address, list[Address]]]:
    """A TCP server that records where each connection came from (what a server observes)."""
    seen: list[Address] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        seen.append((peer[0], peer[1]))
        writer.write(f"{peer[0]}:{peer[1]}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield (host, server.sockets[0].getsockname()[1]), seen
    finally:
        server.close()


@asynccontextmanager
async def box(behavior: NATBehavior | str) -> AsyncIterator[tuple[NATBox, NATNetwork]]:
    nat = NATBox(behavior)
    await nat.start()
    try:
        net = network_from_options({"nat": nat.options()})
        assert isinstance(net, NATNetwork)
        yield nat, net
    finally:
        await nat.close()


async def observed_via(net: NATNetwork, dst: Address, port: int | None = None) -> Address:
    sock, _ = await net.connect(dst, local_port=port, timeout=DEADLINE)
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
        line = await asyncio.wait_for(reader.readline(), DEADLINE)
        writer.close()
    finally:
        close_socket(sock)
    host, _, p = line.decode().strip().rpartition(":")
    return (host, int(p))


async def outsider_connect(src_host: str, dst: Address) -> bool:
    """True if a connection from ``src_host`` to ``dst`` stays up long enough to be used."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((src_host, 0))
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dst), DEADLINE)
        await loop.sock_sendall(sock, b"hello?")
        # A filtered connection is reset by the box at once.
        data = await asyncio.wait_for(loop.sock_recv(sock, 10), 0.5)
        return data != b""
    except TimeoutError:  # (before OSError, its base class)
        return True  # still open: admitted and waiting
    except OSError:
        return False
    finally:
        sock.close()


def test_presets_and_validation() -> None:
    assert PRESETS["symmetric"].mapping == "address-and-port-dependent"
    assert PRESETS["port-restricted"].filtering == "address-and-port-dependent"
    assert PRESETS["restricted"].filtering == "address-dependent"
    assert PRESETS["full-cone"].filtering == "endpoint-independent"
    with pytest.raises(ArgumentError, match="unknown NAT type"):
        NATBox("cone-ish")
    with pytest.raises(ArgumentError, match="probability"):
        NATBehavior(loss=1.5)
    with pytest.raises(ConfigError, match="host:port"):
        network_from_options({"nat": {"gateway": "nope"}})
    assert network_from_options({}, environ=lambda name: None) is None
    env = {"FMI_NAT_GATEWAY": "127.0.0.1:5"}
    net = network_from_options({}, environ=env.get)
    assert isinstance(net, NATNetwork) and net.gateway == ("127.0.0.1", 5)


def test_udp_encapsulation_roundtrip() -> None:
    data = encapsulate(("127.0.5.1", 4242), b"payload")
    assert data[0] == 0xFE
    assert decapsulate(data) == (("127.0.5.1", 4242), b"payload")


@pytest.mark.parametrize("kind", ["full-cone", "port-restricted"])
async def test_endpoint_independent_mapping_preserves_port(kind: str) -> None:
    """RFC 4787 section 4.1 (REQ-1) and 4.2.1: one public endpoint for every destination."""
    async with box(kind) as (nat, net), observer() as (srv1, _), observer() as (srv2, _):
        first = await observed_via(net, srv1, 45011)
        second = await observed_via(net, srv2, 45011)
        assert first == second == (nat.public_ip, 45011)


async def test_symmetric_mapping_changes_port_per_destination() -> None:
    """RFC 4787 section 4.1: address-and-port-dependent mapping, no port preservation."""
    async with box("symmetric") as (nat, net), observer() as (srv1, _), observer() as (srv2, _):
        first = await observed_via(net, srv1, 45012)
        second = await observed_via(net, srv2, 45012)
        assert first[0] == second[0] == nat.public_ip
        assert first[1] != second[1]
        assert await observed_via(net, srv1, 45012) == first  # same destination, same mapping


@pytest.mark.parametrize(
    ("kind", "same_host_other_port", "other_host"),
    [
        ("full-cone", True, True),  # endpoint-independent filtering
        ("restricted", True, False),  # address-dependent
        ("port-restricted", False, False),  # address-and-port-dependent
    ],
)
async def test_filtering(kind: str, same_host_other_port: bool, other_host: bool) -> None:
    """RFC 4787 section 5 / RFC 5382 section 5: who may reach an existing mapping."""
    async with box(kind) as (nat, net), observer() as (srv, _):
        public = await observed_via(net, srv, 45013)
        listener = await net.listen(45013)
        accepted: list[socket.socket] = []

        async def accept_all() -> None:
            for _ in range(4):
                sock, _ = await listener.accept(DEADLINE)
                accepted.append(sock)

        accepts = asyncio.create_task(accept_all())
        try:
            # The observer's host is 127.0.0.1, from another port than the one we sent to.
            assert await outsider_connect("127.0.0.1", public) is same_host_other_port
            assert await outsider_connect("127.0.0.77", public) is other_host
        finally:
            accepts.cancel()
            await asyncio.gather(accepts, return_exceptions=True)
            for sock in accepted:
                sock.close()
        assert len(accepted) == same_host_other_port + other_host
        assert nat.dropped == 2 - len(accepted)


async def test_unsolicited_inbound_is_dropped() -> None:
    """No mapping, no way in: a port nobody behind the box used refuses connections."""
    async with box("full-cone") as (nat, _):
        assert not await outsider_connect("127.0.0.1", (nat.public_ip, 45014))


async def test_udp_mapping_filtering_and_impairments() -> None:
    """UDP through the box: mapping observed by a public socket, filtering, seeded loss."""
    behavior = NATBehavior(filtering="address-and-port-dependent", loss=0.5, seed=7)
    async with box(behavior) as (nat, net):
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()

        class Inbox(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                got.put_nowait((data, addr))

        public_transport, _ = await loop.create_datagram_endpoint(
            Inbox, local_addr=("127.0.0.1", 0)
        )
        public_addr = public_transport.get_extra_info("sockname")[:2]
        peer_transport, _ = await loop.create_datagram_endpoint(Inbox, local_addr=("127.0.0.1", 0))
        try:
            assert net.udp_gateway is not None
            out = NATDatagramTransport(peer_transport, net.udp_gateway)
            out.sendto(b"ping", public_addr)
            data, mapped = await asyncio.wait_for(got.get(), DEADLINE)
            assert data == b"ping" and mapped[0] == nat.public_ip
            # Replies come back encapsulated with their true source; about half are lost.
            for i in range(40):
                public_transport.sendto(b"r%d" % i, mapped)
            await asyncio.sleep(0.2)
            replies = []
            while not got.empty():
                data, _ = got.get_nowait()
                replies.append(decapsulate(data))
            assert all(src == tuple(public_addr) for src, _ in replies)
            assert 5 < len(replies) < 35
            # An endpoint we never sent to is filtered.
            stranger, _ = await loop.create_datagram_endpoint(Inbox, local_addr=("127.0.0.1", 0))
            before = nat.dropped
            stranger.sendto(b"let me in", mapped)
            await asyncio.sleep(0.1)
            assert nat.dropped == before + 1 and got.empty()
            stranger.close()
        finally:
            public_transport.close()
            peer_transport.close()
