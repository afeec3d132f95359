"""The collective service: request-driven collectives, run in one order on every worker.

A collective must be called by *every* worker, in the *same order*, while an
HTTP request reaches one worker at a time, and requests on different
workers run concurrently.  :class:`CollectiveService` turns a call on one
worker into the same operation on all of them:

* every worker runs one collective loop, the only task that calls collectives;
* a call on worker 0 joins a queue; a call on any other worker is sent to
  worker 0 (point to point, tag ``TAG.calls``);
* worker 0 takes the queued calls as one batch and broadcasts it; every
  worker runs the batch's operations in that order, each its own part of the
  same collectives, and the worker a call came from resolves its caller's
  future with its result;
* worker 0 broadcasts an empty batch after ``heartbeat`` seconds of quiet, so
  a worker that died is noticed while the service is idle.

A failure anywhere (a dead peer, a deadline, an operation that raised) breaks
the service on every worker: the worker that sees it tells worker 0, worker 0
tells the others (tag ``TAG.notices``), and a worker that loses worker 0
finds out from its connection.  From then on every waiting and later call
raises :class:`~fmi_async.errors.BrokenCommunicatorError` with the cause.
Stopping is sequenced too: a worker that stops asks worker 0, which
broadcasts a stop that every worker's loop ends on.  docs/web-services.md
explains why and how.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..communicator import Communicator
from ..config import check_timeout
from ..errors import ArgumentError, BrokenCommunicatorError, ClosedError, CommTimeout, FMIError

__all__ = ["DEFAULT_TAG", "CollectiveService", "Operation"]

logger = logging.getLogger(__name__)

Operation = Callable[[Communicator, Any], Awaitable[Any]]
"""``async def op(comm, args) -> result``: run by every worker, in the same order."""

DEFAULT_TAG = "fmi.web"
"""The prefix of the service's point-to-point tags (``fmi.web.calls``,
``fmi.web.notices``); give ``CollectiveService(tag=...)`` another one if the
application's own messages use these."""

_SEQUENCER = 0  # the worker that orders the calls
_MAX_BATCH = 256  # calls per broadcast batch; the rest wait for the next one
_RECEIVE_WINDOW = 30.0  # an idle receive is re-posted this often (every wait is bounded)
_NOTIFY_TIMEOUT = 2.0  # telling the others of a breakdown: best effort, this long at most


class CollectiveService:
    """Runs operations that call collectives, in one order on every worker.

    ``operations`` maps a name to ``async def op(comm, args) -> result`` and
    must be the same table on every worker.  An operation may call any
    collectives (and local code between them); it runs once on every worker
    for every :meth:`call` made on any worker, and must not fail on one
    worker alone: check a request's arguments in the handler, before
    :meth:`call`.

    ``tag`` prefixes the two point-to-point tags the service uses
    (``TAG.calls`` towards worker 0, ``TAG.notices`` from it); the
    application's own messages must not use them.

    Use it as an async context manager over an open communicator, or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        comm: Communicator,
        operations: Mapping[str, Operation],
        *,
        heartbeat: float = 1.0,
        tag: str = DEFAULT_TAG,
    ) -> None:
        if not operations:
            raise ArgumentError("CollectiveService needs at least one operation")
        if not isinstance(tag, str) or not tag:
            raise ArgumentError(f"tag must be a non-empty str, got {tag!r}")
        self.comm = comm
        self.operations = dict(operations)
        self.heartbeat = check_timeout(heartbeat, "heartbeat")
        self._calls_tag = f"{tag}.calls"  # to worker 0: calls, stops, breakdowns
        self._notices_tag = f"{tag}.notices"  # from worker 0: breakdowns
        self._numbers = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._queue: deque[list[Any]] = deque()  # worker 0: calls not yet broadcast
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._receivers: list[asyncio.Task[None]] = []
        self._notifying: set[asyncio.Task[None]] = set()
        self._stopping = False  # a stop was asked for or broadcast: peers may close now
        self._failure: FMIError | None = None  # why calls fail from now on
        self.batches = 0  # batches run, empty ones included
        self.calls_run = 0  # operations run on this worker

    def __repr__(self) -> str:
        return (
            f"<CollectiveService worker={self.comm.rank}/{self.comm.size} "
            f"state={self.state} batches={self.batches} calls={self.calls_run}>"
        )

    @property
    def state(self) -> str:
        """``new``, ``running``, ``stopped`` or ``broken``."""
        if self._failure is None:
            return "new" if self._loop_task is None else "running"
        return "stopped" if isinstance(self._failure, ClosedError) else "broken"

    @property
    def failure(self) -> FMIError | None:
        """The error calls raise since the service stopped or broke (``None`` while it runs)."""
        return self._failure

    @property
    def _root(self) -> bool:
        return self.comm.rank == _SEQUENCER

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Start this worker's collective loop (the communicator must be open)."""
        if self._loop_task is not None:
            raise ArgumentError(f"{self!r} was started already")
        self.comm._usable()
        rank = self.comm.rank
        self._loop_task = asyncio.create_task(self._run_loop(), name=f"fmi-web-loop-{rank}")
        if self._root:
            self._receivers = [
                asyncio.create_task(self._receive_calls(src), name=f"fmi-web-calls-{src}")
                for src in range(self.comm.size)
                if src != _SEQUENCER
            ]
        else:
            self._receivers = [
                asyncio.create_task(self._receive_notices(), name=f"fmi-web-notices-{rank}")
            ]

    async def close(self, timeout: float | None = None) -> None:
        """Stop with the other workers: the loop ends on a stop worker 0 broadcasts.

        Waits up to ``timeout`` (default: the communicator's) for that stop,
        then cancels the loop.  Calls still waiting raise
        :class:`~fmi_async.errors.ClosedError`.  Never raises an FMIError.
        """
        task = self._loop_task
        t = self.comm.timeout if timeout is None else check_timeout(timeout)
        self._stopping = True
        if task is not None and not task.done() and self._failure is None:
            try:
                if self._root:
                    self._submit(["stop", _SEQUENCER])
                else:
                    stop = ["stop", self.comm.rank]
                    await self.comm.send(stop, _SEQUENCER, self._calls_tag, timeout=t)
            except FMIError as exc:
                logger.warning("worker %d: cannot ask for the stop: %s", self.comm.rank, exc)
            done, _ = await asyncio.wait({task}, timeout=t)
            if not done:
                logger.warning(
                    "worker %d: no stop from worker %d within %.3gs; leaving alone",
                    self.comm.rank,
                    _SEQUENCER,
                    t,
                )
        for other in [task, *self._receivers]:
            if other is not None:
                other.cancel()
        await asyncio.gather(*self._receivers, *self._notifying, return_exceptions=True)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        self._fail(ClosedError(f"worker {self.comm.rank}: the collective service has stopped"))

    async def __aenter__(self) -> CollectiveService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- calls

    async def call(self, name: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Run operation ``name`` with ``args`` on every worker; this worker's result.

        ``args`` must be a value the communicator can send.  Raises
        :class:`~fmi_async.errors.ArgumentError` for an unknown operation,
        :class:`~fmi_async.errors.CommTimeout` when no result came within
        ``timeout`` (default: the communicator's), and the service's
        failure (:class:`~fmi_async.errors.BrokenCommunicatorError`, or
        :class:`~fmi_async.errors.ClosedError` once stopped) when it cannot
        run.  A call whose caller gives up still runs on every worker (the
        others may be running it already); only its result is dropped.
        """
        if name not in self.operations:
            raise ArgumentError(
                f"unknown operation {name!r}; this service runs {sorted(self.operations)}"
            )
        t = self.comm.timeout if timeout is None else check_timeout(timeout)
        if self._failure is not None:
            raise self._fresh_failure()
        if self._loop_task is None:
            raise ClosedError(f"{self!r} is not started; use `async with` or await start()")
        number = next(self._numbers)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        item = ["call", self.comm.rank, number, name, args]
        try:
            async with asyncio.timeout(t):
                if self._root:
                    self._submit(item)
                else:
                    await self._send_call(item)  # a failure to send fails the future
                return await future
        except TimeoutError:
            raise CommTimeout(
                f"worker {self.comm.rank}: operation {name!r} got no result within {t}s ({self!r})"
            ) from None
        finally:
            self._pending.pop(number, None)

    async def _send_call(self, item: list[Any]) -> None:
        """Not worker 0: send a call to worker 0; not reaching it breaks the service
        (which fails every waiting call, this one too)."""
        try:
            await self.comm.send(item, _SEQUENCER, self._calls_tag)
        except FMIError as exc:
            self._break(f"cannot reach worker {_SEQUENCER} ({type(exc).__name__}: {exc})")

    def _submit(self, item: list[Any]) -> None:
        """Worker 0: queue a call or a stop for the next batch."""
        self._queue.append(item)
        self._wake.set()

    # ---------------------------------------------------------------- the loop

    async def _next_batch(self) -> list[list[Any]]:
        """Worker 0: the calls queued now, or none after ``heartbeat`` seconds of quiet."""
        if not self._queue:
            self._wake.clear()
            try:
                async with asyncio.timeout(self.heartbeat):
                    await self._wake.wait()
            except TimeoutError:
                pass
        batch: list[list[Any]] = []
        while self._queue and len(batch) < _MAX_BATCH:
            item = self._queue.popleft()
            batch.append(item)
            if item[0] == "stop":
                # Nothing runs after a stop (calls left queued fail), and from
                # its broadcast on, a worker that closes is no breakdown.
                self._stopping = True
                break
        return batch

    async def _run_loop(self) -> None:
        comm = self.comm
        # A non-root waits for the next batch at most a heartbeat plus the
        # communicator's deadline: worker 0 sends one at least every heartbeat.
        wait = self.heartbeat + comm.timeout
        try:
            while True:
                if self._root:
                    batch = await self._next_batch()
                    await comm.bcast(batch, _SEQUENCER)
                else:
                    batch = await comm.bcast(None, _SEQUENCER, timeout=wait)
                self.batches += 1
                if await self._run_batch(batch):
                    logger.debug("%r: stopped by worker 0", self)
                    return
        except asyncio.CancelledError:
            self._fail(ClosedError(f"worker {comm.rank}: the collective service was cancelled"))
            raise
        except Exception as exc:
            self._break(f"{type(exc).__name__}: {exc}")

    async def _run_batch(self, batch: list[list[Any]]) -> bool:
        """Run the batch's operations in order; True when it ends with a stop."""
        comm = self.comm
        for item in batch:
            if item[0] == "stop":
                self._stopping = True
                self._fail(
                    ClosedError(
                        f"worker {comm.rank}: the workers are shutting down "
                        f"(worker {item[1]} stopped)"
                    )
                )
                return True
            _, origin, number, name, args = item
            result = await self.operations[name](comm, args)
            self.calls_run += 1
            if origin == comm.rank:
                future = self._pending.get(number)
                if future is not None and not future.done():
                    future.set_result(result)
        return False

    # ---------------------------------------------------------------- breakdowns

    async def _receive_calls(self, src: int) -> None:
        """Worker 0: what worker ``src`` sends, until the service ends."""
        while self._failure is None:
            try:
                item = await self.comm.recv(src, self._calls_tag, timeout=_RECEIVE_WINDOW)
            except CommTimeout:
                continue  # idle; the wait is re-posted (a timeout loses no message)
            except FMIError as exc:
                if not self._stopping:
                    self._break(f"worker {src} is gone ({type(exc).__name__}: {exc})")
                return
            if item[0] == "broken":
                self._break(str(item[2]), origin=int(item[1]))
                return
            self._submit(list(item))

    async def _receive_notices(self) -> None:
        """Not worker 0: wait for worker 0 to say the service broke, or to be gone."""
        while self._failure is None:
            try:
                item = await self.comm.recv(_SEQUENCER, self._notices_tag, timeout=_RECEIVE_WINDOW)
            except CommTimeout:
                continue
            except FMIError as exc:
                # Worker 0 is gone -- or closed after broadcasting a stop that is
                # still on its way here (through another worker): give that a
                # heartbeat to arrive before calling it a breakdown.
                if self._loop_task is not None:
                    await asyncio.wait({self._loop_task}, timeout=self.heartbeat)
                self._break(f"worker {_SEQUENCER} is gone ({type(exc).__name__}: {exc})")
                return
            self._break(str(item[2]), origin=int(item[1]))
            return

    def _break(self, reason: str, *, origin: int | None = None) -> None:
        """The service cannot go on: fail every call now and later, end the loop,
        and see that every other worker learns it (through worker 0)."""
        if self._failure is not None:
            return
        comm = self.comm
        logger.error("worker %d: the collective service broke: %s", comm.rank, reason)
        self._fail(
            BrokenCommunicatorError(
                f"worker {comm.rank}: the collective service of {comm.size} workers is "
                f"broken: {reason}"
            )
        )
        task = self._loop_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # it may wait in a collective for a peer that is gone
        if origin is None:
            reason = f"on worker {comm.rank}, {reason}"
        if self._root:
            others = [p for p in range(comm.size) if p not in (_SEQUENCER, origin)]
            message = ["broken", comm.rank, reason]
            sends = [(message, dst, self._notices_tag) for dst in others]
        elif origin is None:
            sends = [(["broken", comm.rank, reason], _SEQUENCER, self._calls_tag)]
        else:
            sends = []  # worker 0 told us: it told the others too
        if sends:
            task = asyncio.get_running_loop().create_task(self._notify(sends))
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)

    async def _notify(self, sends: list[tuple[list[Any], int, str]]) -> None:
        """Best effort, bounded: tell other workers that the service broke."""
        timeout = min(self.comm.timeout, _NOTIFY_TIMEOUT)
        results = await asyncio.gather(
            *(self.comm.send(msg, dst, tag, timeout=timeout) for msg, dst, tag in sends),
            return_exceptions=True,
        )
        for (_, dst, _), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                logger.info("worker %d: worker %d not told: %r", self.comm.rank, dst, result)

    def _fail(self, exc: FMIError) -> None:
        """From now on calls raise ``exc``; those waiting raise it at once."""
        if self._failure is None:
            self._failure = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._fresh_failure())
        self._queue.clear()
        self._wake.set()

    def _fresh_failure(self) -> FMIError:
        """The failure as a new exception: one instance raised by every request
        would grow its traceback with each."""
        assert self._failure is not None
        return type(self._failure)(str(self._failure))
