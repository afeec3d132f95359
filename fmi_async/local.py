"""Several peers in one event loop, over the in-process memory channel."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .channels.memory import MemoryHub
from .communicator import Communicator
from .errors import ArgumentError

__all__ = ["local_peers"]


@asynccontextmanager
async def local_peers(
    n: int, config: Any = None, comm_name: str = "FMI_WORLD", **kwargs: Any
) -> AsyncIterator[list[Communicator]]:
    """``async with fmi.local_peers(4) as comms:`` -- open communicators 0..n-1.

    They share a fresh in-process hub (and a fresh run id), so several groups
    in one process never see each other.  Extra keyword arguments go to every
    :class:`Communicator` (``timeout=``, ``hint=``, ...).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError(f"local_peers needs a positive number of peers, got {n!r}")
    hub = MemoryHub(n)
    kwargs.setdefault("run_id", uuid.uuid4().hex[:12])
    comms = [Communicator(i, n, config, comm_name, hub=hub, **kwargs) for i in range(n)]
    ok = False
    try:
        await asyncio.gather(*(c.open() for c in comms))
        yield comms
        ok = True
    finally:
        # All peers close together, so the final barrier of storage channels
        # completes; after an error it is skipped (peers may be mid-collective).
        results = await asyncio.gather(
            *(c.close(synchronize=ok) for c in comms), return_exceptions=True
        )
        if ok:
            # A clean exit that could not close cleanly is not clean: say so.
            for result in results:
                if isinstance(result, BaseException):
                    raise result
