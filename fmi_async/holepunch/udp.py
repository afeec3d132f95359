"""UDP endpoint discovery and hole punching, from the UDP channel's own socket.

The UDP channel binds one datagram endpoint per peer.  For a NAT to map it
once and for all (endpoint-independent mapping, RFC 4787 section 4.1), every
datagram of discovery and punching leaves from that very socket, so this
module never owns a socket: it is handed the channel's transport, and the
channel hands it back every datagram whose first byte is in the reserved
range 0xF0-0xFF (:meth:`UDPHolePuncher.handle_datagram`).

The first byte of each datagram says what it is; the one table of them is
:mod:`fmi_async.channels.udp.kinds` (0xF0 rendezvous message, 0xF1 probe,
0xF2 probe answer, 0xF3 keep-alive, 0xF4 relayed datagram, 0xFE simulated
NAT encapsulation).

Why this module stays in ``holepunch/`` rather than in the UDP channel's
subpackage: it is one of hole punching's two transports (TCP punching is
:mod:`.punch`), it speaks the rendezvous protocol of :mod:`.protocol` with
the server's UDP adapter as its counterpart, and it knows nothing of the
channel's reliability (it owns no socket and never reads the channel's
datagrams).  Keeping it beside the protocol lets a protocol change stay in
one package; it reads the table of first bytes, a module that imports
nothing, from the channel's subpackage.

A probe's mac is HMAC-SHA256(secret, [kind, comm, run, from, to, pairing
nonce]) truncated to 16 bytes; the nonce comes from the server per pairing
(``peer_endpoint``), so a probe of one pairing is worthless in another.

Punching follows RFC 5128 section 3.3: both sides learn each other's
observed (public) and local endpoints from the server, then send probes to
all of them until they hear from the other side; the endpoint to use is the
one the other side's datagrams *came from* (a peer-reflexive candidate in
ICE's terms, RFC 8445 section 7.2.5.3.1), which also covers NATs that do not
preserve ports.  Both then report to the server, and both get the same
verdict: ``direct`` (the endpoint is returned) or ``relay`` (None).
Requests to the server are retransmitted with doubling intervals until
answered or the deadline passes.  Keep-alives (the register, every
``keepalive`` seconds, and an 0xF3 datagram to every punched peer) keep the
NAT mappings and filters towards the server and the peers open (RFC 4787
section 4.3 asks for at least 2 minutes of mapping lifetime, many NATs keep
less; RFC 8085 section 3.5 suggests refreshing at least every 15 s).

A pair with the ``relay`` verdict talks through the server's UDP port
(0xF4 datagrams, TURN-like, RFC 8656 section 1 in spirit, without its
allocations).  The channel sees such a peer at a *relay address*
``("<relay>", n)`` (:meth:`UDPHolePuncher.relay_address`), a host name no
real address has; the sender returned by :meth:`UDPHolePuncher.wrap` turns
datagrams to it into 0xF4 datagrams to the server, and relayed datagrams
arrive at the ``deliver`` callback with that relay address as their source,
so acknowledgements find their way back the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
from collections.abc import Callable
from typing import Any

from ..channels.udp import kinds
from ..errors import AuthenticationError, CommTimeout, ProtocolError
from . import protocol as p
from .net import Address, DatagramPath, DatagramSender
from .pairing import PairKey
from .udp_probes import Punch, decode_probe, encode_probe, probe_mac
from .udp_relay import RELAY_HOST, Router

__all__ = [
    "UDPHolePuncher",
    "DatagramSender",
    "UDP_RENDEZVOUS",
    "UDP_PROBE",
    "UDP_PROBE_ACK",
    "UDP_KEEPALIVE",
    "UDP_RELAY",
    "RELAY_HOST",
    "RESERVED_MIN",
]

logger = logging.getLogger(__name__)

RESERVED_MIN = kinds.RESERVED_MIN
UDP_RENDEZVOUS = kinds.RENDEZVOUS
UDP_PROBE = kinds.PROBE
UDP_PROBE_ACK = kinds.PROBE_ACK
UDP_KEEPALIVE = kinds.KEEPALIVE
UDP_RELAY = kinds.RELAY
_PROBE_INTERVAL = 0.02
_FIRST_RETRY = 0.1


class UDPHolePuncher:
    """What the UDP channel calls to be found and to punch; see the module doc.

    ``datagrams`` is set behind a simulated NAT (the simulated network's
    :meth:`~fmi_async.holepunch.net.SimulatedNetwork.datagrams`): then
    :meth:`wrap` gives the sender to use for *every* datagram (the channel's
    own too), and inbound datagrams arrive encapsulated (first byte 0xFE);
    :meth:`handle_datagram` unwraps them and hands the channel's own to the
    ``deliver`` callback given to :meth:`attach`, with their true source
    address.  Without it, an encapsulated datagram is not ours (nobody may
    claim a source address by encapsulation on the host's own network).
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes | None = None,
        *,
        timeout: float = 10.0,
        punch_timeout: float = 2.0,
        keepalive: float = 15.0,
        datagrams: DatagramPath | None = None,
    ) -> None:
        self.server: Address = (host, port)
        self.secret = secret
        self.timeout = timeout
        self.punch_timeout = punch_timeout
        self.keepalive = keepalive
        self.datagrams = datagrams
        self.observed: Address | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Queue[p.Message]] = {}
        self._punches: dict[tuple[str, str, int], Punch] = {}
        self._results: dict[tuple[str, str, int], Address | None] = {}
        self._transport: Any = None
        self._deliver: Callable[[bytes, Address], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._published: tuple[str, str, int] | None = None
        # relayed pairs: pairing nonce <-> relay address number
        self._relay_in: dict[bytes, int] = {}
        self._relay_out: dict[int, bytes] = {}
        self._relay_slots: dict[tuple[str, str, int], Address] = {}
        self._relay_numbers = itertools.count(1)
        self.on_result: Callable[[int, Address], None] | None = None
        """Called with (peer, address) when a pairing is decided, on both sides; the
        address is a relay address for relayed pairs."""

    def __repr__(self) -> str:
        return (
            f"<UDPHolePuncher server={self.server[0]}:{self.server[1]} observed={self.observed} "
            f"punched={sorted(k[2] for k, v in self._results.items() if v)}>"
        )

    # ---------------------------------------------------------------- contract

    def wrap(self, transport: Any) -> DatagramSender:
        """The sender the UDP channel must use for all its datagrams.

        It sends through the simulated NAT when there is one, and datagrams
        to a relay address through the server.
        """
        return Router(self, self._base(transport))

    def _base(self, transport: Any) -> DatagramSender:
        if self.datagrams is None:
            out: DatagramSender = transport
            return out
        return self.datagrams.sender(transport)

    def relay_address(self, comm: str, run_id: str, peer: int) -> Address | None:
        """Where to send datagrams for ``peer`` when the verdict was relay, else None."""
        return self._relay_slots.get((comm, run_id, peer))

    def send_relayed(self, out: DatagramSender, data: bytes, number: int) -> None:
        """Send one datagram to the peer behind relay address ``number``, via the server."""
        nonce = self._relay_out.get(number)
        if nonce is None:
            raise OSError(f"no relay {RELAY_HOST}:{number}")
        out.sendto(bytes([UDP_RELAY]) + nonce + data, self.server)

    def attach(self, deliver: Callable[[bytes, Address], None]) -> None:
        """Where datagrams unwrapped from a simulated NAT's encapsulation go."""
        self._deliver = deliver

    async def publish_udp(
        self, comm: str, run_id: str, peer: int, transport: asyncio.DatagramTransport
    ) -> Address:
        """Register this socket's public endpoint (as the server observes it) and keep it."""
        self._transport = transport
        local = _local(transport)
        request = p.Register(comm, run_id, peer, local, local=local)
        # Set before the answer: an invite may overtake the answer to the register.
        self._published = (comm, run_id, peer)
        answer = await self._ask(request, (p.Ok,), self.timeout, f"registering peer {peer}")
        assert isinstance(answer, p.Ok) and answer.observed is not None
        self.observed = answer.observed
        self._spawn(self._keep_alive(request))
        logger.debug(
            "peer %d: udp endpoint %s:%d is public at %s:%d", peer, *local, *answer.observed
        )
        return answer.observed

    async def punch_udp(
        self,
        comm: str,
        run_id: str,
        peer: int,
        dst: int,
        transport: asyncio.DatagramTransport,
        timeout: float,
    ) -> Address | None:
        """The endpoint of ``dst`` after punching, or None when the verdict is relay."""
        self._transport = transport
        slot = (comm, run_id, dst)
        if slot in self._results:
            return self._results[slot]
        running = self._punches.get(slot)
        if running is not None:  # invited, or punching already
            async with asyncio.timeout(timeout):
                return await asyncio.shield(running.done)
        return await self._punch(self._claim(comm, run_id, peer, dst), timeout)

    def handle_datagram(self, data: bytes, addr: Address) -> bool:
        """Take a datagram whose first byte is 0xF0-0xFF; False if it is not ours."""
        if not data or data[0] < RESERVED_MIN:
            return False
        kind = data[0]
        try:
            if kind == kinds.NAT:
                if self.datagrams is None:
                    return False
                src, inner = self.datagrams.unwrap(data)
                if inner and inner[0] >= RESERVED_MIN:
                    return self.handle_datagram(inner, src)
                if self._deliver is not None:
                    self._deliver(inner, src)
                    return True
                return False
            if kind == UDP_RENDEZVOUS:
                return self._from_server(data, addr)
            if kind in (UDP_PROBE, UDP_PROBE_ACK):
                return self._probe(kind, data, addr)
            if kind == UDP_RELAY:
                return self._relayed(data)
            return kind == UDP_KEEPALIVE
        except ProtocolError as exc:
            logger.debug("dropped a bad hole-punching datagram from %s: %s", addr, exc)
            return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for punch in self._punches.values():
            if not punch.done.done():
                punch.done.cancel()

    # ---------------------------------------------------------------- internals

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, data: bytes, addr: Address) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            self._base(self._transport).sendto(data, addr)
        except OSError as exc:
            logger.debug("udp send to %s failed: %s", addr, exc)

    async def _ask(
        self,
        request: p.Message,
        expect: tuple[type[p.Message], ...],
        timeout: float,
        what: str,
        *,
        keep: bool = False,
    ) -> p.Message:
        """Send ``request`` until an answer of one of ``expect`` (or an error) comes back."""
        rid: int = getattr(request, "id", None) or next(self._ids)
        if getattr(request, "id", None) is None:
            request = _with_id(request, rid)
        data = bytes([UDP_RENDEZVOUS]) + p.encode(p.sign(request, self.secret))
        queue = self._replies.setdefault(rid, asyncio.Queue(maxsize=64))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wait = _FIRST_RETRY
        try:
            while True:
                self._send(data, self.server)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise CommTimeout(
                        f"the rendezvous server at {self.server[0]}:{self.server[1]} did not "
                        f"answer over udp while {what} within {timeout:.3g}s"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, remaining)):
                        while True:
                            answer = await queue.get()
                            if isinstance(answer, p.Error):
                                raise _error(answer, self.server, what)
                            if isinstance(answer, expect):
                                return answer
                wait = min(wait * 2, 1.0)
        finally:
            if not keep:
                self._replies.pop(rid, None)

    async def _keep_alive(self, request: p.Register) -> None:
        data = bytes([UDP_RENDEZVOUS]) + p.encode(p.sign(request, self.secret))
        while True:
            await asyncio.sleep(self.keepalive)
            self._send(data, self.server)
            for remote in list(self._results.values()):
                if remote is not None:  # punched: keep both NATs' state for the pair
                    self._send(bytes([UDP_KEEPALIVE]), remote)

    def _relayed(self, data: bytes) -> bool:
        """A datagram the server relayed: hand it on, from the pair's relay address."""
        number = self._relay_in.get(data[1 : 1 + p.NONCE_LEN])
        if number is None or self._deliver is None:
            return False  # not (yet) a relay of ours: the sender retransmits
        self._deliver(data[1 + p.NONCE_LEN :], (RELAY_HOST, number))
        return True

    def _decided(self, slot: tuple[str, str, int], punch: Punch, remote: Address | None) -> None:
        self._results[slot] = remote
        if remote is None:
            assert punch.nonce is not None
            number = next(self._relay_numbers)
            self._relay_in[punch.nonce] = number
            self._relay_out[number] = punch.nonce
            self._relay_slots[slot] = remote = (RELAY_HOST, number)
        if self.on_result is not None:
            self.on_result(punch.other, remote)

    def _from_server(self, data: bytes, addr: Address) -> bool:
        if len(data) < 1 + p.HEADER_SIZE:
            raise ProtocolError("short rendezvous datagram")
        length = p.parse_header(data[1 : 1 + p.HEADER_SIZE])
        if length != len(data) - 1 - p.HEADER_SIZE:
            raise ProtocolError("datagram length does not match its envelope")
        message = p.decode_body(data[1 + p.HEADER_SIZE :])
        if isinstance(message, p.Invite):
            self._invited(message)
            return True
        rid = getattr(message, "id", None)
        queue = self._replies.get(rid) if isinstance(rid, int) else None
        if queue is not None and not queue.full():
            queue.put_nowait(message)
        return True

    def _invited(self, invite: p.Invite) -> None:
        if self._published is None or invite.transport != "udp":
            return
        comm, run_id, me = self._published
        if (invite.comm, invite.run_id) != (comm, run_id) or me not in (
            invite.initiator,
            invite.responder,
        ):
            return
        other = invite.responder if me == invite.initiator else invite.initiator
        if (comm, run_id, other) in self._punches or (comm, run_id, other) in self._results:
            return
        logger.debug("peer %d: invited to punch udp with peer %d", me, other)
        # Claimed now, not when the task first runs: a send to ``other`` in
        # between must wait for this pairing rather than start a second one.
        self._spawn(self._punch(self._claim(comm, run_id, me, other), self.timeout))

    def _claim(self, comm: str, run_id: str, me: int, other: int) -> Punch:
        """Register the pairing with ``other`` before anything awaits.

        One side must run one pairing per peer: the server keeps one side per
        peer and answers only its latest join, so a second pairing started by
        the same side would wait for an answer that never comes, and its
        retried joins would reopen a pairing the other side has finished.
        """
        lo, hi = min(me, other), max(me, other)
        key: PairKey = (comm, run_id, "udp", lo, hi)
        punch = Punch(key, me, other)
        self._punches[(comm, run_id, other)] = punch
        return punch

    async def _punch(self, punch: Punch, timeout: float) -> Address | None:
        comm, run_id, _, lo, hi = punch.key
        me, other = punch.me, punch.other
        slot = (comm, run_id, other)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        rid = next(self._ids)
        try:
            local = _local(self._transport) if self.datagrams is None else ("0.0.0.0", 0)
            join = p.Join(comm, run_id, me, lo, hi, "udp", local, timeout, id=rid)
            answer = await self._ask(
                join, (p.PeerEndpoint,), timeout, f"pairing with peer {other}", keep=True
            )
            assert isinstance(answer, p.PeerEndpoint)
            punch.nonce = answer.nonce
            candidates = [answer.public]
            if answer.local != answer.public and answer.local[1] != 0:
                candidates.append(answer.local)
            window = min(self.punch_timeout, max(0.0, deadline - loop.time()))
            remote = await self._probe_until_heard(punch, candidates, window)
            result = p.PunchResult(comm, run_id, me, lo, hi, "udp", remote is not None, id=rid)
            verdict = await self._ask(
                result,
                (p.Verdict,),
                max(0.5, deadline - loop.time()) + self.punch_timeout,
                f"reporting the punch with peer {other}",
            )
            assert isinstance(verdict, p.Verdict)
            outcome = remote if verdict.outcome == "direct" else None
            logger.debug(
                "peer %d: udp pairing with peer %d: %s %s", me, other, verdict.outcome, remote
            )
            self._decided(slot, punch, outcome)
            if not punch.done.done():
                punch.done.set_result(outcome)
            return outcome
        except BaseException as exc:
            if not punch.done.done():
                punch.done.set_exception(exc if isinstance(exc, Exception) else CommTimeout())
                punch.done.exception()  # retrieved: a waiter may never come
            raise
        finally:
            if self._punches.get(slot) is punch:
                del self._punches[slot]
            self._replies.pop(rid, None)

    async def _probe_until_heard(
        self, punch: Punch, candidates: list[Address], window: float
    ) -> Address | None:
        probe = self._probe_bytes(UDP_PROBE, punch, punch.me, punch.other)
        loop = asyncio.get_running_loop()
        end = loop.time() + window
        interval = _PROBE_INTERVAL
        for _ in range(200):  # bounded; the window usually ends it first
            for addr in candidates:
                self._send(probe, addr)
            remaining = end - loop.time()
            if punch.heard.done() or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval, remaining)):
                    await asyncio.shield(punch.heard)
            interval = min(interval * 1.5, 0.2)
        if not punch.heard.done():
            return None
        remote = punch.heard.result()
        for _ in range(3):  # make sure the other side hears us too
            self._send(probe, remote)
        return remote

    def _probe_bytes(self, kind: int, punch: Punch, src: int, dst: int) -> bytes:
        assert punch.nonce is not None
        return encode_probe(self.secret, kind, punch.key[0], punch.key[1], src, dst, punch.nonce)

    def _probe(self, kind: int, data: bytes, addr: Address) -> bool:
        comm, run_id, src, dst, mac = decode_probe(data)
        punch = self._punches.get((comm, run_id, src))
        if punch is None or punch.nonce is None or dst != punch.me:
            return True  # ours, but late or early: ignored
        if not hmac.compare_digest(
            mac, probe_mac(self.secret, kind, comm, run_id, src, dst, punch.nonce)
        ):
            logger.warning("dropped a udp probe with a bad proof from %s", addr)
            raise AuthenticationError("bad probe proof")
        if kind == UDP_PROBE:
            self._send(self._probe_bytes(UDP_PROBE_ACK, punch, punch.me, src), addr)
        if not punch.heard.done():
            punch.heard.set_result(addr)
        return True


def _local(transport: Any) -> Address:
    name = transport.get_extra_info("sockname")
    return (str(name[0]), int(name[1]))


def _with_id(message: p.Message, rid: int) -> p.Message:
    from dataclasses import replace

    return replace(message, id=rid)  # type: ignore[call-arg]


def _error(answer: p.Error, server: Address, what: str) -> Exception:
    from .error_codes import server_error

    return server_error(answer, f"the rendezvous server at {server[0]}:{server[1]}", what)
