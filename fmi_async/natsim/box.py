"""The simulated NAT box: a userspace NAT in front of one private network.

Peers behind a :class:`NATBox` never open sockets to anyone but their box:
they ask it, over a loopback *gateway* connection (:mod:`.gateway`), to open
each TCP connection (and to send each UDP datagram) on their behalf, exactly
as a NAT rewrites every packet of a host behind it.  The box owns real
sockets bound to its own "public" loopback address (``127.0.X.1``: Linux
routes all of 127.0.0.0/8 to ``lo``, so distinct boxes get distinct
addresses without privileges), keeps a mapping table, and forwards inbound
traffic only when its filtering rule (:mod:`.behavior`) allows.  The
rendezvous server, being public, therefore observes the box's mapping, and
punching through the box is real punching: its mapping and filter state
decide whether a connection passes.  Unsolicited inbound traffic (no
mapping, or filtered) is dropped: a TCP connection the filter refuses is
reset at once, which to the connecting side looks like the RST some NATs
send (RFC 5382 section 7.1, REQ-4 allows either).

Limits of the simulation: a TCP SYN is only visible to userspace once the
kernel has completed the handshake, so a filtered connect *succeeds* and is
reset at once instead of timing out; mappings expire ``lifetime`` seconds
after their last connection closed or datagram passed (far shorter than RFC
5382 REQ-5's two hours, to keep test runs clean); there is no hairpinning
(RFC 4787 section 6), but peers behind the same box reach each other at its
private address (``10.N.0.2``), as hosts on one LAN do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import random
import socket
import struct
from collections import deque
from typing import Any

from ..errors import ArgumentError, BrokenChannelError, ProtocolError
from ..holepunch.net import Address, close_socket
from ..holepunch.relay import splice
from .behavior import PRESETS, NATBehavior, PortMapping
from .gateway import LENGTH, MAX_REQUEST, address, decapsulate, encapsulate, pack, unpack

__all__ = ["NATBox"]

logger = logging.getLogger(__name__)

_BACKLOG = 16  # admitted inbound connections waiting for a "listen" request


class NATBox:
    """One simulated NAT in front of one private network; see the module doc."""

    _numbers = itertools.count(2)

    def __init__(
        self, behavior: NATBehavior | str = "port-restricted", public_ip: str | None = None
    ) -> None:
        if isinstance(behavior, str):
            if behavior not in PRESETS:
                raise ArgumentError(
                    f"unknown NAT type {behavior!r}; choose one of {', '.join(PRESETS)}"
                )
            behavior = PRESETS[behavior]
        self.behavior = behavior
        number = next(self._numbers) + os.getpid() % 200
        self.public_ip = public_ip or f"127.0.{number % 250 + 2}.1"
        self.private_ip = f"10.{number % 250 + 2}.0.2"
        self.gateway: Address | None = None
        self.udp_gateway: Address | None = None
        self.dropped = 0
        self.forwarded = 0
        self._rng = random.Random(behavior.seed)
        self._mappings: dict[tuple[Any, ...], PortMapping] = {}
        self._by_port: dict[tuple[str, int], PortMapping] = {}
        self._acceptors: dict[int, deque[asyncio.Future[tuple[_Tracked, Address]]]] = {}
        self._backlog: dict[int, deque[tuple[_Tracked, Address]]] = {}
        self._internal_ports = itertools.count(20000 + self._rng.randrange(20000))
        self._udp_clients: dict[Address, int] = {}
        self._server: asyncio.Server | None = None
        self._udp_gw: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        b = self.behavior
        return (
            f"<NATBox {self.public_ip} mapping={b.mapping} filtering={b.filtering} "
            f"preserving={b.port_preserving} mappings={len(self._mappings)} "
            f"dropped={self.dropped}>"
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_gateway, "127.0.0.1", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        self.gateway = ("127.0.0.1", port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDPGateway(self), local_addr=("127.0.0.1", 0)
        )
        self._udp_gw = transport
        self.udp_gateway = ("127.0.0.1", int(transport.get_extra_info("sockname")[1]))
        self._sweeper = asyncio.create_task(self._sweep())
        logger.debug("%r started, gateway %s:%d", self, *self.gateway)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        if self._udp_gw is not None:
            self._udp_gw.close()
        for mapping in list(self._mappings.values()):
            self._drop(mapping)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def __aenter__(self) -> NATBox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def options(self) -> dict[str, Any]:
        """What ``backends.TCP.nat`` of a peer behind this box says."""
        assert self.gateway is not None and self.udp_gateway is not None
        return {
            "gateway": f"{self.gateway[0]}:{self.gateway[1]}",
            "udp_gateway": f"{self.udp_gateway[0]}:{self.udp_gateway[1]}",
        }

    # ---------------------------------------------------------------- mappings

    def _key(self, proto: str, internal: int, dst: Address) -> tuple[Any, ...]:
        if self.behavior.mapping == "endpoint-independent":
            return (proto, internal)
        if self.behavior.mapping == "address-dependent":
            return (proto, internal, dst[0])
        return (proto, internal, dst[0], dst[1])

    async def _mapping(self, proto: str, internal: int, dst: Address) -> PortMapping:
        key = self._key(proto, internal, dst)
        mapping = self._mappings.get(key)
        if mapping is None:
            mapping = await self._new_mapping(proto, internal)
            self._mappings[key] = mapping
            self._by_port[(proto, mapping.public_port)] = mapping
            logger.debug(
                "%s: %s mapping %s:%d -> %s:%d", self.public_ip, proto, self.private_ip,
                internal, self.public_ip, mapping.public_port,
            )  # fmt: skip
        mapping.allowed.add(dst)  # outbound traffic opens the filter (RFC 4787 section 5)
        mapping.idle_since = asyncio.get_running_loop().time()
        return mapping

    async def _new_mapping(self, proto: str, internal: int) -> PortMapping:
        wanted = [internal] if self.behavior.port_preserving else []
        for port in [*wanted, 0, 0, 0]:
            if port and (proto, port) in self._by_port:
                continue
            try:
                if proto == "tcp":
                    sock = _bound_socket(socket.SOCK_STREAM, (self.public_ip, port))
                    sock.listen(_BACKLOG)
                    public_port = int(sock.getsockname()[1])
                    if (proto, public_port) in self._by_port:
                        close_socket(sock)
                        continue
                    mapping = PortMapping(proto, internal, public_port)
                    mapping.server = await asyncio.start_server(
                        functools.partial(self._inbound_tcp, mapping), sock=sock
                    )
                    return mapping
                loop = asyncio.get_running_loop()
                usock = _bound_socket(socket.SOCK_DGRAM, (self.public_ip, port))
                public_port = int(usock.getsockname()[1])
                if (proto, public_port) in self._by_port:
                    close_socket(usock)
                    continue
                mapping = PortMapping(proto, internal, public_port)
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_PublicUDP, self, mapping), sock=usock
                )
                mapping.udp = transport
                return mapping
            except OSError as exc:
                logger.debug("%s: port %d unavailable: %s", self.public_ip, port, exc)
        raise BrokenChannelError(f"NAT box {self.public_ip} ran out of ports")

    def _drop(self, mapping: PortMapping) -> None:
        for key, value in list(self._mappings.items()):
            if value is mapping:
                del self._mappings[key]
        self._by_port.pop((mapping.proto, mapping.public_port), None)
        if mapping.server is not None:
            mapping.server.close()
        if mapping.udp is not None:
            mapping.udp.close()

    async def _sweep(self) -> None:
        """Expire idle mappings (RFC 4787 section 4.3, RFC 5382 section 5 REQ-5)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.behavior.lifetime / 2))
            now = loop.time()
            for mapping in list(self._mappings.values()):
                if mapping.users == 0 and now - mapping.idle_since > self.behavior.lifetime:
                    logger.debug("%s: mapping %d expired", self.public_ip, mapping.public_port)
                    self._drop(mapping)

    # ---------------------------------------------------------------- TCP

    async def _on_gateway(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(10.0):
                (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                if length > MAX_REQUEST:
                    raise ProtocolError("NAT gateway request too large")
                request = unpack(await reader.readexactly(length))
            op = request.get("op")
            timeout = float(request.get("timeout") or 10.0)
            port = int(request.get("port") or 0)
            if op == "connect":
                await self._connect(
                    reader, writer, port, address(request.get("dst"), "dst"), timeout
                )
            elif op == "listen":
                await self._listen(reader, writer, port, timeout)
            else:
                raise ProtocolError(f"unknown NAT gateway op {op!r}")
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:
            logger.debug("%s: gateway request failed: %s", self.public_ip, exc)
            with contextlib.suppress(Exception):
                writer.write(pack({"ok": False, "error": str(exc)}))
                await asyncio.wait_for(writer.drain(), 1.0)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _connect(
        self,
        inner_r: asyncio.StreamReader,
        inner_w: asyncio.StreamWriter,
        internal: int,
        dst: Address,
        timeout: float,
    ) -> None:
        internal = internal or next(self._internal_ports)
        local = [self.private_ip, internal]
        if dst[0] == self.private_ip:  # same private network: no translation
            future = self._deliver_inside(dst[1])
            if future is None:
                raise ConnectionRefusedError(f"nothing listens on {dst[0]}:{dst[1]}")
            a, b = socket.socketpair()
            near = await asyncio.open_connection(sock=a)
            far_r, far_w = await asyncio.open_connection(sock=b)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result((_Tracked(far_r, far_w, done), (self.private_ip, internal)))
            inner_w.write(pack({"ok": True, "local": local}))
            await self._splice((inner_r, inner_w), near)
            return
        if ipaddress.ip_address(dst[0]).is_private and not ipaddress.ip_address(dst[0]).is_loopback:
            raise OSError(f"no route to {dst[0]} (another private network)")
        mapping = await self._mapping("tcp", internal, dst)
        sock = _bound_socket(socket.SOCK_STREAM, (self.public_ip, mapping.public_port))
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, dst)
            outer = await asyncio.open_connection(sock=sock)
        except BaseException:
            close_socket(sock, reset=True)
            raise
        inner_w.write(pack({"ok": True, "local": local}))
        mapping.users += 1
        try:
            await self._splice((inner_r, inner_w), outer)
        finally:
            mapping.users -= 1
            mapping.idle_since = loop.time()

    async def _splice(
        self,
        a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.forwarded += await splice(a, b, 3600.0)

    async def _listen(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        internal: int,
        timeout: float,
    ) -> None:
        backlog = self._backlog.get(internal)
        if backlog:
            stream, remote = backlog.popleft()
        else:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[tuple[_Tracked, Address]] = loop.create_future()
            waiting = self._acceptors.setdefault(internal, deque())
            waiting.append(future)
            gone: asyncio.Future[bytes] = asyncio.ensure_future(reader.read(1))  # EOF: gave up
            try:
                waits: list[asyncio.Future[Any]] = [future, gone]
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._acceptors.pop(internal, None)
            if not future.done():
                future.cancel()
                return
            stream, remote = future.result()
        try:
            writer.write(pack({"ok": True, "remote": list(remote)}))
            await self._splice((reader, writer), (stream.reader, stream.writer))
        finally:
            if not stream.done.done():
                stream.done.set_result(None)

    def _deliver_inside(self, internal: int) -> asyncio.Future[tuple[_Tracked, Address]] | None:
        waiting = self._acceptors.get(internal)
        while waiting:
            future = waiting.popleft()
            if not future.done():
                return future
        return None

    async def _inbound_tcp(
        self, mapping: PortMapping, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Returns normally when cancelled: asyncio's stream server logs a cancelled handler.
        with contextlib.suppress(asyncio.CancelledError):
            await self._admit_tcp(mapping, reader, writer)

    async def _admit_tcp(
        self, mapping: PortMapping, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        remote = (str(peer[0]), int(peer[1]))
        if self._mappings.get(self._key_of(mapping)) is not mapping or not mapping.admits(
            remote, self.behavior.filtering
        ):
            self.dropped += 1
            logger.debug(
                "%s: filtered tcp from %s:%d to port %d", self.public_ip, *remote,
                mapping.public_port,
            )  # fmt: skip
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        loop = asyncio.get_running_loop()
        mapping.users += 1
        tracked = _Tracked(reader, writer, loop.create_future())
        try:
            future = self._deliver_inside(mapping.internal)
            if future is not None:
                future.set_result((tracked, remote))
            else:  # wait briefly for a "listen", as a kernel backlog would
                backlog = self._backlog.setdefault(mapping.internal, deque())
                if len(backlog) >= _BACKLOG:
                    _reset(writer)
                    return
                backlog.append((tracked, remote))
                await asyncio.wait([tracked.done], timeout=2.0)
                if (tracked, remote) in backlog:
                    backlog.remove((tracked, remote))
                    _reset(writer)
                    return
            await tracked.done
        finally:
            mapping.users -= 1
            mapping.idle_since = loop.time()
            self._tasks.discard(task)

    def _key_of(self, mapping: PortMapping) -> tuple[Any, ...]:
        for key, value in self._mappings.items():
            if value is mapping:
                return key
        return ()

    # ---------------------------------------------------------------- UDP

    def _udp_out(self, data: bytes, client: Address) -> None:
        try:
            dst, payload = decapsulate(data)
        except ProtocolError:
            return
        internal = self._udp_clients.get(client)
        if internal is None:
            internal = self._udp_clients[client] = next(self._internal_ports)
        task = asyncio.ensure_future(self._udp_send(internal, client, dst, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_send(self, internal: int, client: Address, dst: Address, payload: bytes) -> None:
        mapping = await self._mapping("udp", internal, dst)
        mapping.client = client
        if mapping.udp is not None:
            mapping.udp.sendto(payload, dst)

    def _udp_in(self, mapping: PortMapping, data: bytes, remote: Address) -> None:
        if not mapping.admits(remote, self.behavior.filtering) or mapping.client is None:
            self.dropped += 1
            return
        mapping.idle_since = asyncio.get_running_loop().time()
        b = self.behavior
        if b.loss and self._rng.random() < b.loss:
            return
        copies = 2 if b.duplicate and self._rng.random() < b.duplicate else 1
        delay = (
            self._rng.uniform(0.001, 0.01) if b.reorder and self._rng.random() < b.reorder else 0
        )
        out = encapsulate(remote, data)
        for _ in range(copies):
            if delay:
                asyncio.get_running_loop().call_later(delay, self._to_client, out, mapping.client)
            else:
                self._to_client(out, mapping.client)

    def _to_client(self, data: bytes, client: Address) -> None:
        if self._udp_gw is not None and not self._udp_gw.is_closing():
            self._udp_gw.sendto(data, client)


class _Tracked:
    """An admitted inbound stream; ``done`` tells the accepting task when it is spliced out."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: asyncio.Future[None]
    ) -> None:
        self.reader, self.writer, self.done = reader, writer, done


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _bound_socket(kind: int, addr: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


class _UDPGateway(asyncio.DatagramProtocol):
    def __init__(self, box: NATBox) -> None:
        self.box = box

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.box._udp_out(data, (str(addr[0]), int(addr[1])))


class _PublicUDP(asyncio.DatagramProtocol):
    def __init__(self, box: NATBox, mapping: PortMapping) -> None:
        self.box = box
        self.mapping = mapping

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.box._udp_in(self.mapping, data, (str(addr[0]), int(addr[1])))
