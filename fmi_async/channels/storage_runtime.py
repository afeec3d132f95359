"""How a storage channel runs its backend requests.

The machinery under :class:`~fmi_async.channels.storage.StorageChannel`'s
operations, apart from what they mean:

* **Deadlines.**  Every backend request runs under the deadline of the
  operation it serves (the caller's timeout for ``recv``/``get``, the
  config's ``timeout`` for writes), carried in a context variable so that
  the request helpers of each backend and the tasks an operation starts
  read it without passing it along.
* **Retries.**  A request that failed on the way (a reset connection, a
  restarting server, an HTTP 5xx) is retried with the jittered backoff of a
  :class:`~fmi_async.channels.backoff.RetryPolicy` until that deadline; the
  latest failure is remembered and named by the timeout of any wait it
  overlapped.
* **Order.**  One operation at a time per ``(peer, key)``, in call order.
* **Background deletes.**  Consumed messages are deleted after
  ``delete_delay`` seconds, in batches, and best-effort cleanups run
  without making the caller wait; ``close`` awaits them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..errors import CommTimeout
from ..wire import Key
from .backoff import Backoff, RetryPolicy
from .base import ChannelContext, MediatedChannel
from .options import StorageOptions
from .storage_names import default_ttl, storage_prefix

__all__ = ["StorageRuntime"]

logger = logging.getLogger(__name__)


# A request started before its operation's deadline gets at least this long
# (the last poll of a wait is made at the deadline itself).
MIN_ATTEMPT = 0.2

T = TypeVar("T")

# The deadline (loop.time() seconds) of the channel operation running in this
# task: set by the public operations, read by the request helpers of each
# backend, and inherited by the tasks an operation starts (bounded_gather).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "fmi_storage_deadline", default=None
)


@dataclass
class LockEntry:
    """The lock of one ``(peer, key)`` stream and how many operations hold or wait for it."""

    lock: asyncio.Lock
    users: int = 0


class StorageRuntime(MediatedChannel):
    """Deadlines, retries, per-stream order and background deletes of a storage channel.

    The base of :class:`~fmi_async.channels.storage.StorageChannel`; see the
    module docstring.  A backend provides :meth:`location`, :meth:`_remove`
    and, when some of its failures are worth retrying, :meth:`_transient`.
    """

    # Seconds a consumed message is kept before its reader deletes it; a
    # backend whose writes cannot come back as ghosts (Redis) sets 0.
    keep_consumed: ClassVar[bool] = True

    Options: ClassVar[type[StorageOptions]] = StorageOptions
    options: StorageOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        config, opts = ctx.config, self.options
        self.prefix = storage_prefix(ctx.comm_name, ctx.run_id)
        self.ttl = int(opts.ttl if opts.ttl is not None else default_ttl(config.timeout))
        delay = opts.delete_delay if opts.delete_delay is not None else config.timeout
        self.delete_delay = delay if self.keep_consumed else 0.0
        if opts.max_timeout is not None:
            self.max_wait = opts.max_timeout / 1000.0
        else:
            self.max_wait = config.timeout
        self.backoff = Backoff.from_options(opts)
        self.retry = RetryPolicy.from_options(opts, self._transient, self._count_retry)
        self.retried: Counter[str] = Counter()  # failures retried, by error type
        # The latest backend failure and when (loop time): named by the
        # timeout of any wait it overlapped, even one that only waited for
        # another operation of this channel.
        self.last_failure: tuple[float, BaseException] | None = None
        self._consumed: deque[tuple[float, str]] = deque()  # (delete at, name), in time order
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

    @abc.abstractmethod
    def location(self) -> str:
        """Where the data lives, for messages: ``s3://bucket``, ``redis://host:port/0``."""

    @abc.abstractmethod
    async def _remove(self, names: Collection[str]) -> None:
        """Delete every stored piece of ``names``; missing names are not an error."""

    def _transient(self, exc: BaseException) -> bool:
        """Whether a failed request may succeed if sent again (a reset, a restart, a 503)."""
        return False

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        """``(loop deadline, seconds)`` of a wait; ``None`` means the configured maximum."""
        wait = self.max_wait if timeout is None else max(0.0, float(timeout))
        return asyncio.get_running_loop().time() + wait, wait

    def _write_deadline(self) -> float:
        """Writes and deletes get the config's timeout (the caller's wait is not known)."""
        return asyncio.get_running_loop().time() + self.config.timeout

    @contextlib.contextmanager
    def _within(self, deadline: float) -> Iterator[None]:
        """Run the requests of one operation under ``deadline`` (see ``_DEADLINE``)."""
        token = _DEADLINE.set(deadline)
        try:
            yield
        finally:
            _DEADLINE.reset(token)

    def op_deadline(self) -> float:
        """The deadline of the operation running now (``loop.time()`` seconds)."""
        deadline = _DEADLINE.get()
        return self._write_deadline() if deadline is None else deadline

    def attempt_limit(self) -> float:
        """Seconds the next request may take: what is left of the deadline, at least MIN_ATTEMPT."""
        return max(self.op_deadline() - asyncio.get_running_loop().time(), MIN_ATTEMPT)

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt`` under the operation's deadline, retried while it fails transiently."""
        return await self.retry.run(attempt, self.op_deadline(), f"{what} on {self.location()}")

    def note_failure(self, exc: BaseException) -> None:
        """Remember ``exc`` as the latest failure of the backend (see ``last_failure``)."""
        self.last_failure = (asyncio.get_running_loop().time(), exc)

    def _count_retry(self, exc: BaseException, failures: int) -> None:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        self.retried[type(cause).__name__] += 1
        self.note_failure(exc)
        log = logger.info if failures == 1 else logger.debug
        log("%r: retrying after a transient failure (%d so far): %s", self, failures, exc)

    def _timeout(
        self, what: str, waited: float, hint: str, failures: Sequence[BaseException] = ()
    ) -> CommTimeout:
        """The CommTimeout of a wait; ``failures``: what the backend raised meanwhile."""
        if not failures and self.last_failure is not None:
            at, exc = self.last_failure
            if at >= asyncio.get_running_loop().time() - waited:
                failures = [exc]
        if failures:
            hint = f"{self.location()} kept failing during the wait: {failures[-1]}"
        error = CommTimeout(
            f"peer {self.peer_id} waited {waited:.3g}s for {what} on channel {self.name} "
            f"({self.location()}, prefix {self.prefix!r}); {hint}"
        )
        if failures:
            error.__cause__ = failures[-1]
        return error

    @contextlib.asynccontextmanager
    async def _open_deadline(self) -> AsyncIterator[None]:
        """Bound ``open`` by the config's timeout, with a message that says what to check."""
        try:
            async with asyncio.timeout(self.config.timeout):
                yield
        except CommTimeout:
            raise
        except TimeoutError:
            raise CommTimeout(
                f"peer {self.peer_id} could not open channel {self.name} ({self.location()}) "
                f"within {self.config.timeout:g}s; check that the service is reachable "
                "(host, port, endpoint_url, network) and responding"
            ) from None

    @contextlib.asynccontextmanager
    async def _exclusive(
        self, locks: dict[tuple[int, Key], LockEntry], match: tuple[int, Key], deadline: float
    ) -> AsyncIterator[None]:
        """One operation at a time per (peer, key), in call order (asyncio locks are FIFO).

        Receives take sequence numbers in the order they were posted; a
        backend without sequence numbers (Redis) also orders its sends this way.
        """
        entry = locks.get(match)
        if entry is None:
            entry = locks[match] = LockEntry(asyncio.Lock())
        entry.users += 1
        try:
            if entry.users == 1:
                # Nobody else holds or waits for it: acquire() returns at once,
                # without the timer a deadline costs on every message.
                await entry.lock.acquire()
            else:
                async with asyncio.timeout_at(deadline):
                    await entry.lock.acquire()
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del locks[match]

    def _in_background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run a best-effort cleanup without making the caller wait; close() awaits it."""

        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                logger.warning("%r: %s failed (the objects expire by TTL): %s", self, what, exc)

        # A fresh context: the task must not inherit the deadline of the
        # operation that started it.
        task = asyncio.get_running_loop().create_task(guarded(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _delete_later(self, names: Iterable[str]) -> None:
        """Delete consumed ``names`` after ``delete_delay`` seconds, batched; close() flushes.

        The delay is what makes a retried conditional write of a message
        harmless: it meets the consumed message still in place and is
        refused, instead of storing a copy nobody will read.
        """
        due = asyncio.get_running_loop().time() + self.delete_delay
        self._consumed.extend((due, name) for name in names)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), context=contextvars.Context()
            )

    async def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while self._consumed and not self._closing:
            wait = self._consumed[0][0] - loop.time()
            # Delete at most once per delay (or once per loop turn without
            # one), so many messages read together cost one request.
            await asyncio.sleep(max(wait, 0.0))
            batch = _due(self._consumed, loop.time())
            if not batch:
                continue
            try:
                await self._remove(batch)
            except Exception as exc:
                logger.warning("%r: deleting %d consumed messages: %s", self, len(batch), exc)
                await asyncio.sleep(max(self.delete_delay, self.retry.backoff.maximum))
                continue
            for _ in batch:  # removed from the queue only once deleted
                self._consumed.popleft()


def _due(queue: deque[tuple[float, str]], now: float) -> list[str]:
    """The names at the head of ``queue`` (ordered by time) whose time has come."""
    return [name for _, name in itertools.takewhile(lambda entry: entry[0] <= now, queue)]
