"""The rendezvous server: where peers of a run find each other's addresses.

One asyncio process (``fmi rendezvous``, or in-process for ``fmi run``)
keeps ``(comm, run_id, peer) -> address``.  A lookup for a peer that has
not registered yet waits for it, so peers may start in any order; every wait
is bounded by the timeout in the request, capped by the server's own.

Everything is bounded, because the server may face the internet: entries
expire after a TTL unless renewed, the number of entries, of waiting lookups
and of connections is capped, every connection has an idle timeout, and a
malformed message closes its connection.  With a shared secret every
register and lookup must carry a valid HMAC proof.

:class:`Registry` holds the table without any I/O (time is passed in), so its
expiry logic is tested without sockets or sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ..errors import ArgumentError, ProtocolError
from . import protocol as p

__all__ = ["RendezvousServer", "Registry", "serve_forever"]

logger = logging.getLogger(__name__)

EntryKey = tuple[str, str, int]  # comm, run_id, peer
_UNSPECIFIED_HOSTS = frozenset(("", "0.0.0.0", "::"))


class Registry:
    """Who registered where, with expiry; pure bookkeeping, time passed in.

    Entries live in insertion order and a renewal moves one to the end, so
    with one TTL for all the stale entries are always at the front and expiry
    is amortised O(1).
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[EntryKey, tuple[p.Address, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry entries={len(self._entries)}/{self.max_entries} ttl={self.ttl}>"

    def expire(self, now: float) -> int:
        """Drop the entries whose TTL has passed; returns how many."""
        dropped = 0
        while self._entries:
            key, (_, expires) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[key]
            dropped += 1
        return dropped

    def register(self, key: EntryKey, addr: p.Address, now: float) -> bool:
        """Add or renew an entry; False if the table is full."""
        self.expire(now)
        if key not in self._entries and len(self._entries) >= self.max_entries:
            return False
        self._entries[key] = (addr, now + self.ttl)
        self._entries.move_to_end(key)
        return True

    def get(self, key: EntryKey, now: float) -> p.Address | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]


class RendezvousServer:
    """Asyncio rendezvous server; ``async with`` or :meth:`start`/:meth:`close`."""

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        ttl: float = 3600.0,
        default_lookup_timeout: float = 30.0,
        max_lookup_timeout: float = 600.0,
        idle_timeout: float = 60.0,
        max_entries: int = 100_000,
        max_pending: int = 10_000,
        max_connections: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or default_lookup_timeout <= 0 or idle_timeout <= 0:
            raise ArgumentError("ttl, default_lookup_timeout and idle_timeout must be positive")
        self.secret = secret
        self.default_lookup_timeout = default_lookup_timeout
        self.max_lookup_timeout = max_lookup_timeout
        self.idle_timeout = idle_timeout
        self.max_pending = max_pending
        self.max_connections = max_connections
        self.registry = Registry(ttl, max_entries)
        self._clock = clock
        self._waiters: dict[EntryKey, set[asyncio.Future[p.Address]]] = {}
        self._pending = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._address: p.Address | None = None

    def __repr__(self) -> str:
        state = f"listening on {self._address[0]}:{self._address[1]}" if self._address else "idle"
        return (
            f"<RendezvousServer {state} entries={len(self.registry)} "
            f"pending={self._pending} connections={len(self._handlers)}>"
        )

    @property
    def address(self) -> p.Address:
        """The (host, port) the server listens on; the real port when started with 0."""
        if self._address is None:
            raise ArgumentError("the rendezvous server is not started; await start() first")
        return self._address

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise ArgumentError("the rendezvous server is already started")
        self._server = await asyncio.start_server(self._on_connection, host, port)
        sockname = self._server.sockets[0].getsockname()
        self._address = (str(sockname[0]), int(sockname[1]))
        logger.info("rendezvous server listening on %s:%d", *self._address)

    async def close(self) -> None:
        """Stop listening, end every connection and wake every waiting lookup."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5.0)
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

    # ---------------------------------------------------------------- connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= self.max_connections:
            logger.warning("rendezvous: too many connections, refusing one")
            writer.close()
            return
        self._handlers.add(task)
        peername = writer.get_extra_info("peername")
        observed: p.Address | None = (
            (str(peername[0]), int(peername[1])) if isinstance(peername, tuple) else None
        )
        try:
            await self._serve_connection(reader, writer, observed)
        except asyncio.CancelledError:
            pass  # server closing
        except (ConnectionError, OSError) as exc:
            logger.debug("rendezvous: connection from %s ended: %s", observed, exc)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        observed: p.Address | None,
    ) -> None:
        decoder = p.Decoder()
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    data = await reader.read(65536)
            except TimeoutError:
                logger.debug("rendezvous: closing idle connection from %s", observed)
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                logger.warning("rendezvous: bad message from %s: %s", observed, exc)
                writer.write(p.encode(p.Error("bad_request", str(exc))))
                async with asyncio.timeout(self.idle_timeout):
                    await writer.drain()
                return
            for message in messages:
                try:
                    answer = await self._handle(message, observed)
                except Exception:  # a bug here must not take the server down
                    logger.exception("rendezvous: failed to handle %r", message)
                    answer = p.Error("internal", "the rendezvous server failed; see its log")
                writer.write(p.encode(answer))
                async with asyncio.timeout(self.idle_timeout):
                    await writer.drain()

    async def _handle(self, message: p.Message, observed: p.Address | None) -> p.Message:
        if isinstance(message, p.Register):
            return self._register(message, observed)
        if isinstance(message, p.Lookup):
            return await self._lookup(message)
        return p.Error("bad_request", f"the rendezvous server does not accept {message.TYPE!r}")

    def _register(self, msg: p.Register, observed: p.Address | None) -> p.Message:
        if not p.verify(msg, self.secret):
            logger.warning("rendezvous: rejected register of peer %d from %s", msg.peer, observed)
            return p.Error("auth", _AUTH_HINT, msg.id)
        addr = msg.addr
        if addr[0] in _UNSPECIFIED_HOSTS and observed is not None:
            # A peer listening on all interfaces is reachable where we saw it from.
            addr = (observed[0], addr[1])
        key = (msg.comm, msg.run_id, msg.peer)
        if not self.registry.register(key, addr, self._clock()):
            return p.Error(
                "overloaded",
                f"the rendezvous server holds {self.registry.max_entries} entries already; "
                "retry later or raise max_entries",
                msg.id,
            )
        logger.debug("rendezvous: %s/%s peer %d at %s:%d", msg.comm, msg.run_id, msg.peer, *addr)
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(addr)
        return p.Ok(observed, self.registry.ttl, msg.id)

    async def _lookup(self, msg: p.Lookup) -> p.Message:
        if not p.verify(msg, self.secret):
            return p.Error("auth", _AUTH_HINT, msg.id)
        key = (msg.comm, msg.run_id, msg.peer)
        addr = self.registry.get(key, self._clock())
        if addr is not None:
            return p.PeerInfo(msg.peer, addr, msg.id)
        timeout = self.default_lookup_timeout if msg.timeout is None else msg.timeout
        timeout = min(timeout, self.max_lookup_timeout)
        if self._pending >= self.max_pending:
            return p.Error(
                "overloaded",
                f"the rendezvous server has {self.max_pending} lookups waiting; retry later",
                msg.id,
            )
        fut: asyncio.Future[p.Address] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(fut)
        self._pending += 1
        try:
            async with asyncio.timeout(timeout):
                addr = await fut
        except TimeoutError:
            return p.Error(
                "timeout",
                f"peer {msg.peer} of communicator {msg.comm!r} (run {msg.run_id}) did not "
                f"register within {timeout:.3g}s",
                msg.id,
            )
        finally:
            self._pending -= 1
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[key]
        return p.PeerInfo(msg.peer, addr, msg.id)


_AUTH_HINT = (
    "invalid or missing proof: this peer's security.secret does not match the "
    "rendezvous server's secret"
)


async def serve_forever(
    host: str = "0.0.0.0",
    port: int = 10000,
    secret: bytes | None = None,
    *,
    ready: Callable[[p.Address], None] | None = None,
    **options: Any,
) -> None:
    """Run a rendezvous server until cancelled (Ctrl-C in ``fmi rendezvous``)."""
    server = RendezvousServer(secret, **options)
    await server.start(host, port)
    try:
        if ready is not None:
            ready(server.address)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await server.close()
