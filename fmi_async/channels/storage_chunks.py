"""Pieces of a large stored message: cutting frames into chunks, bounded concurrency.

Backends with an object or item size limit (S3 parts, DynamoDB items, Redis
chunk keys) store a message in pieces.  :func:`join_range` builds each piece
from the caller's buffers without joining the whole message first, and
:func:`bounded_gather` runs the requests of the pieces a few at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ..errors import ArgumentError
from ..wire import Buffer

__all__ = ["bounded_gather", "chunk_bounds", "join_range"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def chunk_bounds(nbytes: int, size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each ``size``-byte piece of ``nbytes`` bytes (the last shorter)."""
    if size <= 0:
        raise ArgumentError(f"chunk size must be positive, got {size}")
    return [(start, min(start + size, nbytes)) for start in range(0, max(nbytes, 1), size)]


def join_range(frames: Sequence[Buffer], start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the concatenation of ``frames``, without joining all of them.

    Pieces of a large message (S3 parts, DynamoDB items, Redis chunks) are
    built one at a time from the caller's buffers, so a 64 MiB array never
    needs a second full copy, and independent pieces can be built by
    concurrent tasks.
    """
    pieces: list[memoryview] = []
    offset = 0
    for frame in frames:
        view = memoryview(frame).cast("B")
        lo, hi = max(start - offset, 0), min(end - offset, view.nbytes)
        if lo < hi:
            pieces.append(view[lo:hi])
        offset += view.nbytes
        if offset >= end:
            break
    return b"".join(pieces)


async def bounded_gather(factories: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the coroutines ``factories`` make, at most ``limit`` at once, results in order.

    The first failure cancels the others and is raised as it is (not wrapped
    in an ExceptionGroup), so the channel's error mapping stays visible.
    """
    semaphore = asyncio.Semaphore(max(1, limit))

    async def one(factory: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await factory()

    tasks = [asyncio.ensure_future(one(f)) for f in factories]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
