"""Direct TCP channel: one lazily opened connection per ordered pair of peers.

``open()`` listens on an ephemeral port and registers that address at the
rendezvous server (``backends.TCP.host``/``port``, FMI's ``Direct``
section) over a long-lived control connection.  The server compares the
endpoint it observes with the one the peer reports and so knows who is
behind NAT.  The first send to a peer looks it up there and then

* connects to its listening address when the destination is not behind NAT
  (through this peer's NAT, if any): the plain path, as fast as before;
* otherwise punches a connection (:func:`~fmi_async.holepunch.punch.pair_tcp`):
  the server invites the destination over its control connection, both
  punch, and the server's verdict says whether the stream is direct or goes
  through its relay.  ``stats.pairs[dst]`` records ``"direct"`` or
  ``"relayed"``.

Every connection, whichever way it opened, starts with the membership
handshake of :func:`~fmi_async.holepunch.punch.authenticate` (HMAC over
``security.secret``, comm name, run id and nonces from both sides); a
connection that fails it is dropped before a single frame is read.  The
channel refuses to open without ``security.secret`` unless
``security.insecure`` is true.  Connections accepted on the listening port
must prove membership within ``security.handshake_timeout``; while they have
not, they count against ``security.max_unproven`` (and
``max_unproven_per_source`` per source address), and a new connection over
either limit evicts the oldest unproven one
(:class:`~fmi_async.holepunch.admission.Admission`), so strangers cannot
exhaust the handshake slots.  A connecting peer whose handshake was cut off
that way tries again while its ``connect_timeout`` lasts.

After the handshake, with ``security.encrypt`` (the default whenever a
secret is set), every byte of the connection is sealed: its key is derived
from the secret and both sides' handshake nonces
(:func:`~fmi_async.holepunch.proofs.stream_key`), so it differs per
connection and direction, and a relayed connection is sealed end to end (the
relay only splices records it cannot read).  See
:mod:`fmi_async.wire.seal` and docs/security.md.

A peer *sends* only on connections it opened and *receives* only on
connections it accepted.  Two peers that send to each other at the same
moment therefore open two connections instead of racing to agree on one,
and every byte stream has exactly one writer.

The byte streams are thin asyncio protocols (:mod:`fmi_async.channels.tcp_streams`):
receiving writes large arrays straight into the received array, sending
waits for an empty write buffer (flow control), so a send adds about one
slice of memory and may return its buffers to the caller.  Dialing a
listening peer is :mod:`fmi_async.channels.tcp_connect`.

Options (``backends.TCP``): ``host``, ``port`` (rendezvous server, required);
``bind`` (listen address, default ``127.0.0.1``; with ``0.0.0.0`` the server
records the address it saw the peer at); ``advertise`` (address to register
instead of ``bind``); ``connect_timeout`` (seconds, default 10; FMI's
``max_timeout`` in milliseconds is accepted too); ``lookup_timeout`` (how long
a first send waits for the destination to register, default the config's
``timeout``); ``traversal`` (``auto``: punch only towards peers behind NAT,
the default; ``punch``: always pair through the server; ``off``: never);
``punch_timeout`` (seconds of punching before the relay takes over, default
2); ``nat`` (a simulated NAT's gateway ``"host:port"``, see
:mod:`fmi_async.natsim`; also the ``FMI_NAT_GATEWAY`` environment
variable).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ArgumentError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    FMIError,
)
from ..holepunch import protocol as hp
from ..holepunch.admission import Admission
from ..holepunch.client import ControlConnection, RendezvousClient
from ..holepunch.net import HostNetwork, Network, close_socket, simulated_network, sock_accept
from ..holepunch.proofs import stream_key, take_handshake
from ..holepunch.punch import Membership, authenticate, pair_tcp
from ..wire import Key, Payload, encode_frame
from ..wire.seal import StreamOpener, StreamSealer
from .backoff import Backoff
from .base import ChannelContext, DirectChannel
from .options import RendezvousOptions, option
from .tcp_connect import connect_plain
from .tcp_streams import SMALL, Receiver, Sender

__all__ = ["TCPChannel", "TCPOptions"]

logger = logging.getLogger(__name__)

_LOOKUP_RETRY = Backoff(initial=0.05, maximum=1.0)  # lookups while the server is unreachable


@dataclass(frozen=True)
class TCPOptions(RendezvousOptions):
    """``backends.TCP`` (FMI's ``Direct``): the rendezvous server and hole punching."""

    punch_timeout: float = option(2.0, gt=0, doc="seconds a hole-punching attempt may take")


class TCPChannel(DirectChannel):
    """Point-to-point TCP between peers found through a rendezvous server."""

    name = "tcp"
    kind = "direct"

    Options = TCPOptions
    options: TCPOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        config, opts = ctx.config, self.options
        host, port = opts.rendezvous("TCP")
        config.check_security(self.name)
        self.rendezvous: hp.Address = (host, port)
        self.bind = opts.bind
        self.advertise = opts.advertise or opts.bind
        self.connect_timeout = opts.connect_seconds()
        self.lookup_timeout = opts.lookup_timeout or config.timeout
        self.punch_timeout = opts.punch_timeout
        self.traversal = opts.traversal
        self.listen_address: hp.Address | None = None
        simulated = simulated_network(opts.nat)
        self.net: Network = simulated or HostNetwork()
        self.member = Membership(ctx.comm_name, ctx.run_id, config.secret)
        self.encrypt = config.encrypts
        self._client = RendezvousClient(
            host, port, config.secret, timeout=self.connect_timeout, net=simulated
        )
        self._listen_sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._control: ControlConnection | None = None
        self._senders: dict[int, Sender] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._queued: dict[int, int] = {}  # sends to each peer in (or waiting for) its lock
        self._incoming: set[Receiver] = set()
        # accepted, membership not yet proven: the admission policy and each one's handshake
        self._unproven: Admission[socket.socket] = Admission(
            config.max_unproven, config.max_unproven_per_source
        )
        self._handshakes: dict[socket.socket, asyncio.Task[bool]] = {}
        self.handshake_timeout = min(config.handshake_timeout, self.connect_timeout)

    def __repr__(self) -> str:
        addr = self.listen_address
        listen = f"{addr[0]}:{addr[1]}" if addr else "-"
        return (
            f"<TCPChannel peer={self.peer_id}/{self.num_peers} comm={self.comm_name!r} "
            f"{self._state} listen={listen} net={self.net.name}"
            f"{' sealed' if self.encrypt else ''} out={sorted(self._senders)} "
            f"in={sorted(r.src for r in self._incoming)}>"
        )

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            raise ClosedError(f"{self!r} cannot be opened again")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind((self.bind, 0))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"peer {self.peer_id} cannot listen on {self.bind!r}: {exc.strerror or exc}; "
                "check backends.TCP.bind"
            ) from exc
        self._listen_sock = sock
        port = int(sock.getsockname()[1])
        self.listen_address = (self.bind, port)
        await super().open()  # open before registering: peers may connect at once
        self._spawn(self._accept_loop(sock))
        self._control = ControlConnection(
            self._client,
            self.comm_name,
            self.run_id,
            self.peer_id,
            (self.advertise, port),
            self._on_invite,
            renew=min(15.0, max(1.0, self.connect_timeout)),
        )
        try:
            await self._control.start()
        except BaseException:
            await self.close()
            raise
        del loop
        logger.debug(
            "%r registered at %s:%d%s",
            self, *self.rendezvous, " behind NAT" if self._control.behind_nat else "",
        )  # fmt: skip

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        if self._state == "closed":
            return
        await super().close()  # from here on, lost connections are not failures
        if self._control is not None:
            await self._control.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._listen_sock is not None:  # after the accept loop stopped watching it
            close_socket(self._listen_sock)
        for conn in self._unproven:  # accepted, cancelled before proving membership
            self._unproven.settle(conn)
            close_socket(conn, reset=True)
        for receiver in list(self._incoming):
            if receiver.transport is not None:
                receiver.transport.abort()
        senders = list(self._senders.values())
        self._senders.clear()
        for sender in senders:
            if sender.transport is not None:
                sender.transport.close()  # flushes what small sends left in the buffer
        if senders:  # a peer that does not read must not hold up our close for long
            await asyncio.wait([s.lost for s in senders], timeout=min(self.connect_timeout, 5.0))
        for sender in senders:
            if sender.transport is not None and not sender.lost.done():
                sender.transport.abort()
        logger.debug("%r closed", self)

    # ---------------------------------------------------------------- send

    def send_waits(self, dst: int) -> bool:
        sender = self._senders.get(dst)
        if sender is None:
            return dst != self.peer_id
        return not sender.ready or bool(self._queued.get(dst))

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        if self._state != "open":
            self._check_open()
        if not 0 <= dst < self.num_peers:
            raise ArgumentError(f"destination peer {dst} is not in 0..{self.num_peers - 1}")
        start = time.perf_counter()
        if dst == self.peer_id:
            self.mailbox.deliver(dst, key, payload.copy())
        else:
            buffers = encode_frame(key, payload, self.config.limits)
            if len(buffers) == 1:  # a frame without out-of-band buffers is one bytes object
                nbytes = len(buffers[0])
            else:
                nbytes = sum(memoryview(b).nbytes for b in buffers)
            sender = self._senders.get(dst)
            idle = sender is not None and sender.ready and not self._queued.get(dst)
            if nbytes <= SMALL and idle:
                # Fast path for the common small message on an idle connection
                # (no earlier frame waits to be written): one write, no lock, no await.
                assert sender is not None and sender.transport is not None
                data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
                sealer = sender.sealer
                sender.transport.write(data if sealer is None else sealer.seal_small(bytes(data)))
            else:
                # Frames to one destination never interleave, nor overtake each other.
                self._queued[dst] = self._queued.get(dst, 0) + 1
                try:
                    async with self._locks.setdefault(dst, asyncio.Lock()):
                        sender = await self._connection(dst)
                        await sender.write_frame(buffers, nbytes, self.config.timeout)
                finally:
                    self._queued[dst] -= 1
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += payload.nbytes if payload.buffers else len(payload.header)
        stats.seconds += time.perf_counter() - start

    async def _lookup(self, dst: int) -> hp.PeerInfo:
        """Where ``dst`` registered.  A rendezvous server that cannot be reached (it
        restarts, say) is asked again with backoff until ``lookup_timeout``:
        a lookup changes nothing on the server, so asking twice is harmless."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lookup_timeout
        delays = _LOOKUP_RETRY.delays()
        while True:
            left = deadline - loop.time()
            try:
                return await self._client.lookup_info(self.comm_name, self.run_id, dst, left)
            except BrokenChannelError:
                pause = next(delays)
                if loop.time() + pause >= deadline:
                    raise
                logger.debug("peer %d: rendezvous server unreachable, asking again", self.peer_id)
                await asyncio.sleep(pause)

    async def _connection(self, dst: int) -> Sender:
        sender = self._senders.get(dst)
        if sender is not None and sender.usable:
            return sender
        info = await self._lookup(dst)
        self._check_open()
        assert self._control is not None
        punch = self.traversal == "punch" or (self.traversal == "auto" and info.nat)
        if punch:
            result = await pair_tcp(
                self.net,
                self.rendezvous,
                self.member,
                self.peer_id,
                self.peer_id,
                dst,
                join_timeout=self.lookup_timeout,
                punch_timeout=self.punch_timeout,
                step_timeout=self.connect_timeout,
            )
            sock, how = result.sock, "direct" if result.outcome == "direct" else "relayed"
            logger.debug(
                "peer %d -> peer %d: %s after %.1f ms (we are %s, peer %d is %s)",
                self.peer_id, dst, how, result.seconds * 1e3, result.public, dst,
                result.peer_public,
            )  # fmt: skip
        else:
            sock = await connect_plain(
                self.net, self.member, self.peer_id, dst, info.addr, self.connect_timeout
            )
            how = "direct"
        try:
            self._check_open()
            loop = asyncio.get_running_loop()
            sealer = (
                StreamSealer(self._stream_key(sock, self.peer_id, dst)) if self.encrypt else None
            )
            _, proto = await loop.create_connection(lambda: Sender(self, dst, sealer), sock=sock)
        except BaseException:
            close_socket(sock)
            raise
        self._senders[dst] = proto
        self.stats.pairs[dst] = how
        return proto

    def _stream_key(self, sock: socket.socket, writer: int, reader: int) -> bytes:
        """The key of the frames ``writer`` writes to ``reader`` on ``sock``."""
        handshake = take_handshake(sock)
        secret = self.config.secret
        if handshake is None or secret is None:  # every path authenticates; a bug if not
            raise BrokenChannelError(
                f"no membership handshake on the connection {writer}->{reader}"
            )
        if (handshake.writer, handshake.reader) != (writer, reader):
            raise BrokenChannelError(
                f"the connection {writer}->{reader} passed a handshake for "
                f"{handshake.writer}->{handshake.reader}"
            )
        return stream_key(secret, self.comm_name, self.run_id, handshake)

    def _valid_peer(self, peer: int) -> bool:
        return 0 <= peer < self.num_peers and peer != self.peer_id

    async def _accept_loop(self, listen: socket.socket) -> None:
        """Accept plain connections; each must prove membership before it may send.

        Unproven connections are bounded by the admission policy: one over
        a limit evicts the oldest unproven connection (of its source, then
        of all), never the new one; see the module doc.
        """
        loop = asyncio.get_running_loop()
        while self.is_open:
            try:
                conn, addr = await sock_accept(listen)
            except OSError as exc:
                if not self.is_open:
                    return
                logger.warning("peer %d: accept failed: %s", self.peer_id, exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            source = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            for old in self._unproven.admit(conn, source, loop.time()):
                task = self._handshakes.get(old)
                if task is not None:
                    task.cancel()  # its done callback closes the socket
                else:
                    close_socket(old, reset=True)
            evicted = self._unproven.report(loop.time())
            if evicted:
                logger.warning(
                    "peer %d: %d connection(s) that had not proved membership evicted to make "
                    "room (limits: security.max_unproven=%d, max_unproven_per_source=%d); is "
                    "someone flooding this port (latest from %s)?",
                    self.peer_id, evicted, self._unproven.max_total,
                    self._unproven.max_per_source, source,
                )  # fmt: skip
            task = self._spawn(self._admit(conn, addr))
            self._handshakes[conn] = task
            task.add_done_callback(functools.partial(self._handshake_done, conn))

    def _handshake_done(self, conn: socket.socket, task: asyncio.Task[bool]) -> None:
        """Close an accepted socket whose handshake did not hand it over (failed,
        timed out, evicted, or cancelled by close(), even before it first ran)."""
        self._handshakes.pop(conn, None)
        self._unproven.settle(conn)
        if task.cancelled() or task.exception() is not None or not task.result():
            close_socket(conn, reset=True)

    async def _admit(self, conn: socket.socket, addr: Any) -> bool:
        """Prove membership within the handshake deadline; True once the socket is handed on."""
        try:
            deadline = asyncio.get_running_loop().time() + self.handshake_timeout
            src = await authenticate(
                conn,
                self.member,
                self.peer_id,
                committer=False,
                other=None,
                deadline=deadline,
                valid_peer=self._valid_peer,
            )
        except (CommTimeout, BrokenChannelError) as exc:
            # silent or gone: a flood would make a warning per connection
            logger.debug("peer %d: closing a connection from %s: %s", self.peer_id, addr, exc)
            return False
        except (FMIError, OSError) as exc:
            logger.warning("peer %d: closing a connection from %s: %s", self.peer_id, addr, exc)
            return False
        self._unproven.settle(conn)  # proven: its slot is free for the next one
        await self._receive_on(conn, src)
        return True

    async def _receive_on(self, conn: socket.socket, src: int) -> None:
        if not self.is_open:
            close_socket(conn)
            return
        loop = asyncio.get_running_loop()
        try:
            opener = (
                StreamOpener(self._stream_key(conn, src, self.peer_id)) if self.encrypt else None
            )
            await loop.connect_accepted_socket(lambda: Receiver(self, src, opener), sock=conn)
        except (OSError, BrokenChannelError) as exc:
            close_socket(conn)
            logger.warning("peer %d: connection from peer %d failed: %s", self.peer_id, src, exc)
            return
        logger.debug("peer %d: accepted connection from peer %d", self.peer_id, src)

    def _on_invite(self, invite: hp.Invite) -> None:
        """Peer ``invite.initiator`` wants to punch a connection to us: take part."""
        if (
            invite.transport != "tcp"
            or invite.comm != self.comm_name
            or invite.run_id != self.run_id
            or invite.responder != self.peer_id
            or not self._valid_peer(invite.initiator)
            or not self.is_open
        ):
            logger.warning(
                "peer %d: ignoring an invite that is not for us: %r", self.peer_id, invite
            )
            return
        self._spawn(self._respond(invite.initiator))

    async def _respond(self, src: int) -> None:
        try:
            result = await pair_tcp(
                self.net,
                self.rendezvous,
                self.member,
                self.peer_id,
                src,
                self.peer_id,
                join_timeout=self.lookup_timeout,
                punch_timeout=self.punch_timeout,
                step_timeout=self.connect_timeout,
            )
        except (FMIError, OSError) as exc:
            # The initiator sees its own failure; our receives from it time out or fail.
            logger.warning("peer %d: pairing with peer %d failed: %s", self.peer_id, src, exc)
            return
        how = "direct" if result.outcome == "direct" else "relayed"
        logger.debug(
            "peer %d <- peer %d: %s after %.1f ms", self.peer_id, src, how, result.seconds * 1e3
        )
        self.stats.pairs.setdefault(src, how)
        await self._receive_on(result.sock, src)
