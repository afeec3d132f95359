"""A peer's side of a simulated NAT: its network, its datagram path, its configuration.

:class:`NATNetwork` is a :class:`~fmi_async.holepunch.net.Network` whose
every connection and listener is opened by the peer's
:class:`~fmi_async.natsim.box.NATBox` on its behalf, over the gateway codec
of :mod:`.gateway`; :class:`NATDatagramPath` does the same for a UDP socket.

Production code never imports this module: it is loaded by
:func:`fmi_async.holepunch.net.simulated_network`, the one plug point, and
only when a simulated gateway is configured (the ``nat`` option of a TCP or
UDP backend, or ``FMI_NAT_GATEWAY`` as ``fmi run --nat`` sets it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import BrokenChannelError, ConfigError, ProtocolError
from ..holepunch.net import (
    Address,
    DatagramPath,
    DatagramSender,
    Listener,
    close_socket,
    recv_exact,
)
from .gateway import (
    LENGTH,
    MAX_REQUEST,
    address,
    decapsulate,
    encapsulate,
    pack,
    parse_hostport,
    unpack,
)

__all__ = ["NATNetwork", "NATDatagramTransport", "NATDatagramPath", "network_from_options"]

logger = logging.getLogger(__name__)


class _NATListener:
    def __init__(self, net: NATNetwork, port: int) -> None:
        self.net = net
        self.port = port

    def __repr__(self) -> str:
        return f"<_NATListener {self.net.name} port={self.port}>"

    async def accept(self, timeout: float) -> tuple[socket.socket, Address]:
        sock, reply = await self.net._request(
            {"op": "listen", "port": self.port, "timeout": timeout}, timeout + 1.0
        )
        return sock, address(reply.get("remote"), "remote")

    def close(self) -> None:
        pass  # pending accepts end when their tasks are cancelled


class NATNetwork:
    """A peer's :class:`~fmi_async.holepunch.net.Network` behind a :class:`~.box.NATBox`."""

    def __init__(self, gateway: Address, udp_gateway: Address | None = None) -> None:
        self.gateway = gateway
        self.udp_gateway = udp_gateway

    @property
    def name(self) -> str:
        return f"natsim@{self.gateway[0]}:{self.gateway[1]}"

    def __repr__(self) -> str:
        return f"<NATNetwork gateway={self.gateway}>"

    async def _request(
        self, request: dict[str, Any], timeout: float
    ) -> tuple[socket.socket, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            deadline = loop.time() + timeout
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, self.gateway)
                await loop.sock_sendall(sock, pack(request))
            head = await recv_exact(sock, LENGTH.size, deadline, "the NAT box")
            (length,) = LENGTH.unpack(head)
            if length > MAX_REQUEST:
                raise ProtocolError("NAT gateway answer too large")
            reply = unpack(await recv_exact(sock, length, deadline, "the NAT box"))
        except BaseException:
            close_socket(sock)
            raise
        if not reply.get("ok"):
            close_socket(sock)
            raise ConnectionRefusedError(f"NAT box: {reply.get('error', 'refused')}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, reply

    async def connect(
        self, dst: Address, *, local_port: int | None = None, timeout: float
    ) -> tuple[socket.socket, Address]:
        """A connection to ``dst`` opened by the box, and this side's private endpoint.

        Raises :class:`ConnectionRefusedError` when the box refuses,
        :class:`ConnectionResetError` when the box's connection breaks,
        :class:`~fmi_async.errors.CommTimeout` when it does not answer in time.
        """
        request = {"op": "connect", "port": local_port or 0, "dst": list(dst), "timeout": timeout}
        try:
            sock, reply = await self._request(request, timeout + 1.0)
        except BrokenChannelError as exc:
            raise ConnectionResetError(str(exc)) from exc
        return sock, address(reply.get("local"), "local")

    async def listen(self, local_port: int) -> Listener:
        """A listener on the box's ``local_port`` (inbound connections its filter admits)."""
        return _NATListener(self, local_port)

    def datagrams(self) -> DatagramPath:
        """The UDP path through the box.

        Raises :class:`~fmi_async.errors.ConfigError` when no UDP gateway is configured.
        """
        if self.udp_gateway is None:
            raise ConfigError(
                "backends.UDP.nat needs the NAT box's udp_gateway, e.g. "
                '{"gateway": "127.0.0.1:4000", "udp_gateway": "127.0.0.1:4001"} '
                "(NATBox.options() gives both)"
            )
        return NATDatagramPath(self.udp_gateway)


class NATDatagramTransport:
    """Sends a UDP channel's datagrams through its NAT box (wraps the real transport)."""

    def __init__(self, transport: Any, udp_gateway: Address) -> None:
        self.transport = transport
        self.udp_gateway = udp_gateway

    def sendto(self, data: bytes, addr: Address) -> None:
        self.transport.sendto(encapsulate(addr, data), self.udp_gateway)


class NATDatagramPath:
    """A UDP socket's :class:`~fmi_async.holepunch.net.DatagramPath` through its box."""

    def __init__(self, udp_gateway: Address) -> None:
        self.udp_gateway = udp_gateway

    def __repr__(self) -> str:
        return f"<NATDatagramPath gateway={self.udp_gateway}>"

    def sender(self, transport: DatagramSender) -> DatagramSender:
        """A sender that encapsulates every datagram towards the box."""
        return NATDatagramTransport(transport, self.udp_gateway)

    def unwrap(self, data: bytes) -> tuple[Address, bytes]:
        """The true source and payload of a datagram from the box.

        Raises :class:`~fmi_async.errors.ProtocolError` when ``data`` is not one.
        """
        return decapsulate(data)


def network_from_options(
    options: Mapping[str, Any], environ: Callable[[str], str | None] = os.environ.get
) -> NATNetwork | None:
    """The simulated NAT a peer is behind (``nat`` option or ``FMI_NAT_GATEWAY``), if any.

    Raises :class:`~fmi_async.errors.ConfigError` when the ``nat`` option is malformed.
    """
    nat = options.get("nat")
    if nat is None:
        gateway = environ("FMI_NAT_GATEWAY")
        if not gateway:
            return None
        nat = {"gateway": gateway, "udp_gateway": environ("FMI_NAT_UDP_GATEWAY")}
    if isinstance(nat, str):
        nat = {"gateway": nat}
    if not isinstance(nat, dict) or "gateway" not in nat:
        raise ConfigError(
            'backends.TCP.nat must be {"gateway": "host:port"} (a simulated NAT box), '
            f"got {nat!r}"
        )
    udp = nat.get("udp_gateway")
    return NATNetwork(
        parse_hostport(nat["gateway"], "nat.gateway"),
        parse_hostport(udp, "nat.udp_gateway") if udp else None,
    )
