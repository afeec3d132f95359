"""In-process channel: peers that share one event loop.

Used by :func:`fmi_async.local_peers` (tests, notebooks, one web service).
Payload buffers are copied on send, so a sender may reuse its arrays at once,
exactly as with a network channel.  An optional latency/bandwidth model
(``backends.Memory.latency`` seconds, ``bandwidth`` bytes/s) delays delivery to
simulate a network.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..errors import ArgumentError, ClosedError
from ..wire import BufferRecycler, Key, Payload
from .base import ChannelContext, DirectChannel
from .mailbox import Mailbox
from .options import ChannelOptions, option

__all__ = ["MemoryChannel", "MemoryHub", "MemoryOptions"]


@dataclass(frozen=True)
class MemoryOptions(ChannelOptions):
    """``backends.Memory``: an optional simulated network."""

    latency: float = option(0.0, ge=0, doc="seconds added to every message")
    bandwidth: float = option(0.0, ge=0, doc="bytes per second (0: unlimited)")


class MemoryHub:
    """The shared switchboard of one group of in-process peers."""

    def __init__(self, num_peers: int) -> None:
        self.num_peers = num_peers
        self.mailboxes: dict[int, Mailbox] = {}

    def __repr__(self) -> str:
        return f"<MemoryHub peers={len(self.mailboxes)}/{self.num_peers}>"


class MemoryChannel(DirectChannel):
    """Messages between peers of one process, through their :class:`MemoryHub`."""

    name = "memory"
    Options = MemoryOptions
    options: MemoryOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        hub, num_peers = ctx.hub, ctx.num_peers
        if hub is None:
            raise ArgumentError(
                "the memory channel connects peers of one process; create them with "
                "fmi.local_peers(n), or enable another backend"
            )
        if hub.num_peers != num_peers:
            raise ArgumentError(f"memory hub has {hub.num_peers} peers, communicator {num_peers}")
        self.hub = hub
        self.latency = self.options.latency
        self.bandwidth = self.options.bandwidth
        self._recyclers: dict[int, BufferRecycler] = {}

    async def open(self) -> None:
        self.hub.mailboxes[self.peer_id] = self.mailbox
        await super().open()

    async def close(self) -> None:
        self.hub.mailboxes.pop(self.peer_id, None)
        await super().close()

    def send_waits(self, dst: int) -> bool:
        return bool(self.latency or self.bandwidth)  # only a simulated network waits

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        start = time.perf_counter()
        box = self.hub.mailboxes.get(dst)
        if box is None:
            raise ClosedError(f"peer {dst} is not open on the memory channel")
        recycler = self._recyclers.get(dst)
        if recycler is None:
            recycler = self._recyclers[dst] = BufferRecycler()
        owned = payload.copy(recycler)  # large buffers land in memory already paged in
        delay = self.latency + (payload.nbytes / self.bandwidth if self.bandwidth else 0.0)
        if delay:
            await asyncio.sleep(delay)
        box.deliver(self.peer_id, key, owned)
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start
