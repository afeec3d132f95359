"""Splicing two byte streams: the relay of last resort, and the NAT box's forwarding.

When a pair cannot be punched (RFC 5128 section 2.3: relaying always works,
at the price of the relay's bandwidth), both peers connect to the rendezvous
server, which joins their connections with :func:`splice`.  The peers run
their membership handshake end to end across it, and the TCP channel sends
frames over it as over any other connection: sealed with a key derived from
that handshake (``security.encrypt``), so the relay moves records it can
neither read nor alter undetected; it sees their sizes and timing only.

Memory is bounded per direction: a read takes at most ``_CHUNK`` bytes, and
the next read waits until the writer's buffer has drained below its high-water
mark, so a slow reader throttles its sender through TCP flow control instead
of growing the relay's buffers.  Every wait has the idle deadline.  An EOF is
passed on as a half-close, so a clean end of stream stays clean; a reset or
timeout on one side aborts the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

__all__ = ["splice"]

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idle: float) -> int:
    moved = 0
    while True:
        async with asyncio.timeout(idle):
            data = await src.read(_CHUNK)
        if not data:
            if dst.can_write_eof() and not dst.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    dst.write_eof()
            return moved
        dst.write(data)
        moved += len(data)
        async with asyncio.timeout(idle):
            await dst.drain()


async def splice(a: Stream, b: Stream, idle_timeout: float) -> int:
    """Copy both ways until both directions ended; returns the bytes moved."""
    (ra, wa), (rb, wb) = a, b
    for writer in (wa, wb):
        writer.transport.set_write_buffer_limits(high=_CHUNK, low=_CHUNK // 4)
        # A relay must not add Nagle's delay to small messages (one frame after a
        # handshake would otherwise wait for a delayed ACK, 40 ms on Linux).
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tasks = [
        asyncio.create_task(_pump(ra, wb, idle_timeout)),
        asyncio.create_task(_pump(rb, wa, idle_timeout)),
    ]
    moved = 0
    try:
        for future in asyncio.as_completed(tasks):
            try:
                moved += await future
            except (OSError, TimeoutError) as exc:
                logger.debug("splice ended: %s", exc or type(exc).__name__)
                for writer in (wa, wb):
                    writer.transport.abort()
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (wa, wb):
            writer.close()
    return moved
