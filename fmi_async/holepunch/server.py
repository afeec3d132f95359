"""The rendezvous server: where peers of a run find each other, pair and relay.

One asyncio process (``fmi rendezvous``, or in-process for ``fmi run``)
serves TCP and UDP on the same port.  Every decision is made by the sans-IO
core (:mod:`~fmi_async.holepunch.server_core`, which says what the server
does); this module only moves bytes and runs timers for it:

* a TCP adapter: one task per connection decodes requests, hands each to the
  core, and carries out the actions (answers on any connection, closing,
  splicing two connections into a relay with
  :func:`~fmi_async.holepunch.relay.splice`);
* a UDP adapter on the same port: a datagram starting with the reserved byte
  ``0xF0`` carries one protocol message, one starting with ``0xF4`` and a
  pairing's nonce is relayed to the other side of a relayed pair (see
  :mod:`~fmi_async.holepunch.udp`);
* the timers the core asks for (``loop.call_later``).

What stays here is what concerns bytes and sockets: a malformed message
closes its connection; a new connection must deliver its first complete
request within ``handshake_timeout``, and every later message, once begun,
within ``handshake_timeout`` too (a slowloris trickle is cut off); a
connection with nothing going on (no request waiting for its answer) is
closed after ``idle_timeout``.  Without a secret the server refuses to start
unless ``insecure=True`` says so explicitly, and then warns.  See
``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from ..channels.udp import kinds
from ..errors import ArgumentError, ProtocolError
from .codec import Decoder, decode_datagram, encode
from .leases import LeaseDesk
from .messages import NONCE_LEN, Error, Message, RelayJoin
from .net import Address
from .pairing import PairingTable
from .registry import EntryKey, Registry
from .relay import splice
from .server_actions import Action, Close, Link, Send, ServerLimits, Splice, StartTimer, StopTimer
from .server_core import RendezvousCore

__all__ = ["RendezvousServer", "serve_forever", "UDP_RENDEZVOUS", "UDP_RELAY"]

logger = logging.getLogger(__name__)

UDP_RENDEZVOUS: Final = kinds.RENDEZVOUS
"""First byte of a rendezvous message in a UDP datagram (0xF0-0xFF are hole punching's)."""
UDP_RELAY: Final = kinds.RELAY
"""First byte of a datagram the server relays between a pair's two endpoints."""


class _Connection:
    """One TCP connection's streams, its task, and what became of it."""

    def __init__(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.task = asyncio.current_task()
        self.closing = False  # the core closed it: end after what was sent
        self.relay: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()


class RendezvousServer:
    """Asyncio rendezvous server; ``async with`` or :meth:`start`/:meth:`close`.

    ``limits`` are the fields of
    :class:`~fmi_async.holepunch.server_actions.ServerLimits` (``ttl``,
    ``handshake_timeout``, ``max_entries``, ...).  Raises
    :class:`~fmi_async.errors.ConfigError` when built without a ``secret``
    and without ``insecure=True``, and :class:`~fmi_async.errors.ArgumentError`
    for limits that cannot work or do not exist.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        insecure: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **limits: float,
    ) -> None:
        known = {spec.name for spec in dataclasses.fields(ServerLimits)}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise ArgumentError(f"unknown rendezvous server limit(s) {unknown}; known: {known}")
        self.limits = ServerLimits(**limits)  # type: ignore[arg-type]  # names checked above
        self.core = RendezvousCore(secret, insecure=insecure, limits=self.limits)
        self.secret = secret
        self.insecure = secret is None
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._address: Address | None = None
        self._connections: dict[Link, _Connection] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._numbers = 0

    def __repr__(self) -> str:
        state = f"listening on {self._address[0]}:{self._address[1]}" if self._address else "idle"
        core = self.core
        return (
            f"<RendezvousServer {state} entries={len(core.registry)} pending={core.pending} "
            f"connections={len(self._connections)} pairings={len(core.pairings)} "
            f"relays={core.relays}>"
        )

    # What the core holds, for stats and tests.
    @property
    def registry(self) -> Registry:
        return self.core.registry

    @property
    def pairings(self) -> PairingTable:
        return self.core.pairings

    @property
    def leases(self) -> LeaseDesk:
        return self.core.leases

    @property
    def relayed_bytes(self) -> int:
        return self.core.relayed_bytes

    @property
    def relayed_datagrams(self) -> int:
        return self.core.relayed_datagrams

    def _taken(self, key: EntryKey, owner: object, now: float) -> bool:
        return self.core.taken(key, owner, now)

    @property
    def address(self) -> Address:
        """The (host, port) the server listens on; the real port when started with 0."""
        if self._address is None:
            raise ArgumentError("the rendezvous server is not started; await start() first")
        return self._address

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` over TCP and UDP; raises OSError when it cannot."""
        if self._server is not None:
            raise ArgumentError("the rendezvous server is already started")
        loop = asyncio.get_running_loop()
        # TCP and UDP on the same port: with port 0, retry until the UDP port is free too.
        for attempt in range(20):
            server = await asyncio.start_server(self._on_connection, host, port)
            sockname = server.sockets[0].getsockname()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UDPAdapter(self), local_addr=(host, int(sockname[1]))
                )
            except OSError:
                server.close()
                await server.wait_closed()
                if port != 0 or attempt == 19:
                    raise
                continue
            break
        self._server, self._udp = server, transport
        self._address = (str(sockname[0]), int(sockname[1]))
        logger.info("rendezvous server listening on %s:%d (tcp and udp)", *self._address)
        if self.secret is None:
            logger.warning(
                "rendezvous server on %s:%d runs WITHOUT a secret (insecure): anyone who can "
                "reach it may register, look up and join any communicator; peers stay safe "
                "only with their own security.secret (see docs/security.md)",
                *self._address,
            )

    async def close(self) -> None:
        """Stop listening, end every connection and wake every waiting lookup."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = {c.task for c in self._connections.values() if c.task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)
        logger.info("rendezvous server on %s:%d closed", *self.address)

    async def __aenter__(self) -> RendezvousServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- carrying out actions

    def _handle(self, message: Message, link: Link) -> None:
        try:
            actions = self.core.handle(message, link, self._clock())
        except Exception:  # a bug here must not take the server down
            logger.exception("rendezvous: failed to handle %r", message)
            error = Error("internal", "the rendezvous server failed; see its log")
            actions = [Send(link, error)]
        self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        loop = asyncio.get_running_loop()
        for action in actions:
            if isinstance(action, Send):
                self._send(action.link, action.message)
            elif isinstance(action, StartTimer):
                self._timers[action.token] = loop.call_later(
                    action.seconds, self._fire, action.token
                )
            elif isinstance(action, StopTimer):
                timer = self._timers.pop(action.token, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(action, Close):
                conn = self._connections.get(action.link)
                if conn is None:
                    continue  # over UDP, or gone already
                conn.closing = True
                if conn.task is not asyncio.current_task() and conn.task is not None:
                    conn.task.cancel()  # evicted, or a waiting relay side refused
            elif isinstance(action, Splice):
                a, b = self._connections.get(action.a), self._connections.get(action.b)
                if a is not None and b is not None and not a.relay.done():
                    a.relay.set_result(b)  # a's task runs the splice, b's waits for it

    def _send(self, link: Link, message: Message) -> None:
        if link.transport == "udp":
            if self._udp is not None and link.observed is not None:
                self._udp.sendto(bytes([UDP_RENDEZVOUS]) + encode(message), link.observed)
            return
        conn = self._connections.get(link)
        if conn is not None and not conn.writer.is_closing():
            conn.writer.write(encode(message))

    def _fire(self, token: int) -> None:
        self._timers.pop(token, None)
        try:
            actions = self.core.timer(token, self._clock())
        except Exception:  # a bug here must not take the server down
            logger.exception("rendezvous: failed to handle a timer")
            return
        self._apply(actions)

    # ---------------------------------------------------------------- TCP

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peername = writer.get_extra_info("peername")
        observed: Address | None = (
            (str(peername[0]), int(peername[1])) if isinstance(peername, tuple) else None
        )
        self._numbers += 1
        conn = _Connection(Link("tcp", observed, self._numbers), reader, writer)
        self._connections[conn.link] = conn
        try:
            self._apply(self.core.opened(conn.link, asyncio.get_running_loop().time()))
            if not conn.closing:
                await self._serve(conn)
        except asyncio.CancelledError:
            pass  # server closing, or evicted while unproven
        except (ConnectionError, OSError) as exc:
            logger.debug("rendezvous: connection from %s ended: %s", observed, exc)
        finally:
            del self._connections[conn.link]
            self._apply(self.core.closed(conn.link, self._clock()))
            writer.close()

    async def _serve(self, conn: _Connection) -> None:
        decoder = Decoder()
        loop = asyncio.get_running_loop()
        limits = self.limits
        # An unproven connection must complete its first request by this time;
        # afterwards every message, once begun, within handshake_timeout.
        deadline: float | None = loop.time() + min(limits.handshake_timeout, limits.idle_timeout)
        while True:
            try:
                if deadline is not None:
                    async with asyncio.timeout_at(deadline):
                        data = await conn.reader.read(65536)
                elif self.core.waiting(conn.link):  # its answer comes when it comes
                    data = await conn.reader.read(65536)
                else:
                    async with asyncio.timeout(limits.idle_timeout):
                        data = await conn.reader.read(65536)
            except TimeoutError:
                what = "idle" if deadline is None else "too slow a"
                logger.debug("rendezvous: closing %s connection from %s", what, conn.link.observed)
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                logger.warning("rendezvous: bad message from %s: %s", conn.link.observed, exc)
                await self._flush(conn, Error("bad_request", str(exc)))
                return
            for i, message in enumerate(messages):
                if isinstance(message, RelayJoin):
                    # The connection becomes one half of a relay: nothing may follow.
                    if i != len(messages) - 1 or decoder.mid_message:
                        refusal = Error("bad_request", "nothing may follow a relay request")
                        await self._flush(conn, refusal)
                        return
                    self._handle(message, conn.link)
                    await self._relay(conn)
                    return
                self._handle(message, conn.link)
                if conn.closing:
                    break
            await self._drain(conn)
            if conn.closing:
                return
            if not decoder.mid_message:
                deadline = None
            elif messages or deadline is None:  # a new message has begun
                deadline = loop.time() + limits.handshake_timeout

    async def _relay(self, conn: _Connection) -> None:
        """This connection asked for a relay: splice it once the core pairs it, or end."""
        await self._drain(conn)
        if conn.closing:
            return
        partner = await conn.relay  # set by the core's Splice; cancelled on refusal
        if partner is None:
            return
        await self._drain(conn)
        await self._drain(partner)
        logger.debug("rendezvous: splicing %s and %s", conn.link, partner.link)
        try:
            self.core.relayed_bytes += await splice(
                (conn.reader, conn.writer),
                (partner.reader, partner.writer),
                self.limits.relay_idle_timeout,
            )
        finally:
            if not partner.relay.done():
                partner.relay.set_result(None)

    async def _drain(self, conn: _Connection) -> None:
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(self.limits.idle_timeout):
                await conn.writer.drain()

    async def _flush(self, conn: _Connection, message: Message) -> None:
        conn.writer.write(encode(message))
        await self._drain(conn)


class _UDPAdapter(asyncio.DatagramProtocol):
    """One rendezvous message per datagram, or a datagram to relay; anything else is dropped."""

    def __init__(self, server: RendezvousServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        source = (str(addr[0]), int(addr[1]))
        server = self.server
        if data and data[0] == UDP_RELAY and len(data) > 1 + NONCE_LEN:
            nonce = data[1 : 1 + NONCE_LEN]
            size = len(data) - 1 - NONCE_LEN
            target = server.core.relay_target(nonce, source, size, server._clock())
            if target is not None and server._udp is not None:
                server._udp.sendto(data, target)
            return
        if not data or data[0] != UDP_RENDEZVOUS:
            return
        try:
            message = decode_datagram(data[1:])
        except ProtocolError as exc:
            logger.debug("rendezvous: dropped a bad datagram from %s: %s", addr, exc)
            return
        server._handle(message, Link("udp", source))

    def error_received(self, exc: Exception) -> None:
        logger.debug("rendezvous: udp error: %s", exc)


async def serve_forever(
    host: str = "0.0.0.0",
    port: int = 10000,
    secret: bytes | None = None,
    *,
    ready: Callable[[Address], None] | None = None,
    **options: Any,
) -> None:
    """Run a rendezvous server until cancelled (Ctrl-C in ``fmi rendezvous``)."""
    server = RendezvousServer(secret, **options)  # ConfigError without secret or insecure=True
    await server.start(host, port)
    try:
        if ready is not None:
            ready(server.address)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await server.close()
