"""Where a peer's sockets come from, and message I/O on raw sockets.

Hole punching needs two things a plain ``asyncio.open_connection`` does not
give: a connection *from a chosen local port* (the one the rendezvous server
saw, RFC 5128 section 3.3 / 3.4) and a listener on that same port while it is
in use.  :class:`Network` names those operations, so the punching code runs
unchanged over the host's own stack (:class:`HostNetwork`) and over a
simulated NAT box (:class:`fmi_async.natsim.client.NATNetwork`), where
every socket a peer opens is opened by its NAT on its behalf.

The NAT simulator belongs to tests and ``fmi run --nat``, not to the
production path: no production module imports it.  :func:`simulated_network`
is the one place that loads it, and only when a simulated NAT gateway is
configured (the backend's ``nat`` option or ``FMI_NAT_GATEWAY``).  The
simulated network also carries the UDP side (:class:`DatagramPath`), so the
UDP hole puncher learns of the simulator's encapsulation through the same
object instead of importing it.

Both return plain connected, non-blocking sockets.  The handshake and the
rendezvous exchange run on them with the ``loop.sock_*`` calls, reading
exactly the bytes of each message, so that a socket handed to
``loop.create_connection(sock=...)`` afterwards has nothing of the next
layer's data consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import BrokenChannelError, CommTimeout, ConfigError
from . import protocol as p
from .protocol import Address

__all__ = [
    "Address",
    "Listener",
    "Network",
    "HostNetwork",
    "DatagramSender",
    "DatagramPath",
    "SimulatedNetwork",
    "NAT_SIMULATOR",
    "simulated_network",
    "recv_exact",
    "read_message",
    "send_message",
    "close_socket",
]

logger = logging.getLogger(__name__)


class Listener(Protocol):
    """Accepts connections on one local port (the punched one)."""

    async def accept(self, timeout: float) -> tuple[socket.socket, Address]: ...

    def close(self) -> None: ...


class Network(Protocol):
    """Opens this peer's TCP connections; ``local_port=None`` means a fresh port."""

    @property
    def name(self) -> str: ...

    async def connect(
        self, dst: Address, *, local_port: int | None = None, timeout: float
    ) -> tuple[socket.socket, Address]:
        """A connected socket to ``dst`` and this side's local endpoint of it."""
        ...

    async def listen(self, local_port: int) -> Listener: ...


class DatagramSender(Protocol):
    """Where a UDP socket's datagrams go out: an asyncio datagram transport, or a
    wrapper around one (the simulated NAT's, the relay's, tests' lossy ones)."""

    def sendto(self, data: bytes, addr: Address) -> None: ...


class DatagramPath(Protocol):
    """How a UDP socket's datagrams cross a simulated NAT box.

    Behind a simulated box every datagram travels to and from the box's
    gateway port encapsulated (first byte ``kinds.NAT``, 0xFE); the host's
    own stack needs no such path.
    """

    def sender(self, transport: DatagramSender) -> DatagramSender:
        """A sender that sends every datagram through the box."""
        ...

    def unwrap(self, data: bytes) -> tuple[Address, bytes]:
        """The true source and the payload of a datagram from the box.

        Raises :class:`~fmi_async.errors.ProtocolError` when ``data`` is not one.
        """
        ...


class SimulatedNetwork(Network, Protocol):
    """A :class:`Network` behind a simulated NAT box, with its UDP side."""

    def datagrams(self) -> DatagramPath:
        """The UDP path through the box.

        Raises :class:`~fmi_async.errors.ConfigError` when the box's UDP
        gateway is not configured.
        """
        ...


NAT_SIMULATOR = "fmi_async.natsim.client"
"""The module :func:`simulated_network` loads; it offers ``network_from_options``."""


def simulated_network(
    nat: Any = None, environ: Callable[[str], str | None] = os.environ.get
) -> SimulatedNetwork | None:
    """The simulated NAT box a peer is behind, or None for the host's own stack.

    ``nat`` is a TCP or UDP backend's ``nat`` option (``{"gateway": "host:port",
    "udp_gateway": "host:port"}`` or just the gateway); without it, the
    ``FMI_NAT_GATEWAY`` and ``FMI_NAT_UDP_GATEWAY`` environment variables that
    ``fmi run --nat`` sets.  Only when one of them names a gateway is the NAT
    simulator loaded -- here, and nowhere else in the production path.

    Raises :class:`~fmi_async.errors.ConfigError` when ``nat`` is malformed,
    or when a gateway is configured but the simulator is not installed.
    """
    if nat is None and not environ("FMI_NAT_GATEWAY"):
        return None
    try:
        simulator = importlib.import_module(NAT_SIMULATOR)
    except ImportError as exc:  # pragma: no cover - the simulator ships with the package
        raise ConfigError(f"a simulated NAT gateway is configured but {exc}") from exc
    options: Mapping[str, Any] = {} if nat is None else {"nat": nat}
    network: SimulatedNetwork | None = simulator.network_from_options(options, environ)
    return network


def _reusable_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    # Several sockets share the punched port: the rendezvous connection, the
    # listener and the outgoing attempts (TCPunch's and RFC 5128's recipe).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def close_socket(sock: socket.socket, *, reset: bool = False) -> None:
    """Close ``sock``; with ``reset`` send an RST, leaving no TIME_WAIT on the port."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def sock_accept(listen: socket.socket) -> tuple[socket.socket, Any]:
    """``loop.sock_accept``, except that cancellation never drops a connection.

    With ``loop.sock_accept``, a cancellation (a timeout, a race ended, a
    channel closing) that lands after the kernel handed over a connection but
    before the awaiting coroutine resumed loses that socket unclosed.  Here
    the connection is either returned or closed.
    """
    loop = asyncio.get_running_loop()
    got: asyncio.Future[tuple[socket.socket, Any]] = loop.create_future()
    fd = listen.fileno()

    def ready() -> None:
        if got.done():
            return
        try:
            conn, addr = listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            got.set_exception(exc)
        else:
            got.set_result((conn, addr))

    loop.add_reader(fd, ready)
    try:
        return await got
    except BaseException:
        if got.done() and not got.cancelled() and got.exception() is None:
            close_socket(got.result()[0])
        raise
    finally:
        loop.remove_reader(fd)


class _HostListener:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __repr__(self) -> str:
        return f"<_HostListener {self.sock.getsockname()}>"

    async def accept(self, timeout: float) -> tuple[socket.socket, Address]:
        async with asyncio.timeout(timeout):
            conn, addr = await sock_accept(self.sock)
        conn.setblocking(False)
        return conn, (str(addr[0]), int(addr[1]))

    def close(self) -> None:
        close_socket(self.sock)


class HostNetwork:
    """The host's own network stack (no simulated NAT; maybe a real one)."""

    name = "host"

    def __init__(self, bind: str = "0.0.0.0") -> None:
        self.bind = bind

    def __repr__(self) -> str:
        return f"<HostNetwork bind={self.bind}>"

    async def connect(
        self, dst: Address, *, local_port: int | None = None, timeout: float
    ) -> tuple[socket.socket, Address]:
        loop = asyncio.get_running_loop()
        sock = _reusable_socket()
        try:
            sock.bind((self.bind, local_port or 0))
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, dst)
            name = sock.getsockname()
        except BaseException:
            close_socket(sock)
            raise
        return sock, (str(name[0]), int(name[1]))

    async def listen(self, local_port: int) -> Listener:
        sock = _reusable_socket()
        try:
            sock.bind((self.bind, local_port))
            sock.listen(16)
        except BaseException:
            close_socket(sock)
            raise
        return _HostListener(sock)


# ---------------------------------------------------------------- message I/O


async def recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytearray:
    """Exactly ``n`` bytes from ``sock`` by the loop-time ``deadline``."""
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        async with asyncio.timeout_at(deadline):
            while got < n:
                k = await loop.sock_recv_into(sock, view[got:])
                if k == 0:
                    raise BrokenChannelError(f"{what} closed the connection")
                got += k
    except TimeoutError:
        raise CommTimeout(f"{what} sent nothing usable before the deadline") from None
    except OSError as exc:
        if isinstance(exc, BrokenChannelError):
            raise
        raise BrokenChannelError(f"connection to {what} broke: {exc}") from exc
    return buf


async def read_message(
    sock: socket.socket, deadline: float, what: str, max_body: int = p.MAX_BODY
) -> p.Message:
    """One rendezvous-protocol message, reading nothing beyond it."""
    header = await recv_exact(sock, p.HEADER_SIZE, deadline, what)
    length = p.parse_header(header, max_body)
    body = await recv_exact(sock, length, deadline, what)
    return p.decode_body(body)


async def send_message(sock: socket.socket, message: p.Message, deadline: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            await loop.sock_sendall(sock, p.encode(message))
    except TimeoutError:
        raise CommTimeout(f"could not send to {what} before the deadline") from None
    except OSError as exc:
        raise BrokenChannelError(f"connection to {what} broke: {exc}") from exc
