"""Raw buffers: their type, flat byte views of them, and memory to receive into.

A received large array is written by the kernel straight into memory from
:func:`allocate` (not zero-filled); a :class:`BufferRecycler` hands the same
memory out again once no value a user can reach still holds it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import numpy as np

__all__ = ["Buffer", "BufferRecycler", "allocate", "buflen", "flat"]

logger = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


def buflen(buf: Buffer) -> int:
    """The size of ``buf`` in bytes (whatever its item size and shape)."""
    return memoryview(buf).nbytes


def flat(buf: Buffer) -> memoryview:
    """A one-dimensional unsigned-byte view of ``buf`` (no copy)."""
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def allocate(nbytes: int) -> memoryview:
    """Writable memory for one received buffer, *not* zero-filled.

    ``bytearray(n)`` writes n zero bytes first, which for a 64 MiB array costs
    as much as receiving it; ``numpy.empty`` only reserves the pages, and the
    kernel fills them once, with the received data.
    """
    return np.empty(nbytes, dtype=np.uint8).data.cast("B")


_OWN_REFERENCES: Final = 3
_COUNTS_REFERENCES: Final = sys.implementation.name == "cpython"  # exact counts, no tracing GC


class BufferRecycler:
    """Reuses the memory of large received buffers that nobody holds any more.

    Receiving into new memory costs a page fault per page on first touch,
    which on some virtual machines is slower than the network copy itself.  A
    training loop receives arrays of the same size again and again, so the
    last few large buffers are kept here and handed out again once the only
    reference left to one is ours: every array, view or memoryview made from
    a buffer holds a reference to it, so a count of one means that no value a
    user can reach still uses that memory.
    """

    def __init__(
        self, slots: int = 2, smallest: int = 1024 * 1024, largest: int = 128 * 1024 * 1024
    ) -> None:
        self._slots = slots
        self._smallest = smallest
        self._largest = largest
        self._pool: list[np.ndarray[Any, Any]] = []

    def allocate(self, nbytes: int) -> memoryview:
        """Writable memory of ``nbytes`` bytes, reused when a pooled buffer is free."""
        if not (_COUNTS_REFERENCES and self._slots and self._smallest <= nbytes <= self._largest):
            return allocate(nbytes)
        for i in range(len(self._pool)):  # not enumerate: its tuple would hold a reference
            arr = self._pool[i]
            # Ours: the pool's list, `arr` and getrefcount's argument.
            if arr.nbytes == nbytes and sys.getrefcount(arr) <= _OWN_REFERENCES:
                del self._pool[i]
                self._pool.append(arr)  # most recently used last
                return arr.data.cast("B")
        arr = np.empty(nbytes, dtype=np.uint8)
        self._pool.append(arr)
        if len(self._pool) > self._slots:
            del self._pool[0]  # the least recently used goes back to the allocator
        return arr.data.cast("B")

    def copy(self, buf: Buffer) -> Buffer:
        """A copy of ``buf`` in memory of this recycler (a bytearray when small)."""
        view = flat(buf)
        if view.nbytes < self._smallest:
            return bytearray(view)
        out = self.allocate(view.nbytes)
        out[:] = view
        return out
