"""Where a peer's sockets come from, and message I/O on raw sockets.

Hole punching needs two things a plain ``asyncio.open_connection`` does not
give: a connection *from a chosen local port* (the one the rendezvous server
saw, RFC 5128 section 3.3 / 3.4) and a listener on that same port while it is
in use.  :class:`Network` names those operations, so the punching code runs
unchanged over the host's own stack (:class:`HostNetwork`) and over a
simulated NAT box (:class:`fmi_async.holepunch.natsim.NATNetwork`), where
every socket a peer opens is opened by its NAT on its behalf.

Both return plain connected, non-blocking sockets.  The handshake and the
rendezvous exchange run on them with the ``loop.sock_*`` calls, reading
exactly the bytes of each message, so that a socket handed to
``loop.create_connection(sock=...)`` afterwards has nothing of the next
layer's data consumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import Any, Protocol

from ..errors import BrokenChannelError, CommTimeout
from . import protocol as p
from .protocol import Address

__all__ = [
    "Address",
    "Listener",
    "Network",
    "HostNetwork",
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
