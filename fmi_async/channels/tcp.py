"""Direct TCP channel: one lazily opened connection per ordered pair of peers.

``open()`` listens on an ephemeral port and registers that address at the
rendezvous server (``backends.TCP.host``/``port``, FMI's ``Direct``
section).  The first send to a peer looks its address up there, connects,
and introduces itself with a :class:`~fmi_async.holepunch.protocol.Hello`
(comm name, run id, sender, receiver, HMAC proof when a secret is set).

A peer *sends* only on connections it opened and *receives* only on
connections it accepted.  Two peers that send to each other at the same
moment therefore open two connections instead of racing to agree on one,
and every byte stream has exactly one writer.

Receiving is an :class:`asyncio.BufferedProtocol` over
:class:`~fmi_async.wire.FrameReader`: the kernel writes large arrays straight
into the ``bytearray`` that becomes the received array, with no extra copy.
Sending writes small frames in one ``write`` and large buffers in 1 MiB
slices with flow control: the write buffer limits are zero, so the transport
pauses us whenever it holds unsent bytes and ``send`` waits until it is
empty.  That bounds the memory a send adds to about one slice, and it is also
what makes "a returned send may reuse its buffers" true on uvloop, whose
transport keeps references to (rather than copies of) unsent data.

Options (``backends.TCP``): ``host``, ``port`` (rendezvous server, required);
``bind`` (listen address, default ``127.0.0.1``; with ``0.0.0.0`` the server
records the address it saw the peer at); ``advertise`` (address to register
instead of ``bind``); ``connect_timeout`` (seconds, default 10; FMI's
``max_timeout`` in milliseconds is accepted too); ``lookup_timeout`` (how long
a first send waits for the destination to register, default the config's
``timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, cast

from ..config import Config
from ..errors import (
    ArgumentError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    EndOfStream,
    ProtocolError,
)
from ..holepunch import protocol as hp
from ..holepunch.client import RendezvousClient
from ..wire import Buffer, FrameReader, Key, Payload, encode_frame
from .base import Channel, Mailbox

__all__ = ["TCPChannel"]

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024  # bytes per write of a large buffer
_SMALL = 256 * 1024  # frames up to this size are joined and written at once
_HELLO_MAX = 4096  # a hello is tiny; never allocate more before knowing the sender


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Sender(asyncio.Protocol):
    """Our end of a connection we opened: we only write; flow control only."""

    def __init__(self, channel: TCPChannel, dst: int) -> None:
        self.channel = channel
        self.dst = dst
        self.transport: asyncio.Transport | None = None
        self.error: Exception | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "broken" if self.error else ("paused" if self._paused else "ready")
        return f"<_Sender {self.channel.peer_id}->{self.dst} {state}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        _set_nodelay(transport)
        # Paused whenever anything is unsent, resumed when all is handed to the kernel.
        self.transport.set_write_buffer_limits(high=0, low=0)

    def data_received(self, data: bytes) -> None:
        logger.warning("peer %d talked back on a send-only connection; closing", self.dst)
        assert self.transport is not None
        self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel.is_open:
            reason = f": {exc}" if exc else ""
            self.error = BrokenChannelError(
                f"connection from peer {self.channel.peer_id} to peer {self.dst} was lost{reason}"
            )
        else:
            self.error = ClosedError(f"channel tcp of peer {self.channel.peer_id} was closed")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self.error)
        if not self.lost.done():
            self.lost.set_result(None)

    @property
    def ready(self) -> bool:
        """Usable, and nothing of an earlier frame is still waiting to be written."""
        return self.usable and not self._paused

    @property
    def usable(self) -> bool:
        return self.error is None and self.transport is not None and not self.transport.is_closing()

    async def writable(self, timeout: float) -> None:
        """Wait until the transport holds no unsent bytes (or the connection broke)."""
        if self.error is not None:
            raise self.error
        if not self.usable:
            raise BrokenChannelError(
                f"connection from peer {self.channel.peer_id} to peer {self.dst} is closing"
            )
        if not self._paused:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that races with the resume, and a cancelled send must stop.
            async with asyncio.timeout(timeout):
                await self._waiter
        except TimeoutError:
            raise CommTimeout(
                f"peer {self.dst} did not read for {timeout:.3g}s while peer "
                f"{self.channel.peer_id} was sending to it on channel tcp"
            ) from None
        finally:
            self._waiter = None

    async def write_frame(self, buffers: list[Buffer], nbytes: int, timeout: float) -> None:
        """Write one frame; a frame cut short poisons the stream, so the connection goes."""
        transport = self.transport
        assert transport is not None
        await self.writable(timeout)
        if nbytes <= _SMALL:
            transport.write(b"".join(buffers))
            return
        try:
            for buf in buffers:
                view = memoryview(buf)
                for off in range(0, view.nbytes, _CHUNK):
                    await self.writable(timeout)
                    transport.write(view[off : off + _CHUNK])
            await self.writable(timeout)  # the caller may reuse its buffers after this
        except BaseException:
            transport.abort()
            raise


class _Receiver(asyncio.BufferedProtocol):
    """A connection another peer opened to us: hello first, then frames."""

    def __init__(self, channel: TCPChannel) -> None:
        self.channel = channel
        self.src: int | None = None
        self.transport: asyncio.Transport | None = None
        self.reader: FrameReader | None = None  # set once the hello checked out
        self._hello = bytearray(hp.HEADER_SIZE)
        self._hello_filled = 0
        self._hello_header = True
        self._failure: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<_Receiver {self.src}->{self.channel.peer_id}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        _set_nodelay(transport)
        if not self.channel.is_open:
            self.transport.abort()
            return
        self.channel._incoming.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self.channel.connect_timeout, self._hello_timeout
        )

    def _hello_timeout(self) -> None:
        if self.reader is None and self.transport is not None:
            logger.warning(
                "peer %d: a connection sent no hello within %.3gs; closing it",
                self.channel.peer_id,
                self.channel.connect_timeout,
            )
            self.transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.reader is not None:
            return self.reader.get_buffer()
        # Exactly the rest of the hello: bytes after it belong to the frame reader.
        return memoryview(self._hello)[self._hello_filled :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.reader is None:
                self._hello_progress(nbytes)
                return
            self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(f"peer {self.src}: {exc}" if self.src is not None else f"bad hello: {exc}")
            return
        assert self.src is not None
        for key, payload in self.reader.pop_frames():
            self.channel.mailbox.deliver(self.src, key, payload)

    def _hello_progress(self, nbytes: int) -> None:
        self._hello_filled += nbytes
        if self._hello_filled < len(self._hello):
            return
        if self._hello_header:
            need = hp.parse_header(self._hello, _HELLO_MAX)
            if need == 0:
                raise ProtocolError("empty hello")
            self._hello, self._hello_filled, self._hello_header = bytearray(need), 0, False
            return
        message = hp.decode_body(self._hello)
        problem = self.channel._check_hello(message)
        if problem is not None:
            self._fail(problem)
            return
        assert isinstance(message, hp.Hello)
        self.src = message.peer
        self.channel.mailbox.clear_source(message.peer)
        self.reader = FrameReader(self.channel.config.limits)
        if self._timer is not None:
            self._timer.cancel()
        logger.debug("peer %d: accepted connection from peer %d", self.channel.peer_id, self.src)

    def _fail(self, problem: str) -> None:
        logger.warning("peer %d: closing a connection: %s", self.channel.peer_id, problem)
        self._failure = problem
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.channel._incoming.discard(self)
        src, chan = self.src, self.channel
        if src is None or not chan.is_open:
            return
        assert self.reader is not None
        error: Exception
        if self._failure is not None:
            error = BrokenChannelError(f"connection from peer {src} was dropped: {self._failure}")
        elif exc is not None or self.reader.mid_frame:
            reason = f" ({exc})" if exc else ""
            error = BrokenChannelError(
                f"connection from peer {src} to peer {chan.peer_id} broke in the middle of a "
                f"message{reason}; did peer {src} crash?"
            )
        else:
            error = EndOfStream(
                f"peer {src} closed its connection to peer {chan.peer_id}; "
                "it will send nothing more"
            )
        chan.mailbox.fail_source(src, error)


class TCPChannel(Channel):
    """Point-to-point TCP between peers found through a rendezvous server."""

    name = "tcp"
    kind = "direct"

    def __init__(
        self,
        peer_id: int,
        num_peers: int,
        comm_name: str,
        run_id: str,
        config: Config,
        mailbox: Mailbox,
    ) -> None:
        super().__init__(peer_id, num_peers, comm_name, run_id, config, mailbox)
        opts = self.options
        host, port = opts.get("host"), opts.get("port")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not isinstance(host, str) or not host or not isinstance(port, int):
            raise ConfigError(
                "backends.TCP needs the rendezvous server's host and port, e.g. "
                '{"TCP": {"enabled": true, "host": "10.0.0.5", "port": 10000}}; start one '
                "with `fmi rendezvous`, or use `fmi run`, which starts one for you"
            )
        self.rendezvous: hp.Address = (host, port)
        self.bind = str(opts.get("bind", "127.0.0.1"))
        self.advertise = str(opts.get("advertise", self.bind))
        if "connect_timeout" in opts:
            connect_timeout = float(opts["connect_timeout"])
        else:
            connect_timeout = float(opts.get("max_timeout", 10_000)) / 1000.0
        self.connect_timeout = connect_timeout
        self.lookup_timeout = float(opts.get("lookup_timeout", config.timeout))
        if self.connect_timeout <= 0 or self.lookup_timeout <= 0:
            raise ConfigError("backends.TCP connect_timeout and lookup_timeout must be positive")
        self.listen_address: hp.Address | None = None
        self._client = RendezvousClient(host, port, config.secret, timeout=self.connect_timeout)
        self._server: asyncio.Server | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._senders: dict[int, _Sender] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._incoming: set[_Receiver] = set()

    def __repr__(self) -> str:
        addr = self.listen_address
        listen = f"{addr[0]}:{addr[1]}" if addr else "-"
        return (
            f"<TCPChannel peer={self.peer_id}/{self.num_peers} comm={self.comm_name!r} "
            f"{self._state} listen={listen} out={sorted(self._senders)} "
            f"in={sorted(r.src for r in self._incoming if r.src is not None)}>"
        )

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            raise ClosedError(f"{self!r} cannot be opened again")
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Receiver(self), self.bind, 0)
        except OSError as exc:
            raise ConfigError(
                f"peer {self.peer_id} cannot listen on {self.bind!r}: {exc.strerror or exc}; "
                "check backends.TCP.bind"
            ) from exc
        port = int(self._server.sockets[0].getsockname()[1])
        self.listen_address = (self.bind, port)
        await super().open()  # open before registering: peers may connect at once
        try:
            ok = await self._client.register(
                self.comm_name, self.run_id, self.peer_id, (self.advertise, port)
            )
        except BaseException:
            await self.close()
            raise
        if ok.ttl:
            self._refresh = asyncio.create_task(self._keep_registered(ok.ttl))
        logger.debug("%r registered at %s:%d", self, *self.rendezvous)

    async def _keep_registered(self, ttl: float) -> None:
        """Renew the registration so a first send late in a long run still finds us."""
        assert self.listen_address is not None
        addr = (self.advertise, self.listen_address[1])
        while self.is_open:
            await asyncio.sleep(max(ttl / 2, 1.0))
            try:
                await self._client.register(self.comm_name, self.run_id, self.peer_id, addr)
            except Exception as exc:  # the next round tries again
                logger.warning("peer %d: renewing the registration failed: %s", self.peer_id, exc)

    async def close(self) -> None:
        if self._state == "closed":
            return
        await super().close()  # from here on, lost connections are not failures
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), self.connect_timeout)
        logger.debug("%r closed", self)

    # ---------------------------------------------------------------- send

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        if not 0 <= dst < self.num_peers:
            raise ArgumentError(f"destination peer {dst} is not in 0..{self.num_peers - 1}")
        start = time.perf_counter()
        if dst == self.peer_id:
            self.mailbox.deliver(dst, key, payload.copy())
        else:
            buffers = encode_frame(key, payload, self.config.limits)
            nbytes = sum(memoryview(b).nbytes for b in buffers)
            sender = self._senders.get(dst)
            lock = self._locks.get(dst)
            if (
                nbytes <= _SMALL
                and sender is not None
                and sender.ready
                and (lock is None or not lock.locked())
            ):
                # Fast path for the common small message on an idle connection:
                # one write, no lock, no await.
                assert sender.transport is not None
                sender.transport.write(buffers[0] if len(buffers) == 1 else b"".join(buffers))
                self._count_send(payload)
                self.stats.seconds += time.perf_counter() - start
                return
            lock = self._locks.setdefault(dst, asyncio.Lock())
            async with lock:  # frames to one destination never interleave
                sender = await self._connection(dst)
                await sender.write_frame(buffers, nbytes, self.config.timeout)
        self._count_send(payload)
        self.stats.seconds += time.perf_counter() - start

    async def _connection(self, dst: int) -> _Sender:
        sender = self._senders.get(dst)
        if sender is not None and sender.usable:
            return sender
        host, port = await self._client.lookup(
            self.comm_name, self.run_id, dst, self.lookup_timeout
        )
        self._check_open()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(lambda: _Sender(self, dst), host, port)
        except TimeoutError:
            raise CommTimeout(
                f"peer {self.peer_id} could not connect to peer {dst} at {host}:{port} within "
                f"{self.connect_timeout:.3g}s (backends.TCP.connect_timeout)"
            ) from None
        except OSError as exc:
            raise BrokenChannelError(
                f"peer {self.peer_id} cannot connect to peer {dst} at {host}:{port}: "
                f"{exc.strerror or exc}; has peer {dst} closed or crashed?"
            ) from exc
        if not self.is_open:
            assert proto.transport is not None
            proto.transport.abort()
            self._check_open()
        hello = hp.sign(
            hp.Hello(self.comm_name, self.run_id, self.peer_id, dst), self.config.secret
        )
        assert proto.transport is not None
        proto.transport.write(hp.encode(hello))
        self._senders[dst] = proto
        self.stats.pairs[dst] = "direct"
        logger.debug("peer %d: connected to peer %d at %s:%d", self.peer_id, dst, host, port)
        return proto

    # ---------------------------------------------------------------- receive side

    def _check_hello(self, message: Any) -> str | None:
        """Why a hello is unacceptable, or None if it is fine."""
        if not isinstance(message, hp.Hello):
            return f"expected a hello, got {getattr(message, 'TYPE', message)!r}"
        if message.comm != self.comm_name or message.run_id != self.run_id:
            return (
                f"hello for communicator {message.comm!r} run {message.run_id}, this is "
                f"{self.comm_name!r} run {self.run_id}"
            )
        if message.dst != self.peer_id:
            return f"hello addressed to peer {message.dst}, this is peer {self.peer_id}"
        if not 0 <= message.peer < self.num_peers or message.peer == self.peer_id:
            return f"hello from peer {message.peer}, not another peer of {self.num_peers}"
        if not hp.verify(message, self.config.secret):
            return f"hello from peer {message.peer} has no valid proof of security.secret"
        return None
