"""What every channel provides, and the matching layer they deliver into.

A channel moves opaque :class:`~fmi_async.wire.Payload` objects for a message
*key* between two peers.  It knows nothing of collectives.  Direct channels
deliver into the receiving peer's :class:`Mailbox`, which matches messages by
``(source, key)`` like MPI matches ``(source, tag)``: an early message for
another key waits in its own queue and never blocks anybody else.

Mediated channels (storage) may override :meth:`Channel.recv` to fetch from
their backend, and add ``put``/``get``/``delete`` for one-to-many exchange.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import Config
from ..errors import ClosedError, CommTimeout
from ..wire import Key, Payload

__all__ = ["Channel", "ChannelStats", "Mailbox", "describe_key"]

logger = logging.getLogger(__name__)


def describe_key(key: Key) -> str:
    """Human-readable key for error messages: ``tag 3`` or ``bcast #5 step 2``."""
    if len(key) >= 2 and key[0] == "u":
        return f"tag {key[1]}"
    if len(key) >= 3 and key[0] == "c":
        return f"collective #{key[1]} step {'/'.join(str(k) for k in key[2:])}"
    return repr(key)


@dataclass
class ChannelStats:
    """What a channel carried; dollars are filled in by the cost model."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    pairs: dict[int, str] = field(default_factory=dict)  # peer -> "direct" / "relayed" / ...

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages_sent": self.messages_sent,
            "bytes_sent": self.bytes_sent,
            "messages_received": self.messages_received,
            "bytes_received": self.bytes_received,
            "requests": dict(self.requests),
            "seconds": round(self.seconds, 6),
            "pairs": dict(self.pairs),
        }


_SWEEP_SLACK = 1e-3  # a timer may fire a clock tick early; such a wait has expired


class _Expired(Exception):
    """Internal: a mailbox wait ran out of time."""


def _expire(fut: asyncio.Future[Payload]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class Mailbox:
    """One peer's inbox, matched by ``(source, key)``; FIFO per match."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self._queues: dict[tuple[int, Key], deque[Payload]] = {}
        self._waiters: dict[tuple[int, Key], deque[asyncio.Future[Payload]]] = {}
        self._error: BaseException | None = None
        self._source_errors: dict[int, BaseException] = {}
        self._deadlines: dict[asyncio.Future[Payload], float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

    def __repr__(self) -> str:
        return (
            f"<Mailbox peer={self.owner} queued={sum(len(q) for q in self._queues.values())} "
            f"waiting={sum(len(w) for w in self._waiters.values())}>"
        )

    def deliver(self, src: int, key: Key, payload: Payload) -> None:
        match = (src, key)
        waiters = self._waiters.get(match)
        while waiters:
            fut = waiters.popleft()
            if not waiters:
                del self._waiters[match]
            if not fut.done():
                fut.set_result(payload)
                return
        self._queues.setdefault(match, deque()).append(payload)

    async def take(self, src: int, key: Key, timeout: float | None, channel: str) -> Payload:
        match = (src, key)
        queue = self._queues.get(match)
        if queue:
            payload = queue.popleft()
            if not queue:
                del self._queues[match]
            return payload
        if self._error is not None:
            raise self._error
        if src in self._source_errors:
            raise self._source_errors[src]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Payload] = loop.create_future()
        self._waiters.setdefault(match, deque()).append(fut)
        if timeout is not None:
            # Deadlines are kept in a dict that one shared timer sweeps: a wait
            # that is answered in time (nearly all) costs a dict entry, not a
            # timer armed and cancelled (asyncio.wait_for would even add a task
            # on Python 3.11).
            deadline = loop.time() + timeout
            self._deadlines[fut] = deadline
            if deadline < self._sweep_at:
                self._arm_sweep(loop, deadline)
        try:
            return await fut
        except _Expired:
            raise CommTimeout(
                f"peer {self.owner} waited {timeout:.3g}s for a message from peer {src} "
                f"({describe_key(key)}) on channel {channel}; the peer never sent it"
            ) from None
        finally:
            if timeout is not None:
                del self._deadlines[fut]
            waiters = self._waiters.get(match)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[match]

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = when
        self._sweeper = loop.call_at(when, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waits whose deadline passed; sleep until the next one."""
        self._sweeper, self._sweep_at = None, math.inf
        now = loop.time() + _SWEEP_SLACK
        for fut, deadline in list(self._deadlines.items()):
            if deadline <= now:
                _expire(fut)  # its take() removes the entry as it wakes
        pending = [d for f, d in self._deadlines.items() if not f.done()]
        if pending:
            self._arm_sweep(loop, min(pending))

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter with ``exc`` (channel broke or was closed)."""
        self._error = exc
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
        self._waiters.clear()

    def fail_source(self, src: int, exc: BaseException) -> None:
        """Its connection broke: wake the waiters for ``src`` and fail later receives
        from it at once (messages already queued are still delivered), until
        :meth:`clear_source` says it is back."""
        self._source_errors[src] = exc
        for (s, _), waiters in list(self._waiters.items()):
            if s == src:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)

    def clear_source(self, src: int) -> None:
        """``src`` reconnected: receives from it wait normally again."""
        self._source_errors.pop(src, None)

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())


class Channel(abc.ABC):
    """A way to move payloads between the peers of one communicator."""

    name: ClassVar[str]
    kind: ClassVar[Literal["direct", "mediated"]]

    def __init__(
        self,
        peer_id: int,
        num_peers: int,
        comm_name: str,
        run_id: str,
        config: Config,
        mailbox: Mailbox,
    ) -> None:
        self.peer_id = peer_id
        self.num_peers = num_peers
        self.comm_name = comm_name
        self.run_id = run_id
        self.config = config
        self.options = config.options(self.name)
        self.mailbox = mailbox
        self.stats = ChannelStats()
        self._state: Literal["new", "open", "closed"] = "new"

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} peer={self.peer_id}/{self.num_peers} "
            f"comm={self.comm_name!r} {self._state}>"
        )

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError(f"channel {self.name} of peer {self.peer_id} is {self._state}")

    async def open(self) -> None:
        self._state = "open"

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        self.mailbox.fail(ClosedError(f"channel {self.name} of peer {self.peer_id} was closed"))

    @abc.abstractmethod
    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        """Deliver ``payload`` to peer ``dst`` under ``key``; returns when buffers may be reused."""

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        """The next payload from ``src`` under ``key``, waiting at most ``timeout`` seconds."""
        self._check_open()
        start = time.perf_counter()
        payload = await self.mailbox.take(src, key, timeout, self.name)
        self.stats.seconds += time.perf_counter() - start
        self.stats.messages_received += 1
        self.stats.bytes_received += payload.nbytes
        return payload

    def _count_send(self, payload: Payload) -> None:
        self.stats.messages_sent += 1
        self.stats.bytes_sent += payload.nbytes
