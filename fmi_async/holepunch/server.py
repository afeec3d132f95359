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
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

from ..errors import ArgumentError, ProtocolError
from . import protocol as p
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
            dropped += 1
        return dropped

    def register(self, key: EntryKey, addr: p.Address, now: float, nat: bool = False) -> bool:
        """Add or renew an entry; False if the table is full."""
        self.expire(now)
        if key not in self._entries and len(self._entries) >= self.max_entries:
            return False
        self._entries[key] = (addr, now + self.ttl)
        self._nat[key] = nat
        self._entries.move_to_end(key)
        return True

    def get(self, key: EntryKey, now: float) -> p.Address | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def behind_nat(self, key: EntryKey) -> bool:
        """Whether the peer's register showed an address translator in between."""
        return self._nat.get(key, False)


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
        max_pairings: int = 10_000,
        result_timeout: float = 30.0,
        relay_memory: float = 600.0,
        relay_wait: float = 30.0,
        relay_idle_timeout: float = 3600.0,
        max_relays: int = 1024,
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
        if len(self._handlers) >= self.max_connections:
            logger.warning("rendezvous: too many connections, refusing one")
            writer.close()
            return
        self._handlers.add(task)
        peername = writer.get_extra_info("peername")
        observed: p.Address | None = (
            (str(peername[0]), int(peername[1])) if isinstance(peername, tuple) else None
        )
        controls: set[EntryKey] = set()
        try:
            await self._serve_connection(reader, writer, observed, controls)
        except asyncio.CancelledError:
            pass  # server closing
        except (ConnectionError, OSError) as exc:
            logger.debug("rendezvous: connection from %s ended: %s", observed, exc)
        finally:
            self._handlers.discard(task)
            for key in controls:
                if self._controls.get(key) is writer:
                    del self._controls[key]
            writer.close()

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        observed: p.Address | None,
        controls: set[EntryKey],
    ) -> None:
        decoder = p.Decoder()

        async def send(message: p.Message) -> None:
            writer.write(p.encode(message))
            async with asyncio.timeout(self.idle_timeout):
                await writer.drain()

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
                await send(p.Error("bad_request", str(exc)))
                return
            for i, message in enumerate(messages):
                if isinstance(message, p.RelayJoin):
                    # The connection becomes one half of a relay: nothing may follow.
                    if i != len(messages) - 1 or decoder.mid_message:
                        await send(p.Error("bad_request", "nothing may follow a relay request"))
                        return
                    await self._relay(message, reader, writer)
                    return
                try:
                    answer = await self._handle(message, observed, send)
                except Exception:  # a bug here must not take the server down
                    logger.exception("rendezvous: failed to handle %r", message)
                    answer = p.Error("internal", "the rendezvous server failed; see its log")
                if isinstance(message, p.Register) and isinstance(answer, p.Ok):
                    key = (message.comm, message.run_id, message.peer)
                    self._controls[key] = writer  # invites for this peer go here
                    controls.add(key)
                if answer is not None:
                    await send(answer)

    async def _handle(
        self,
        message: p.Message,
        observed: p.Address | None,
        send: Callable[[p.Message], Awaitable[None]],
    ) -> p.Message | None:
        if isinstance(message, p.Register):
            return self._register(message, observed)
        if isinstance(message, p.Lookup):
            return await self._lookup(message)
        if isinstance(message, p.Join) and observed is not None:
            return await self._join(message, observed, send)
        if isinstance(message, p.PunchResult):
            return await self._result(message)
        return p.Error("bad_request", f"the rendezvous server does not accept {message.TYPE!r}")

    def _register(self, msg: p.Register, observed: p.Address | None) -> p.Message:
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
        if not self.registry.register(key, addr, self._clock(), nat):
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
        if not self.registry.register(key, addr, self._clock(), nat):
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
