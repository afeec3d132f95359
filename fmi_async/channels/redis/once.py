"""Redis commands made harmless to repeat: numbered pushes and recoverable pops.

A reply lost with its connection leaves the client not knowing whether the
command ran, so the Redis channel sends every command that may be retried
in a form that may run twice (see :mod:`fmi_async.channels.redis.channel`):

* a push is keyed by a message number and the sender's *mark* of its stream
  (:meth:`RedisOnce._push_once`, with ``PUSH_SCRIPT`` or MULTI/EXEC);
* a pop is a move into an in-flight list unique to the receive
  (:meth:`RedisOnce._take`), and a receive that fails or is cancelled after
  the move puts the element back at the head of its stream
  (:meth:`RedisOnce._put_back`) before the next receive of that stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging

import redis.exceptions as rexc

from ...errors import BackendError, BackendUnavailable
from ..base import ChannelContext
from .connection import RedisConnection
from .layout import SCRIPT_MAX

__all__ = ["RedisOnce"]

logger = logging.getLogger(__name__)


class RedisOnce(RedisConnection):
    """Pushes delivered once and pops never lost, however often they are retried."""

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)

        self._putting_back: dict[str, asyncio.Task[None]] = {}  # stream -> its put-back

    def _mark_name(self, stream: str) -> str:
        """The sender's dedupe mark of ``stream``: the highest message number it pushed."""
        tail = stream[len(self.prefix) + len("/msg/") :]
        return f"{self.prefix}/mark/{self.peer_id}.{self._token}/{tail}"

    def _leftovers(self) -> set[str]:
        return {self._mark_name(stream) for stream in self._sent}

    async def _push_once(self, list_name: str, element: bytes, limit: float) -> None:
        """Append ``element`` to ``list_name`` exactly once, however often it is retried."""
        mark = self._mark_name(list_name)
        number = next(self._counter)
        retried = False

        async def scripted() -> None:
            assert self._push is not None
            push = self._push
            await push(keys=[list_name, mark], args=[element, self.ttl, number])

        async def transaction() -> None:
            nonlocal retried
            if retried:
                # A MULTI of an earlier attempt may have run: its mark says so.
                last = await self._redis.get(mark)
                if last is not None and int(last) >= number:
                    return
            retried = True
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(list_name, element)
                pipe.expire(list_name, self.ttl)
                pipe.set(mark, number, ex=self.ttl)
                await pipe.execute()

        if self._push is not None and len(element) <= SCRIPT_MAX:
            # A small message: one EVALSHA.  A redis-py pipeline costs an
            # extra task per call, about a fifth of a small message's time on
            # loopback (benchmarks/mediated.py); above SCRIPT_MAX, Lua's copy
            # of the argument costs more than that.
            try:
                await self._call("rpush", scripted)
                return
            except BackendError as exc:
                if not isinstance(exc.__cause__, rexc.ResponseError):
                    raise
                # An error reply means the script wrote nothing (RPUSH, its
                # first write, failed or never ran), so the transaction
                # below writes the message once.
                refused: BackendError | None = exc
        else:
            refused = None
        await self._call("multi", transaction, limit)
        if refused is not None:
            # The transaction worked where the script did not: scripting is
            # refused here (an ACL, a proxy without EVAL); stop trying it.
            logger.debug("%r: Lua script refused (%s); using MULTI/EXEC instead", self, refused)
            self._push = None

    async def _take(
        self, stream: str, deadline: float, failures: list[BackendUnavailable]
    ) -> tuple[bytes, str] | None:
        """Move the head of ``stream`` into a fresh in-flight key; ``(element, key)``.

        None when nothing came before ``deadline`` (also when the server
        kept failing until then: noted in ``failures``).  A lost reply is
        recovered from the in-flight key; a failure or cancellation after a
        move may have run puts the element back (see the module docstring).
        """
        taken = f"{self.prefix}/taken/{self.peer_id}.{self._token}/{next(self._counter)}"
        maybe_moved = False

        async def attempt() -> bytes | None:
            nonlocal maybe_moved
            if maybe_moved:
                # The last attempt's reply was lost: did its move run?
                found = await self._run(
                    "lindex", functools.partial(self._command, "LINDEX", taken, 0)
                )
                if found is not None:
                    return bytes(found)
            maybe_moved = True
            element = await self._blocking_move(stream, taken, ("LEFT", "RIGHT"), deadline, True)
            maybe_moved = element is not None
            return element

        try:
            element = await self.retrying("blmove", attempt)
        except BaseException as exc:
            if maybe_moved:
                self._put_back(taken, stream)
            if isinstance(exc, BackendUnavailable):
                failures.append(exc)
                return None  # not there in time
            raise
        return None if element is None else (element, taken)

    def _put_back(self, taken: str, stream: str) -> None:
        """Return what ``taken`` holds to the head of ``stream``, in the background.

        The next receive of ``stream`` waits for it, so order is kept.
        """

        async def attempt() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lmove(taken, stream, "RIGHT", "LEFT")
                pipe.expire(stream, self.ttl)
                pipe.unlink(taken)
                await pipe.execute()

        async def put_back() -> None:
            with self._within(self._write_deadline()):
                await self._call("lmove", attempt)

        task = asyncio.get_running_loop().create_task(put_back(), context=contextvars.Context())
        self._putting_back[stream] = task
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if self._putting_back.get(stream) is task:
                del self._putting_back[stream]
            if not task.cancelled() and task.exception() is not None:
                logger.warning(
                    "%r: could not return a message to %s (it stays in %s until its TTL): %s",
                    self,
                    stream,
                    taken,
                    task.exception(),
                )

        task.add_done_callback(done)

    async def _settled(self, stream: str, deadline: float) -> None:
        """Wait for a put-back into ``stream`` still running (a cancelled receive's)."""
        task = self._putting_back.get(stream)
        if task is not None:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(task)
