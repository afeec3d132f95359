"""Direct UDP channel: reliable, ordered messages over one datagram socket per peer.

Why UDP next to TCP: UDP hole punching works through more NATs than TCP
simultaneous open (RFC 5128 section 3.3), and a punched UDP path needs no
connection set-up per pair.  The price is that reliability is ours: the
sans-IO state machine of :mod:`fmi_async.channels.udp.reliable` fragments each
framed message, acknowledges, retransmits with a backed-off timer, controls
congestion (RFC 8085 section 3.1) and reassembles in order.  This module only
moves its datagrams: a thin :class:`asyncio.DatagramProtocol` hands every
datagram to the per-peer :class:`~fmi_async.channels.udp.reliable.Link`, sends
what the link answers, and keeps one timer per link for retransmissions and
delayed acks.

Peers find each other through a :class:`Discovery`
(:mod:`fmi_async.channels.udp.discovery`).  By default (``traversal: auto``)
that is :class:`PunchDiscovery`: the channel's socket registers over UDP at
the rendezvous server (the same server as the TCP channel's, under
``<comm>/udp``), pairs with peers behind NAT by hole punching, and pairs that
cannot be punched talk through the server's UDP relay; ``stats.pairs`` says
which.  ``traversal: off`` registers the bound address instead and never
punches (:class:`RendezvousDiscovery`).  Datagrams whose first byte is
0xF0-0xFF (:mod:`.kinds`) belong to hole punching and are handed to
``Discovery.handle_datagram``.

``send`` returns when the caller may reuse its buffers: messages up to 256 KiB
are copied and ``send`` returns once they are queued (it waits while
``send_buffer`` bytes to that peer are unacknowledged); larger ones are sent
from the caller's memory and ``send`` returns when all of it is acknowledged.
A cancelled large send copies what is still unacknowledged, so the message
still arrives whole.  A peer that acknowledges nothing through ``retries``
backed-off timeouts is unreachable: the send raises
:class:`~fmi_async.errors.BrokenChannelError` naming it.

Options (``backends.UDP``): ``host``, ``port`` (rendezvous, required),
``bind`` (default ``127.0.0.1``), ``advertise``, ``mtu`` (largest datagram
payload, default 1200 bytes: below the path MTU of nearly every Internet
path, as QUIC assumes, RFC 9000 section 14; up to 65000 on loopback),
``window`` (fragments in flight, default 256), ``recv_buffer`` and
``send_buffer`` (bytes per peer, default 4 MiB), ``rto_initial``, ``rto_min``,
``rto_max`` (seconds: 0.2, 0.02, 2), ``retries`` (8), ``rto_jitter`` (0.1),
``ack_delay`` (0.005 s), ``socket_buffer`` (SO_RCVBUF/SO_SNDBUF, 4 MiB),
``connect_timeout``, ``lookup_timeout``, ``linger`` (how long ``close`` waits
for unacknowledged data, default 5 s); for NAT traversal, as for TCP:
``traversal`` (``auto``, ``punch`` or ``off``), ``punch_timeout`` (default
2 s), ``nat`` (a simulated NAT box's ``options()``; also the
``FMI_NAT_GATEWAY`` and ``FMI_NAT_UDP_GATEWAY`` environment variables) and
``keepalive`` (seconds between keep-alives, default 15).

With ``security.encrypt`` every datagram is sealed (:mod:`.sealing`; ``mtu``
includes its envelope); forged or replayed ones are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ...errors import (
    ArgumentError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    EndOfStream,
)
from ...holepunch.client import RendezvousClient
from ...holepunch.net import Address, simulated_network
from ...holepunch.udp import UDPHolePuncher
from ...wire import Key, Payload, encode_frame
from ..backoff import Backoff
from ..base import ChannelContext, DirectChannel
from ..options import RendezvousOptions, option
from .datagram import session_tag
from .discovery import (
    DatagramSender,
    Discovery,
    PunchDiscovery,
    RendezvousDiscovery,
    Traversal,
)
from .kinds import RESERVED_MIN
from .peers import Peer, Socket
from .reliable import Endpoint, LinkParams
from .sealing import OVERHEAD, Sealing

__all__ = [
    "UDPChannel",
    "UDPOptions",
    "Discovery",
    "DatagramSender",
    "RendezvousDiscovery",
    "PunchDiscovery",
]

logger = logging.getLogger(__name__)

_COPY_MAX = 256 * 1024  # messages up to this size are copied and send returns at once


@dataclass(frozen=True)
class UDPOptions(RendezvousOptions):
    """``backends.UDP``: the rendezvous server, the reliability layer's parameters."""

    mtu: int = option(1200, gt=0, doc="largest datagram payload, bytes")
    window: int = option(256, gt=0, doc="fragments in flight per link")
    recv_buffer: int = option(4 * 1024 * 1024, gt=0, doc="bytes a link buffers out of order")
    send_buffer: int = option(4 * 1024 * 1024, gt=0, doc="bytes queued per link before send waits")
    socket_buffer: int = option(4 * 1024 * 1024, gt=0, doc="the socket's SO_RCVBUF/SO_SNDBUF")
    rto_initial: float | None = option(None, gt=0, doc="first retransmission timeout, seconds")
    rto_max: float = option(2.0, gt=0, doc="longest retransmission timeout, seconds")
    rto_min: float | None = option(None, gt=0, doc="shortest retransmission timeout, seconds")
    rto_jitter: float = option(0.1, ge=0, le=1, doc="fraction of each timeout drawn at random")
    retries: int = option(8, gt=0, doc="retransmissions of a fragment before the link breaks")
    ack_delay: float = option(0.005, gt=0, doc="seconds an acknowledgement may wait")
    linger: float | None = option(None, gt=0, doc="seconds close waits for unacknowledged data")
    punch_timeout: float = option(2.0, gt=0, doc="seconds a hole-punching attempt may take")
    keepalive: float = option(15.0, gt=0, doc="seconds between keepalives of a punched path")


class UDPChannel(DirectChannel):
    """Point-to-point messages over UDP with its own reliability."""

    name = "udp"
    Options = UDPOptions
    options: UDPOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        config, opts = ctx.config, self.options
        host, port = opts.rendezvous("UDP")
        config.check_security(self.name)
        self.bind = opts.bind
        self.advertise = opts.advertise or opts.bind
        rto_max = opts.rto_max
        rto_initial = opts.rto_initial or min(0.2, rto_max)
        self._sealing = Sealing.of(config, ctx.comm_name, ctx.run_id, ctx.peer_id, self.stats)
        self.params = LinkParams(
            mtu=opts.mtu - OVERHEAD if self._sealing else opts.mtu,
            window=opts.window,
            recv_buffer=opts.recv_buffer,
            rto=Backoff(rto_initial, rto_max, 2.0, opts.rto_jitter),
            rto_min=opts.rto_min or min(0.02, rto_max),
            retries=opts.retries,
            ack_delay=opts.ack_delay,
            limits=config.limits,
        )
        self.send_buffer: int = opts.send_buffer
        self.socket_buffer: int = opts.socket_buffer
        self.connect_timeout: float = opts.connect_seconds()
        self.lookup_timeout: float = opts.lookup_timeout or config.timeout
        self.linger: float = opts.linger or min(5.0, config.timeout)
        self.discovery: Discovery = self._discovery(host, port)
        # Test hook: wraps the transport's sendto (loss, duplication, reordering).
        self.wrap_transport: Callable[[DatagramSender], DatagramSender] | None = None
        self.address: Address | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._out: DatagramSender | None = None
        self._paused = False
        self._endpoint = Endpoint(
            ctx.peer_id,
            ctx.num_peers,
            session_tag(ctx.comm_name, ctx.run_id, config.secret),
            self.params,
            epoch=int(time.time() * 1000),
            counters=self.stats.requests,
            rng=random.Random(),
        )
        self._peers: dict[int, Peer] = {}

    def _discovery(self, host: str, port: int) -> Discovery:
        """Hole punching and relay (``auto``, ``punch``), or plain registration (``off``)."""
        opts, config = self.options, self.config
        traversal = opts.traversal
        if traversal == "off":
            client = RendezvousClient(host, port, config.secret, timeout=self.connect_timeout)
            return RendezvousDiscovery(client, self.comm_name, self.run_id, self.peer_id)
        simulated = simulated_network(opts.nat)
        puncher = UDPHolePuncher(
            host,
            port,
            config.secret,
            timeout=self.connect_timeout,
            punch_timeout=opts.punch_timeout,
            keepalive=opts.keepalive,
            datagrams=simulated.datagrams() if simulated is not None else None,
        )
        client = RendezvousClient(
            host, port, config.secret, timeout=self.connect_timeout, net=simulated
        )
        return PunchDiscovery(
            puncher,
            client,
            self.comm_name,
            self.run_id,
            self.peer_id,
            cast(Traversal, traversal),
            self.stats.pairs,
        )

    def __repr__(self) -> str:
        addr = f"{self.address[0]}:{self.address[1]}" if self.address else "-"
        return (
            f"<UDPChannel peer={self.peer_id}/{self.num_peers} comm={self.comm_name!r} "
            f"{self._state} at={addr} mtu={self.params.mtu} peers={sorted(self._peers)}>"
        )

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            raise ClosedError(f"{self!r} cannot be opened again")
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Socket(self), local_addr=(self.bind, 0)
            )
        except OSError as exc:
            raise ConfigError(
                f"peer {self.peer_id} cannot bind a udp socket on {self.bind!r}: "
                f"{exc.strerror or exc}; check backends.UDP.bind"
            ) from exc
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # bursts of a window must not overflow the kernel's buffers
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.socket_buffer)
        port = int(transport.get_extra_info("sockname")[1])
        self.address = (self.bind, port)
        out: DatagramSender = cast(DatagramSender, transport)
        wrap = getattr(self.discovery, "wrap", None)
        if wrap is not None:  # through a NAT, to relayed peers
            out = wrap(transport)
        attach = getattr(self.discovery, "attach", None)
        if attach is not None:  # what the discovery unwraps comes back to us
            attach(self._on_datagram)
        self._out = self.wrap_transport(out) if self.wrap_transport else out
        await super().open()  # open before publishing: peers may send at once
        try:
            await self.discovery.publish(transport, (self.advertise, port))
        except BaseException:
            await self.close()
            raise
        logger.debug("%r published", self)

    async def close(self) -> None:
        if self._state == "closed":
            return
        await super().close()
        with contextlib.suppress(Exception):
            await self.discovery.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger
        # Linger: what we sent may still need retransmitting (our socket must stay).
        while self._transport is not None:
            busy = [p for p in self._peers.values() if not self._settled(p)]
            remaining = deadline - loop.time()
            if not busy or remaining <= 0:
                break
            futs = [loop.create_future() for _ in busy]
            for peer, fut in zip(busy, futs, strict=True):
                peer.waiters.append(fut)
            await asyncio.wait(futs, timeout=remaining)
        closed = ClosedError(f"channel udp of peer {self.peer_id} was closed")
        now = loop.time()
        for peer in self._peers.values():
            dest = peer.reply_addr or peer.addr
            if dest is not None and self._transport and not self._transport.is_closing():
                # tell it we are gone
                ack = peer.link.receiver.poll_ack(now, closing=True)
                assert ack is not None
                for _ in range(2):  # a lost "closing" only costs the peer its linger
                    self._send(ack, dest, peer.id)
            if peer.timer is not None:
                peer.timer.cancel()
            for fut in peer.waiters:
                if not fut.done():
                    fut.set_exception(closed)
            peer.waiters.clear()
        if self._transport is not None:
            self._transport.close()
        logger.debug("%r closed", self)

    def _socket_lost(self, exc: Exception | None) -> None:
        if not self.is_open:
            return
        reason = f": {exc}" if exc else ""
        error = BrokenChannelError(f"the udp socket of peer {self.peer_id} was closed{reason}")
        self._state = "closed"
        self.mailbox.fail(error)
        for peer in self._peers.values():
            for fut in peer.waiters:
                if not fut.done():
                    fut.set_exception(error)
            peer.waiters.clear()

    @staticmethod
    def _settled(peer: Peer) -> bool:
        sender = peer.link.sender
        return sender.idle or sender.error is not None or peer.addr is None

    # ---------------------------------------------------------------- send

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        if not 0 <= dst < self.num_peers:
            raise ArgumentError(f"destination peer {dst} is not in 0..{self.num_peers - 1}")
        start = time.perf_counter()
        if dst == self.peer_id:
            self.mailbox.deliver(dst, key, payload.copy())
        else:
            frame = encode_frame(key, payload, self.config.limits)
            nbytes = sum(memoryview(b).nbytes for b in frame)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.timeout
            peer = await self._locate(dst, deadline)
            sender = peer.link.sender
            if sender.error is not None:  # broken before: try again, as TCP reconnects
                sender = peer.link.restart_sender()
            while sender.buffered >= self.send_buffer and sender.error is None:
                await self._wait(peer, deadline, "queued")
            self._check_sender(peer)
            copy = nbytes <= _COPY_MAX
            last = sender.queue(frame, copy)
            self._flush(peer)
            if not copy:
                try:
                    while sender.una <= last and sender.error is None:
                        await self._wait(peer, deadline, "acknowledged")
                    self._check_sender(peer)
                except BaseException:
                    sender.own_buffers()  # the caller may reuse its buffers now
                    raise
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    async def _locate(self, dst: int, deadline: float) -> Peer:
        peer = self._peer(dst)
        if peer.addr is not None:
            return peer
        loop = asyncio.get_running_loop()
        async with peer.lock:  # one lookup per destination
            if peer.addr is None:
                assert self._transport is not None
                timeout = max(0.001, min(self.lookup_timeout, deadline - loop.time()))
                peer.addr = await self.discovery.locate(dst, self._transport, timeout)
                self._check_open()
                self.stats.pairs.setdefault(dst, "direct")  # a punching discovery says which
                logger.debug("peer %d: peer %d is at %s:%d", self.peer_id, dst, *peer.addr)
        return peer

    async def _wait(self, peer: Peer, deadline: float, what: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        peer.waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except TimeoutError:
            raise CommTimeout(
                f"peer {peer.id} had not {what} the data peer {self.peer_id} sent it on "
                f"channel udp within {self.config.timeout:.3g}s (config timeout)"
            ) from None

    def _check_sender(self, peer: Peer) -> None:
        self._check_open()
        error = peer.link.sender.error
        if error is not None:
            raise BrokenChannelError(
                f"peer {peer.id} is unreachable over udp from peer {self.peer_id}: {error}; "
                f"has it crashed, or does a firewall drop udp to {peer.addr}?"
            )

    # ---------------------------------------------------------------- datagram path

    def _peer(self, pid: int) -> Peer:
        peer = self._peers.get(pid)
        if peer is None:
            peer = self._peers[pid] = Peer(self._endpoint.link(pid))
        return peer

    def _send(self, data: bytes, addr: Address, dst: int) -> None:
        assert self._out is not None
        if self._sealing is not None:
            data = self._sealing.seal(dst, data)
        try:
            self._out.sendto(data, addr)
        except OSError as exc:  # e.g. no route: the timer will tell if it lasts
            self.stats.requests["socket_error"] += 1
            logger.debug("peer %d: sendto %s failed: %s", self.peer_id, addr, exc)

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        if data and data[0] >= RESERVED_MIN:
            if not self.discovery.handle_datagram(data, addr):
                self.stats.requests["dropped"] += 1
            return
        if self._transport is None or self._transport.is_closing():
            return
        if self._sealing is not None:
            opened = self._sealing.open(data)
            if opened is None:  # dropped and counted
                return
            data = opened
        link = self._endpoint.receive(data, self._transport_time())
        if link is None:
            return
        peer = self._peer(link.peer)
        peer.reply_addr = addr
        self._flush(peer)

    def _transport_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _flush_all(self) -> None:
        for peer in list(self._peers.values()):
            self._flush(peer)

    def _flush(self, peer: Peer, now: float | None = None) -> None:
        """Send what the link has to say, deliver what it completed, re-arm its timer."""
        if self._transport is None or self._transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        link = peer.link
        before = (link.sender.una, link.sender.error)
        ack, datagrams = link.poll(
            loop.time() if now is None else now, not self._paused and peer.addr is not None
        )
        if ack is not None and (peer.reply_addr or peer.addr) is not None:
            self._send(ack, peer.reply_addr or peer.addr, peer.id)  # type: ignore[arg-type]
        if datagrams:
            assert peer.addr is not None
            for datagram in datagrams:
                self._send(datagram, peer.addr, peer.id)
        self._deliver(peer)
        if (link.sender.una, link.sender.error) != before or link.sender.idle:
            peer.wake()
        self._arm(peer)

    def _deliver(self, peer: Peer) -> None:
        receiver, mailbox = peer.link.receiver, self.mailbox
        if receiver.restarted:  # the peer started over: receives from it may wait again
            receiver.restarted = False
            mailbox.clear_source(peer.id)
            peer.reported.clear()
        if receiver.messages:
            for key, payload in receiver.messages:
                mailbox.deliver(peer.id, key, payload)
            receiver.messages.clear()
            if "sender" in peer.reported:
                peer.reported.discard("sender")
                mailbox.clear_source(peer.id)
        problem: tuple[str, Exception] | None = None
        if receiver.error is not None:
            problem = (
                "receiver",
                BrokenChannelError(f"peer {peer.id} sent a malformed message: {receiver.error}"),
            )
        elif peer.link.sender.error is not None:
            problem = ("sender", BrokenChannelError(f"peer {peer.id} is unreachable over udp"))
        elif peer.link.remote_closed:
            problem = ("closed", self._closed_error(peer))
        if problem is not None and problem[0] not in peer.reported:
            peer.reported.add(problem[0])
            mailbox.fail_source(peer.id, problem[1])

    def _closed_error(self, peer: Peer) -> Exception:
        if peer.link.receiver.mid_message:
            return BrokenChannelError(
                f"peer {peer.id} closed its udp channel in the middle of a message to peer "
                f"{self.peer_id}; did it close before its sends completed?"
            )
        return EndOfStream(
            f"peer {peer.id} closed its udp channel; it will send peer {self.peer_id} nothing more"
        )

    def _arm(self, peer: Peer) -> None:
        deadline = peer.link.deadline()
        if deadline is None:
            return
        if peer.timer is not None:
            if peer.when <= deadline:
                return  # fires early and re-arms
            peer.timer.cancel()
        # uvloop turns a call_at in the past into a plain Handle (no .when()),
        # so the time is kept here.
        peer.when = deadline
        peer.timer = asyncio.get_running_loop().call_at(deadline, self._on_timer, peer, deadline)

    def _on_timer(self, peer: Peer, when: float) -> None:
        peer.timer = None
        self._flush(peer, max(when, asyncio.get_running_loop().time()))
