"""The TCP channel's byte streams: thin asyncio protocols for each direction.

A peer *sends* only on connections it opened (:class:`Sender`) and
*receives* only on connections it accepted (:class:`Receiver`), so every
byte stream has exactly one writer.

:class:`Receiver` is an :class:`asyncio.BufferedProtocol` over
:class:`~fmi_async.wire.FrameReader`: the kernel writes large arrays straight
into the ``bytearray`` that becomes the received array, with no extra copy,
and each whole frame goes to the channel's mailbox.

:class:`Sender` writes small frames in one ``write`` and large buffers in
``CHUNK`` slices with flow control: the write buffer limits are zero, so the
transport pauses us whenever it holds unsent bytes and a send waits until it
is empty.  That bounds the memory a send adds to about one slice, and it is
also what makes "a returned send may reuse its buffers" true on uvloop,
whose transport keeps references to (rather than copies of) unsent data.

With ``security.encrypt`` (the default whenever a secret is set) a sender
seals what it writes into records (:class:`~fmi_async.wire.seal.StreamSealer`)
and a receiver opens them (:class:`~fmi_async.wire.seal.StreamOpener`) before
the frame reader sees a byte.  A large buffer is sealed one
:data:`~fmi_async.wire.seal.SEGMENT` at a time, the next record while the
previous one drains; the receiver opens each record straight into the
received array where it fits.  A record that fails authentication ends the
connection with a :class:`~fmi_async.errors.BrokenChannelError` that says so:
a byte stream cannot skip a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, cast

from ..errors import (
    AuthenticationError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    EndOfStream,
    ProtocolError,
)
from ..wire import Buffer, FrameReader
from ..wire.seal import SEGMENT, StreamOpener, StreamSealer

if TYPE_CHECKING:
    from .tcp import TCPChannel

__all__ = ["CHUNK", "SMALL", "Receiver", "Sender", "set_nodelay"]

logger = logging.getLogger(__name__)


CHUNK = 1024 * 1024  # bytes per write of a large buffer
SMALL = 256 * 1024  # frames up to this size are joined and written at once


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (no Nagle delay) on a TCP socket; leave other sockets alone."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Sender(asyncio.Protocol):
    """Our end of a connection we opened: we only write; flow control only."""

    def __init__(self, channel: TCPChannel, dst: int, sealer: StreamSealer | None = None) -> None:
        self.channel = channel
        self.dst = dst
        self.sealer = sealer  # None: the stream is not encrypted (security.encrypt: false)
        self.transport: asyncio.Transport | None = None
        self.error: Exception | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "broken" if self.error else ("paused" if self._paused else "ready")
        sealed = " sealed" if self.sealer else ""
        return f"<Sender {self.channel.peer_id}->{self.dst} {state}{sealed}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
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
        transport = self.transport
        return (
            not self._paused
            and self.error is None
            and transport is not None
            and not transport.is_closing()
        )

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
        sealer = self.sealer
        if nbytes <= SMALL:  # SMALL <= SEGMENT: one record
            data = b"".join(buffers)
            transport.write(data if sealer is None else sealer.seal_small(data))
            return
        try:
            if sealer is not None:
                await self._write_sealed(sealer, buffers, timeout)
                return
            for buf in buffers:
                view = memoryview(buf)
                for off in range(0, view.nbytes, CHUNK):
                    await self.writable(timeout)
                    transport.write(view[off : off + CHUNK])
            await self.writable(timeout)  # the caller may reuse its buffers after this
        except BaseException:
            transport.abort()
            raise

    async def _write_sealed(
        self, sealer: StreamSealer, buffers: list[Buffer], timeout: float
    ) -> None:
        """Each buffer in records of SEGMENT bytes, the next sealed while the last drains."""
        transport = self.transport
        assert transport is not None
        for buf in buffers:
            view = memoryview(buf).cast("B")
            for off in range(0, view.nbytes, SEGMENT):
                record = sealer.seal(view[off : off + SEGMENT])
                await self.writable(timeout)
                transport.write(record)
        await self.writable(timeout)


class Receiver(asyncio.BufferedProtocol):
    """A connection another peer writes to us on; it has proved who it is already."""

    def __init__(self, channel: TCPChannel, src: int, opener: StreamOpener | None = None) -> None:
        self.channel = channel
        self.src = src
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(channel.config.limits)
        self.opener = opener  # None: the stream is not encrypted (security.encrypt: false)
        self._failure: str | None = None

    def __repr__(self) -> str:
        return f"<Receiver {self.src}->{self.channel.peer_id}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        if not self.channel.is_open:
            self.transport.abort()
            return
        self.channel._incoming.add(self)
        self.channel.mailbox.clear_source(self.src)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.opener is not None:
            return self.opener.get_buffer()
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.opener is None:
                frames = self.reader.received(nbytes)
            else:
                frames = self.opener.received(nbytes, self.reader)
        except ProtocolError as exc:
            self._fail(f"peer {self.src}: {exc}")
            return
        except AuthenticationError as exc:
            self.channel.stats.requests["forged"] += 1
            self._fail(f"peer {self.src}: {exc}")
            return
        for key, payload in frames:
            self.channel.mailbox.deliver(self.src, key, payload)

    def _fail(self, problem: str) -> None:
        logger.warning("peer %d: closing a connection: %s", self.channel.peer_id, problem)
        self._failure = problem
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._incoming.discard(self)
        src, chan = self.src, self.channel
        if not chan.is_open:
            return
        error: Exception
        if self._failure is not None:
            error = BrokenChannelError(f"connection from peer {src} was dropped: {self._failure}")
        elif exc is not None or self.reader.mid_frame or (self.opener and self.opener.pending):
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
