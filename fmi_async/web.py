"""Communicators in web services: one per worker process, opened and closed with the app.

A web service served by several worker processes can make its workers one
group of peers: every worker opens a :class:`~fmi_async.Communicator` when the
application starts and closes it when the application stops.  A handler
cannot simply call ``await comm.allreduce(x)``, though: a collective must be
called by *every* worker, in the *same order*, while an HTTP request reaches
one worker at a time, and requests on different workers run concurrently.
:class:`CollectiveService` turns a request on one worker into a collective of
all of them:

* every worker runs one collective loop, the only task that calls collectives;
* a handler calls ``await service.call("name", args)``; on worker 0 the call
  joins a queue, on any other worker it is sent to worker 0 (point to point);
* worker 0 takes the queued calls as one batch and broadcasts it; every
  worker runs the batch's operations in that order, each its own part of the
  same collectives, and the worker a call came from resolves its handler's
  future with its result;
* worker 0 broadcasts an empty batch after ``heartbeat`` seconds of quiet, so
  a worker that died is noticed while the service is idle.

Any failure of the loop (a dead peer, a deadline, an operation that raised)
breaks the service for good: every waiting and later call raises an
:class:`~fmi_async.errors.FMIError` saying why, which a handler answers with
HTTP 503.  Stopping is sequenced too: a worker that stops asks worker 0,
which broadcasts a stop that every worker's loop ends on.  docs/web-services.md
explains the pattern and shows an aiohttp application built on it.

``serve(operations)`` is the whole life cycle as one async context manager
(any framework's lifespan); ``aiohttp_cleanup_ctx(key, operations)`` adapts it
to aiohttp's ``app.cleanup_ctx``.  Nothing here imports a web framework.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from .communicator import Communicator
from .config import check_timeout
from .errors import (
    ArgumentError,
    BrokenCommunicatorError,
    ClosedError,
    CommTimeout,
    ConfigError,
    FMIError,
)
from .runner import communicator_from_env

__all__ = [
    "REQUEST_TAG",
    "CollectiveService",
    "Operation",
    "aiohttp_cleanup_ctx",
    "communicator",
    "serve",
]

logger = logging.getLogger(__name__)

Operation = Callable[[Communicator, Any], Awaitable[Any]]
"""``async def op(comm, args) -> result``: run by every worker, in the same order."""

REQUEST_TAG = "fmi.web.request"
"""The point-to-point tag calls travel to worker 0 with (give another one to
``CollectiveService(tag=...)`` if the application uses this one itself)."""

_SEQUENCER = 0  # the worker that orders the calls
_MAX_BATCH = 256  # calls per broadcast batch; the rest wait for the next one
_RECEIVE_WINDOW = 30.0  # worker 0 re-posts an idle receive this often (a bounded wait)


@asynccontextmanager
async def communicator(comm: Communicator | None = None) -> AsyncIterator[Communicator]:
    """Open ``comm``, or the communicator the environment describes, and close it on exit.

    The environment is the one ``fmi run`` and ``examples/web_service/serve.py``
    give each worker (``FMI_PEER_ID``, ``FMI_NUM_PEERS``, ``FMI_CONFIG``, ...;
    see :func:`fmi_async.runner.communicator_from_env`).  Raises
    :class:`~fmi_async.errors.ConfigError` when ``comm`` is None and the
    environment describes none.
    """
    async with _given_or_from_env(comm) as opened:
        yield opened


def _given_or_from_env(comm: Communicator | None) -> Communicator:
    if comm is not None:
        return comm
    found = communicator_from_env()
    if found is None:
        raise ConfigError(
            "no communicator: pass one, or start the workers with FMI_PEER_ID, "
            "FMI_NUM_PEERS and FMI_CONFIG set (as fmi run and "
            "examples/web_service/serve.py do)"
        )
    return found


class CollectiveService:
    """Runs operations that call collectives, in one order on every worker.

    ``operations`` maps a name to ``async def op(comm, args) -> result`` and
    must be the same table on every worker.  An operation may call any
    collectives (and local code between them); it runs once on every worker
    for every :meth:`call` made on any worker, and must not fail on one
    worker alone: check a request's arguments in the handler, before
    :meth:`call`.

    Use it as an async context manager over an open communicator, or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        comm: Communicator,
        operations: Mapping[str, Operation],
        *,
        heartbeat: float = 1.0,
        tag: int | str = REQUEST_TAG,
    ) -> None:
        if not operations:
            raise ArgumentError("CollectiveService needs at least one operation")
        self.comm = comm
        self.operations = dict(operations)
        self.heartbeat = check_timeout(heartbeat, "heartbeat")
        self.tag = tag
        self._calls = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._queue: deque[list[Any]] = deque()  # worker 0: calls not yet broadcast
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._receivers: list[asyncio.Task[None]] = []
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
        if self._loop_task is None:
            return "new"
        if not self._loop_task.done():
            return "running"
        return "stopped" if isinstance(self._failure, ClosedError) else "broken"

    @property
    def failure(self) -> FMIError | None:
        """The error calls raise since the loop ended (``None`` while it runs)."""
        return self._failure

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Start this worker's collective loop (the communicator must be open)."""
        if self._loop_task is not None:
            raise ArgumentError(f"{self!r} was started already")
        self.comm._usable()
        rank = self.comm.rank
        self._loop_task = asyncio.create_task(self._run_loop(), name=f"fmi-web-loop-{rank}")
        if rank == _SEQUENCER:
            self._receivers = [
                asyncio.create_task(self._receive(src), name=f"fmi-web-recv-{src}")
                for src in range(self.comm.size)
                if src != _SEQUENCER
            ]

    async def close(self, timeout: float | None = None) -> None:
        """Stop with the other workers: the loop ends on a stop worker 0 broadcasts.

        Waits up to ``timeout`` (default: the communicator's) for that stop,
        then cancels the loop.  Calls still waiting raise
        :class:`~fmi_async.errors.ClosedError`.  Never raises an FMIError.
        """
        task = self._loop_task
        if task is None:
            self._fail(ClosedError(f"{self!r} was never started"))
            return
        t = self.comm.timeout if timeout is None else check_timeout(timeout)
        if not task.done():
            try:
                if self.comm.rank == _SEQUENCER:
                    self._submit(["stop", _SEQUENCER])
                else:
                    await self.comm.send(["stop", self.comm.rank], _SEQUENCER, self.tag, timeout=t)
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
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for receiver in self._receivers:
            receiver.cancel()
        await asyncio.gather(*self._receivers, return_exceptions=True)
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
        self._check_running()
        seq = next(self._calls)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        item = ["call", self.comm.rank, seq, name, args]
        try:
            async with asyncio.timeout(t):
                if self.comm.rank == _SEQUENCER:
                    self._submit(item)
                else:
                    await self.comm.send(item, _SEQUENCER, self.tag)
                return await future
        except TimeoutError:
            raise CommTimeout(
                f"worker {self.comm.rank}: operation {name!r} got no result within {t}s ({self!r})"
            ) from None
        finally:
            self._pending.pop(seq, None)

    def _check_running(self) -> None:
        if self._failure is not None:
            raise self._fresh_failure()
        if self._loop_task is None:
            raise ClosedError(f"{self!r} is not started; use `async with` or await start()")

    def _fresh_failure(self) -> FMIError:
        """The failure as a new exception: one instance raised by every request
        would grow its traceback with each."""
        assert self._failure is not None
        return type(self._failure)(str(self._failure))

    def _submit(self, item: list[Any]) -> None:
        """Worker 0: queue a call or a stop for the next batch."""
        self._queue.append(item)
        self._wake.set()

    async def _receive(self, src: int) -> None:
        """Worker 0: take the calls worker ``src`` sends into the queue, until the loop ends."""
        while self._failure is None:
            try:
                item = await self.comm.recv(src, self.tag, timeout=_RECEIVE_WINDOW)
            except CommTimeout:
                continue  # idle; the wait is re-posted (no message is lost by a timeout)
            except FMIError as exc:
                # A dead or closed peer: the loop finds out too, at its next
                # batch or heartbeat, and every worker learns it from there.
                logger.info("worker %d: no more calls from worker %d: %s", _SEQUENCER, src, exc)
                self._wake.set()
                return
            self._submit(list(item))

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
                break  # nothing runs after a stop; calls left queued fail at close
        return batch

    async def _run_loop(self) -> None:
        comm = self.comm
        root = comm.rank == _SEQUENCER
        # A non-root waits for the next batch at most a heartbeat plus the
        # communicator's deadline: worker 0 sends one at least every heartbeat.
        wait = self.heartbeat + comm.timeout
        try:
            while True:
                if root:
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
            logger.error("worker %d: the collective service broke: %r", comm.rank, exc)
            self._fail(
                BrokenCommunicatorError(
                    f"worker {comm.rank}: the collective service of {comm.size} workers is "
                    f"broken ({type(exc).__name__}: {exc})"
                )
            )

    async def _run_batch(self, batch: list[list[Any]]) -> bool:
        """Run the batch's operations in order; True when it ends with a stop."""
        comm = self.comm
        for item in batch:
            if item[0] == "stop":
                self._fail(
                    ClosedError(
                        f"worker {comm.rank}: the workers are shutting down "
                        f"(worker {item[1]} stopped)"
                    )
                )
                return True
            _, origin, seq, name, args = item
            result = await self.operations[name](comm, args)
            self.calls_run += 1
            if origin == comm.rank:
                future = self._pending.get(seq)
                if future is not None and not future.done():
                    future.set_result(result)
        return False

    def _fail(self, exc: FMIError) -> None:
        """From now on calls raise ``exc``; those waiting raise it at once."""
        if self._failure is None:
            self._failure = exc
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._fresh_failure())
        self._queue.clear()
        self._wake.set()


@asynccontextmanager
async def serve(
    operations: Mapping[str, Operation],
    comm: Communicator | None = None,
    *,
    heartbeat: float = 1.0,
    tag: int | str = REQUEST_TAG,
) -> AsyncIterator[CollectiveService]:
    """Open the communicator (see :func:`communicator`) and run a :class:`CollectiveService`.

    One line in any framework's lifespan: ``async with fmi.web.serve(OPS) as
    service: ...``.  On exit the service stops with the other workers, then
    the communicator closes (without the final barrier when the service
    broke: its peers are not all there to meet).
    """
    comm = _given_or_from_env(comm)
    await comm.open()
    service: CollectiveService | None = None
    clean = False
    try:
        service = CollectiveService(comm, operations, heartbeat=heartbeat, tag=tag)
        await service.start()
        try:
            yield service
            clean = True
        finally:
            await service.close()
    finally:
        healthy = service is not None and service.state == "stopped"
        await comm.close(synchronize=clean and healthy)


def aiohttp_cleanup_ctx(
    key: Any,
    operations: Mapping[str, Operation],
    comm: Communicator | None = None,
    **options: Any,
) -> Callable[[MutableMapping[Any, Any]], AsyncIterator[None]]:
    """:func:`serve` as an aiohttp ``cleanup_ctx``: the service is ``app[key]`` while it runs.

    ``app.cleanup_ctx.append(aiohttp_cleanup_ctx(SERVICE, OPERATIONS))``, with
    ``SERVICE = web.AppKey("service", CollectiveService)``.  ``options`` go
    to :func:`serve` (``heartbeat=``, ``tag=``).
    """

    async def context(app: MutableMapping[Any, Any]) -> AsyncIterator[None]:
        async with serve(operations, comm, **options) as service:
            app[key] = service
            yield

    return context
