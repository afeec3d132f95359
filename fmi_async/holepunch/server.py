"""The rendezvous server: where peers of a run find each other, pair and relay.

One asyncio process (``fmi rendezvous``, or in-process for ``fmi run``)
serves TCP and UDP on the same port.  It keeps ``(comm, run_id, peer) ->
address``; a lookup for a peer that has not registered yet waits for it, so
peers may start in any order; every wait is bounded by the timeout in the
request, capped by the server's own.

For NAT traversal it pairs two peers that join the same pairing, tells each
the endpoint it *observed* for the other (the NAT's public mapping), invites
a responder over its control connection (the connection its register came
on; over UDP, the endpoint it published from), arbitrates the outcome from
both punch reports (:mod:`~fmi_async.holepunch.pairing`; a TCP pair
relayed lately is told ``relay`` at once, without punching), and relays the
pairs that cannot be punched (:mod:`~fmi_async.holepunch.relay` for TCP;
for UDP, datagrams that start with ``0xF4`` and the pairing's nonce are
forwarded between the pair's two observed endpoints).  UDP datagrams to the
server start with the reserved byte ``0xF0`` followed by one protocol
message (see :mod:`~fmi_async.holepunch.udp`).

Everything is bounded, because the server may face the internet: entries
expire after a TTL unless renewed, the number of entries, of waiting lookups
and of connections is capped, every connection has an idle timeout, and a
malformed message closes its connection.  With a shared secret every
register, lookup, join, result and relay request must carry a valid HMAC
proof, and a request that does not is answered ``auth`` and its connection
closed.  Without one the server refuses to start unless ``insecure=True``
says so explicitly, and then warns.

Strangers cannot hold connections: a new connection is *unproven* until its
first complete request was accepted, must deliver that request within
``handshake_timeout``, and counts against ``max_unproven`` and
``max_unproven_per_source``; one over either limit evicts the oldest
unproven connection (:class:`~fmi_async.holepunch.admission.Admission`).
Every later message, once begun, must also be complete within
``handshake_timeout`` (a slowloris trickle is cut off).

A registration belongs to its first registrant: its control connection
(over TCP) or its source endpoint (over UDP).  On a server without a secret,
a register for the same ``(comm, run_id, peer)`` from anyone else is refused
while the entry lives and its owner is still there (its connection open, or
over UDP renewed within ``idle_timeout``), so a stranger cannot take over a
peer's registration.  With a secret every registrant proved membership, and
a member's register replaces the entry (a peer that reconnected before the
server noticed its old connection died).  See ``docs/security.md``.

:class:`Registry` holds the table without any I/O (time is passed in), so its
expiry logic is tested without sockets or sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

from ..errors import ArgumentError, ConfigError, ProtocolError
from . import protocol as p
from .admission import Admission
from .leases import LeaseService
from .pairing import Pairing, PairingTable, PairKey
from .relay import splice

__all__ = ["RendezvousServer", "Registry", "serve_forever", "UDP_RENDEZVOUS", "UDP_RELAY"]

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
        self._nat: dict[EntryKey, bool] = {}
        self._owners: dict[EntryKey, object] = {}

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
            self._nat.pop(key, None)
            self._owners.pop(key, None)
            dropped += 1
        return dropped

    def register(
        self, key: EntryKey, addr: p.Address, now: float, nat: bool = False, owner: object = None
    ) -> bool:
        """Add or renew an entry for ``owner``; False if the table is full.

        Whether ``owner`` may take an entry someone else holds is the
        caller's decision (:meth:`owner` and :meth:`renewed` tell it who
        holds it and since when).
        """
        self.expire(now)
        if key not in self._entries and len(self._entries) >= self.max_entries:
            return False
        self._entries[key] = (addr, now + self.ttl)
        self._nat[key] = nat
        self._owners[key] = owner
        self._entries.move_to_end(key)
        return True

    def owner(self, key: EntryKey, now: float) -> object:
        """Who holds the live entry ``key`` (None if nobody, or registered without an owner)."""
        return self._owners.get(key) if self.get(key, now) is not None else None

    def renewed(self, key: EntryKey) -> float | None:
        """When the entry was last registered or renewed."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1] - self.ttl

    def get(self, key: EntryKey, now: float) -> p.Address | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def behind_nat(self, key: EntryKey) -> bool:
        """Whether the peer's register showed an address translator in between."""
        return self._nat.get(key, False)


class RendezvousServer:
    """Asyncio rendezvous server; ``async with`` or :meth:`start`/:meth:`close`.

    Raises :class:`~fmi_async.errors.ConfigError` when built without a
    ``secret`` and without ``insecure=True``, and
    :class:`~fmi_async.errors.ArgumentError` for limits that cannot work.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        insecure: bool = False,
        handshake_timeout: float = 5.0,
        max_unproven: int = 1024,
        max_unproven_per_source: int = 32,
        ttl: float = 3600.0,
        default_lookup_timeout: float = 30.0,
        max_lookup_timeout: float = 600.0,
        idle_timeout: float = 60.0,
        max_entries: int = 100_000,
        max_pending: int = 10_000,
        max_connections: int = 4096,
        max_pairings: int = 10_000,
        result_timeout: float = 30.0,
        relay_memory: float = 600.0,
        relay_wait: float = 30.0,
        relay_idle_timeout: float = 3600.0,
        max_relays: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or default_lookup_timeout <= 0 or idle_timeout <= 0 or handshake_timeout <= 0:
            raise ArgumentError(
                "ttl, default_lookup_timeout, idle_timeout and handshake_timeout must be positive"
            )
        if secret is not None and not secret:
            raise ConfigError("the rendezvous server's secret must not be empty")
        if secret is None and not insecure:
            raise ConfigError(
                "a rendezvous server needs a shared secret (RendezvousServer(secret=...), "
                "`fmi rendezvous --secret-file FILE`), or insecure=True (`--insecure`) to run "
                "without one, where anyone who can reach it may register, look up and join"
            )
        self.secret = secret
        self.insecure = secret is None
        self.handshake_timeout = handshake_timeout
        self._unproven: Admission[asyncio.Task[None]] = Admission(
            max_unproven, max_unproven_per_source
        )
        self.default_lookup_timeout = default_lookup_timeout
        self.max_lookup_timeout = max_lookup_timeout
        self.idle_timeout = idle_timeout
        self.max_pending = max_pending
        self.max_connections = max_connections
        self.relay_wait = relay_wait
        self.relay_idle_timeout = relay_idle_timeout
        self.max_relays = max_relays
        self.registry = Registry(ttl, max_entries)
        self.pairings = PairingTable(
            join_timeout=max_lookup_timeout,
            result_timeout=result_timeout,
            relay_memory=relay_memory,
            max_pairings=max_pairings,
        )
        self._clock = clock
        self._waiters: dict[EntryKey, set[asyncio.Future[p.Address]]] = {}
        self._pending = 0
        self._server: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._address: p.Address | None = None
        self._controls: dict[EntryKey, asyncio.StreamWriter] = {}
        self._udp_controls: dict[EntryKey, p.Address] = {}
        self._relay_slots: dict[tuple[str, str, int, int], dict[int, _RelaySide]] = {}
        self._relays = 0
        self.relayed_bytes = 0
        # udp relays by pairing nonce, least recently used first
        self._udp_relays: OrderedDict[bytes, _UDPRelay] = OrderedDict()
        self.relayed_datagrams = 0
        # job leases (fmi_async/lease_record.py): claim, refresh, release
        self.leases = LeaseService(
            secret,
            clock=clock,
            default_wait=default_lookup_timeout,
            max_wait=max_lookup_timeout,
            max_records=max_entries,
        )

    def __repr__(self) -> str:
        state = f"listening on {self._address[0]}:{self._address[1]}" if self._address else "idle"
        return (
            f"<RendezvousServer {state} entries={len(self.registry)} "
            f"pending={self._pending} connections={len(self._handlers)} "
            f"pairings={len(self.pairings)} relays={self._relays}>"
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
        loop = asyncio.get_running_loop()
        # TCP and UDP on the same port: with port 0, retry until the UDP port is free too.
        for attempt in range(20):
            server = await asyncio.start_server(self._on_connection, host, port)
            sockname = server.sockets[0].getsockname()
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UDPServer(self), local_addr=(host, int(sockname[1]))
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
        peername = writer.get_extra_info("peername")
        observed: p.Address | None = (
            (str(peername[0]), int(peername[1])) if isinstance(peername, tuple) else None
        )
        self._admit(task, observed)
        if len(self._handlers) >= self.max_connections:
            logger.warning("rendezvous: too many connections, refusing one")
            self._unproven.settle(task)
            writer.close()
            return
        self._handlers.add(task)
        controls: set[EntryKey] = set()
        try:
            await self._serve_connection(reader, writer, observed, controls)
        except asyncio.CancelledError:
            pass  # server closing, or evicted while unproven
        except (ConnectionError, OSError) as exc:
            logger.debug("rendezvous: connection from %s ended: %s", observed, exc)
        finally:
            self._unproven.settle(task)
            self._handlers.discard(task)
            for key in controls:
                if self._controls.get(key) is writer:
                    del self._controls[key]
            writer.close()

    def _admit(self, task: asyncio.Task[None], observed: p.Address | None) -> None:
        """Count a new connection as unproven; evict the oldest ones over the limits."""
        source = observed[0] if observed is not None else "?"
        now = asyncio.get_running_loop().time()
        for old in self._unproven.admit(task, source, now):
            old.cancel()
        evicted = self._unproven.report(now)
        if evicted:
            logger.warning(
                "rendezvous: %d connection(s) that had sent no valid request evicted to make "
                "room (max_unproven=%d, max_unproven_per_source=%d; latest from %s)",
                evicted, self._unproven.max_total, self._unproven.max_per_source, source,
            )  # fmt: skip

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        observed: p.Address | None,
        controls: set[EntryKey],
    ) -> None:
        decoder = p.Decoder()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        proven = False
        # An unproven connection must complete its first request by this time;
        # afterwards every message, once begun, within handshake_timeout.
        message_deadline: float | None = loop.time() + min(
            self.handshake_timeout, self.idle_timeout
        )

        async def send(message: p.Message) -> None:
            writer.write(p.encode(message))
            async with asyncio.timeout(self.idle_timeout):
                await writer.drain()

        while True:
            try:
                if message_deadline is None:
                    async with asyncio.timeout(self.idle_timeout):
                        data = await reader.read(65536)
                else:
                    async with asyncio.timeout_at(message_deadline):
                        data = await reader.read(65536)
            except TimeoutError:
                what = "idle" if message_deadline is None else "too slow a"
                logger.debug("rendezvous: closing %s connection from %s", what, observed)
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                logger.warning("rendezvous: bad message from %s: %s", observed, exc)
                await send(p.Error("bad_request", str(exc)))
                return
            if not proven and messages:
                proven = True  # a whole request came in time; one refused closes us below
                if task is not None:
                    self._unproven.settle(task)
            for i, message in enumerate(messages):
                if isinstance(message, p.RelayJoin):
                    # The connection becomes one half of a relay: nothing may follow.
                    if i != len(messages) - 1 or decoder.mid_message:
                        await send(p.Error("bad_request", "nothing may follow a relay request"))
                        return
                    await self._relay(message, reader, writer)
                    return
                try:
                    answer = await self._handle(message, observed, send, owner=writer)
                except Exception:  # a bug here must not take the server down
                    logger.exception("rendezvous: failed to handle %r", message)
                    answer = p.Error("internal", "the rendezvous server failed; see its log")
                if isinstance(message, p.Register) and isinstance(answer, p.Ok):
                    key = (message.comm, message.run_id, message.peer)
                    self._controls[key] = writer  # invites for this peer go here
                    controls.add(key)
                if answer is not None:
                    await send(answer)
                if isinstance(answer, p.Error) and answer.code in ("auth", "bad_request"):
                    return  # no second guess on the same connection
            # Timed from now, after handling: a lookup may have waited meanwhile.
            if not decoder.mid_message:
                message_deadline = None
            elif messages or message_deadline is None:  # a new message has begun
                message_deadline = loop.time() + self.handshake_timeout

    async def _handle(
        self,
        message: p.Message,
        observed: p.Address | None,
        send: Callable[[p.Message], Awaitable[None]],
        owner: asyncio.StreamWriter | None = None,
    ) -> p.Message | None:
        if isinstance(message, p.Register):
            return self._register(message, observed, owner)
        if isinstance(message, p.Lookup):
            return await self._lookup(message)
        if isinstance(message, p.Join) and observed is not None:
            return await self._join(message, observed, send)
        if isinstance(message, p.PunchResult):
            return await self._result(message)
        if isinstance(message, (p.Claim, p.Refresh, p.Release)):
            return await self.leases.handle(message)
        return p.Error("bad_request", f"the rendezvous server does not accept {message.TYPE!r}")

    def _register(
        self, msg: p.Register, observed: p.Address | None, owner: object = None
    ) -> p.Message:
        if not p.verify(msg, self.secret):
            logger.warning("rendezvous: rejected register of peer %d from %s", msg.peer, observed)
            return p.Error("auth", _AUTH_HINT, msg.id)
        addr = msg.addr
        if addr[0] in _UNSPECIFIED_HOSTS and observed is not None:
            # A peer listening on all interfaces is reachable where we saw it from.
            addr = (observed[0], addr[1])
        # A local endpoint that is not the observed one: a translator sits in between.
        nat = msg.local is not None and observed is not None and msg.local != observed
        key = (msg.comm, msg.run_id, msg.peer)
        now = self._clock()
        if self._taken(key, owner, now):
            logger.warning(
                "rendezvous: refused register of %s/%s peer %d from %s: another registrant "
                "holds it", msg.comm, msg.run_id, msg.peer, observed,
            )  # fmt: skip
            return p.Error("auth", _taken_hint(msg), msg.id)
        if owner is None:
            owner = observed
        if not self.registry.register(key, addr, now, nat, owner):
            return p.Error(
                "overloaded",
                f"the rendezvous server holds {self.registry.max_entries} entries already; "
                "retry later or raise max_entries",
                msg.id,
            )
        logger.debug(
            "rendezvous: %s/%s peer %d at %s:%d%s",
            msg.comm, msg.run_id, msg.peer, *addr, " behind NAT" if nat else "",
        )  # fmt: skip
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(addr)
        return p.Ok(observed, self.registry.ttl, msg.id)

    def _taken(self, key: EntryKey, owner: object, now: float) -> bool:
        """Whether another registrant, still present, holds ``key`` (without a secret only).

        Present means: its control connection is open (TCP), or it renewed
        within ``idle_timeout`` (UDP, where the owner is its source endpoint).
        With a secret every registrant proved membership, so a member may
        re-register from anywhere.
        """
        if self.secret is not None:
            return False
        current = self.registry.owner(key, now)
        if current is None or current is owner or current == owner:
            return False
        if isinstance(current, asyncio.StreamWriter):
            return not current.is_closing()
        renewed = self.registry.renewed(key)
        return renewed is not None and now - renewed < self.idle_timeout

    async def _lookup(self, msg: p.Lookup) -> p.Message:
        if not p.verify(msg, self.secret):
            return p.Error("auth", _AUTH_HINT, msg.id)
        key = (msg.comm, msg.run_id, msg.peer)
        addr = self.registry.get(key, self._clock())
        if addr is not None:
            return p.PeerInfo(msg.peer, addr, msg.id, self.registry.behind_nat(key))
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
        return p.PeerInfo(msg.peer, addr, msg.id, self.registry.behind_nat(key))

    # ---------------------------------------------------------------- pairing over TCP

    def _events(self, pairing: Pairing) -> _PairingEvents:
        if pairing.extra is None:
            pairing.extra = _PairingEvents()
        events: _PairingEvents = pairing.extra
        return events

    async def _join(
        self,
        msg: p.Join,
        observed: p.Address,
        send: Callable[[p.Message], Awaitable[None]],
    ) -> p.Message | None:
        if not p.verify(msg, self.secret):
            logger.warning("rendezvous: rejected join of peer %d from %s", msg.peer, observed)
            return p.Error("auth", _AUTH_HINT, msg.id)
        key: PairKey = (msg.comm, msg.run_id, msg.transport, msg.initiator, msg.responder)
        now = self._clock()
        self._expire_pairings(now)
        pairing = self.pairings.join(key, msg.peer, observed, msg.local, now, msg.id)
        if pairing is None:
            return p.Error(
                "overloaded",
                f"the rendezvous server has {self.pairings.max_pairings} pairings open; "
                "retry later",
                msg.id,
            )
        await send(p.EndpointReport(observed, msg.local, msg.id))
        other = pairing.other(msg.peer)
        events = self._events(pairing)
        if pairing.complete:
            events.joined.set()
        elif msg.peer == msg.initiator:
            self._invite(msg)
        timeout = self.default_lookup_timeout if msg.timeout is None else msg.timeout
        timeout = min(timeout, self.max_lookup_timeout)
        try:
            async with asyncio.timeout(timeout):
                await events.joined.wait()
        except TimeoutError:
            return p.Error(
                "timeout",
                f"peer {other} of communicator {msg.comm!r} (run {msg.run_id}) did not join "
                f"the pairing {msg.initiator}->{msg.responder} within {timeout:.3g}s",
                msg.id,
            )
        side = pairing.sides[other]
        # A pair relayed lately is relayed again: both sides hear it here, together.
        return p.PeerEndpoint(
            other, side.observed, side.local, pairing.nonce, msg.id, relay=pairing.reused
        )

    def _invite(self, msg: p.Join) -> None:
        invite = p.Invite(msg.comm, msg.run_id, msg.initiator, msg.responder, msg.transport)
        target = msg.responder if msg.peer == msg.initiator else msg.initiator
        key = (msg.comm, msg.run_id, target)
        if msg.transport == "tcp":
            writer = self._controls.get(key)
            if writer is not None and not writer.is_closing():
                logger.debug("rendezvous: inviting peer %d to pair with %d", target, msg.peer)
                writer.write(p.encode(invite))
                return
        else:
            addr = self._udp_controls.get(key)
            if addr is not None and self._udp is not None:
                self._udp.sendto(bytes([UDP_RENDEZVOUS]) + p.encode(invite), addr)
                return
        logger.debug("rendezvous: peer %d has no control connection to invite", target)

    async def _result(self, msg: p.PunchResult) -> p.Message:
        if not p.verify(msg, self.secret):
            return p.Error("auth", _AUTH_HINT, msg.id)
        key: PairKey = (msg.comm, msg.run_id, msg.transport, msg.initiator, msg.responder)
        pairing = self.pairings.get(key)
        now = self._clock()
        if pairing is None or msg.peer not in pairing.sides:
            return p.Error("expired", f"pairing {msg.initiator}->{msg.responder} expired", msg.id)
        outcome = self.pairings.report(key, msg.peer, msg.ok, now)
        events = self._events(pairing)
        if outcome is None:
            try:
                async with asyncio.timeout(self.pairings.result_timeout):
                    await events.decided.wait()
            except TimeoutError:
                self.pairings.decide(key, "relay", self._clock())  # a silent side failed
        events.decided.set()
        assert pairing.outcome is not None
        return p.Verdict(pairing.outcome, msg.id)

    def _expire_pairings(self, now: float) -> None:
        for pairing in self.pairings.expire(now):
            logger.debug("rendezvous: pairing %s expired undecided", pairing.key)

    # ---------------------------------------------------------------- relay

    async def _relay(
        self, msg: p.RelayJoin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def refuse(code: p.ErrorCode, text: str) -> None:
            writer.write(p.encode(p.Error(code, text, msg.id)))
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(self.idle_timeout):
                    await writer.drain()

        if not p.verify(msg, self.secret):
            await refuse("auth", _AUTH_HINT)
            return
        now = self._clock()
        if not self.pairings.relay_allowed(msg.comm, msg.run_id, msg.initiator, msg.responder, now):
            await refuse(
                "bad_request",
                f"no relay verdict for pairing {msg.initiator}->{msg.responder}; pair first",
            )
            return
        rkey = (msg.comm, msg.run_id, msg.initiator, msg.responder)
        slot = self._relay_slots.setdefault(rkey, {})
        other = msg.responder if msg.peer == msg.initiator else msg.initiator
        mine = _RelaySide(reader, writer, asyncio.get_running_loop().create_future(), msg.id)
        partner = slot.pop(other, None)
        if partner is None:
            if self._relays >= self.max_relays:
                await refuse("overloaded", f"the server relays {self.max_relays} pairs already")
                return
            slot[msg.peer] = mine
            try:
                async with asyncio.timeout(self.relay_wait):
                    await asyncio.shield(mine.started)
            except TimeoutError:
                await refuse("timeout", f"peer {other} did not open its side of the relay")
                return
            finally:
                if slot.get(msg.peer) is mine:
                    del slot[msg.peer]
                if not slot:
                    self._relay_slots.pop(rkey, None)
            await mine.done.wait()  # the partner's task runs the splice
            return
        if not slot:
            self._relay_slots.pop(rkey, None)
        partner.started.set_result(None)
        ok = p.encode(p.Ok(id=msg.id))
        writer.write(ok)
        partner.writer.write(p.encode(p.Ok(id=partner.request_id)))
        self._relays += 1
        logger.debug("rendezvous: relaying %s", rkey)
        try:
            self.relayed_bytes += await splice(
                (reader, writer), (partner.reader, partner.writer), self.relay_idle_timeout
            )
        finally:
            self._relays -= 1
            partner.done.set()

    # ---------------------------------------------------------------- UDP

    def _datagram(self, msg: p.Message, addr: p.Address) -> None:
        """One rendezvous message over UDP; answers go back to where it came from."""
        if isinstance(msg, p.Join) and msg.transport == "udp":
            self._udp_join(msg, addr)
        elif isinstance(msg, p.PunchResult) and msg.transport == "udp":
            self._udp_result(msg, addr)
        else:
            self._udp_send(p.Error("bad_request", f"{msg.TYPE!r} is not served over udp"), addr)

    def _udp_send(self, message: p.Message, addr: p.Address) -> None:
        if self._udp is not None:
            self._udp.sendto(bytes([UDP_RENDEZVOUS]) + p.encode(message), addr)

    def _udp_register(self, msg: p.Register, addr: p.Address) -> None:
        if not p.verify(msg, self.secret):
            self._udp_send(p.Error("auth", _AUTH_HINT, msg.id), addr)
            return
        key = (msg.comm, msg.run_id, msg.peer)
        nat = msg.local is not None and msg.local != addr
        now = self._clock()
        if self._taken(key, addr, now):
            self._udp_send(p.Error("auth", _taken_hint(msg), msg.id), addr)
            return
        if not self.registry.register(key, addr, now, nat, addr):
            self._udp_send(p.Error("overloaded", "the registry is full", msg.id), addr)
            return
        self._udp_controls[key] = addr
        if len(self._udp_controls) > self.registry.max_entries:
            self._udp_controls.pop(next(iter(self._udp_controls)))
        for fut in self._waiters.pop(key, ()):
            if not fut.done():
                fut.set_result(addr)
        self._udp_send(p.Ok(addr, self.registry.ttl, msg.id), addr)

    def _udp_join(self, msg: p.Join, addr: p.Address) -> None:
        if not p.verify(msg, self.secret):
            self._udp_send(p.Error("auth", _AUTH_HINT, msg.id), addr)
            return
        key: PairKey = (msg.comm, msg.run_id, "udp", msg.initiator, msg.responder)
        now = self._clock()
        self._expire_pairings(now)
        pairing = self.pairings.join(key, msg.peer, addr, msg.local, now, msg.id)
        if pairing is None:
            self._udp_send(p.Error("overloaded", "too many pairings open", msg.id), addr)
            return
        self._udp_send(p.EndpointReport(addr, msg.local, msg.id), addr)
        if not pairing.complete:
            self._invite(msg)
            return
        for peer, side in pairing.sides.items():
            other = pairing.sides[pairing.other(peer)]
            answer = p.PeerEndpoint(
                pairing.other(peer), other.observed, other.local, pairing.nonce, side.request_id
            )
            self._udp_send(answer, side.observed)
        if pairing.outcome is not None:
            self._udp_verdict(pairing)

    def _udp_result(self, msg: p.PunchResult, addr: p.Address) -> None:
        if not p.verify(msg, self.secret):
            self._udp_send(p.Error("auth", _AUTH_HINT, msg.id), addr)
            return
        key: PairKey = (msg.comm, msg.run_id, "udp", msg.initiator, msg.responder)
        now = self._clock()
        pairing = self.pairings.get(key)
        if pairing is None or msg.peer not in pairing.sides:
            self._udp_send(p.Error("expired", "the pairing expired; join again", msg.id), addr)
            return
        outcome = self.pairings.report(key, msg.peer, msg.ok, now)
        if outcome is None and self.pairings.overdue(key, now):
            outcome = self.pairings.decide(key, "relay", now)
        if outcome is not None:
            self._udp_verdict(pairing)

    def _udp_verdict(self, pairing: Pairing) -> None:
        assert pairing.outcome is not None
        if (
            pairing.outcome == "relay"
            and pairing.complete
            and pairing.nonce not in self._udp_relays
        ):
            # Open before the verdict goes out: data follows it at once.
            (a, side_a), (b, side_b) = pairing.sides.items()
            relay = _UDPRelay(side_a.observed, side_b.observed, self._clock())
            self._udp_relays[pairing.nonce] = relay
            while len(self._udp_relays) > self.max_relays:
                self._udp_relays.popitem(last=False)  # the one idle longest
            logger.debug("rendezvous: relaying udp %s (%d<->%d)", pairing.key, a, b)
        for side in pairing.sides.values():
            self._udp_send(p.Verdict(pairing.outcome, side.request_id), side.observed)

    def _udp_relay(self, data: bytes, source: p.Address) -> None:
        """Forward a relayed datagram (0xF4, nonce, payload) to the other side of its pair.

        Only for pairings decided ``relay``, and only from one of the two
        endpoints the pairing observed, so the server relays for nobody else;
        a relay idle for ``relay_idle_timeout`` is forgotten.
        """
        nonce = data[1 : 1 + p.NONCE_LEN]
        relay = self._udp_relays.get(nonce)
        if relay is None or self._udp is None:
            return
        now = self._clock()
        if now - relay.used > self.relay_idle_timeout:
            del self._udp_relays[nonce]
            return
        if source == relay.a:
            target = relay.b
        elif source == relay.b:
            target = relay.a
        else:
            return
        relay.used = now
        self._udp_relays.move_to_end(nonce)
        self.relayed_datagrams += 1
        self.relayed_bytes += len(data) - 1 - p.NONCE_LEN
        self._udp.sendto(data, target)


UDP_RENDEZVOUS: Final = 0xF0
"""First byte of a rendezvous message in a UDP datagram (0xF0-0xFF are hole punching's)."""
UDP_RELAY: Final = 0xF4
"""First byte of a datagram the server relays between a pair's two endpoints."""


class _UDPServer(asyncio.DatagramProtocol):
    """Decodes one rendezvous message per datagram; anything else is dropped."""

    def __init__(self, server: RendezvousServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if data and data[0] == UDP_RELAY and len(data) > 1 + p.NONCE_LEN:
            self.server._udp_relay(data, (str(addr[0]), int(addr[1])))
            return
        if len(data) < 1 + p.HEADER_SIZE or data[0] != UDP_RENDEZVOUS:
            return
        try:
            length = p.parse_header(data[1 : 1 + p.HEADER_SIZE])
            if length != len(data) - 1 - p.HEADER_SIZE:
                raise ProtocolError("datagram length does not match the envelope")
            message = p.decode_body(data[1 + p.HEADER_SIZE :])
        except ProtocolError as exc:
            logger.debug("rendezvous: dropped a bad datagram from %s: %s", addr, exc)
            return
        source = (str(addr[0]), int(addr[1]))
        try:
            if isinstance(message, p.Register):
                self.server._udp_register(message, source)
            else:
                self.server._datagram(message, source)
        except Exception:  # a bug here must not take the server down
            logger.exception("rendezvous: failed to handle datagram %r", message)

    def error_received(self, exc: Exception) -> None:
        logger.debug("rendezvous: udp error: %s", exc)


class _UDPRelay:
    """The two endpoints a relayed UDP pair was observed at, and its last use."""

    __slots__ = ("a", "b", "used")

    def __init__(self, a: p.Address, b: p.Address, used: float) -> None:
        self.a, self.b, self.used = a, b, used


class _PairingEvents:
    def __init__(self) -> None:
        self.joined = asyncio.Event()
        self.decided = asyncio.Event()


class _RelaySide:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        started: asyncio.Future[None],
        request_id: int | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.started = started
        self.request_id = request_id
        self.done = asyncio.Event()


_AUTH_HINT = (
    "invalid or missing proof: this peer's security.secret does not match the "
    "rendezvous server's secret"
)


def _taken_hint(msg: p.Register) -> str:
    return (
        f"peer {msg.peer} of communicator {msg.comm!r} (run {msg.run_id}) is registered "
        "already by another registrant that is still connected.  This server has no secret, "
        "so a registration belongs to whoever made it first until it expires or its "
        "connection closes.  If that is not an earlier run of this peer, someone else took "
        "its name: run the server with a secret (`fmi rendezvous --secret-file`) and give "
        "every peer the same security.secret"
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
    server = RendezvousServer(secret, **options)  # ConfigError without secret or insecure=True
    await server.start(host, port)
    try:
        if ready is not None:
            ready(server.address)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await server.close()
