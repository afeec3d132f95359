"""Driving MPI requests from an event loop: two progress strategies.

MPI moves data only while somebody calls into it (``Test``, ``Improbe``, ...).
An asyncio program must do that without blocking its loop, and without
burning a core while nothing is in flight.  Both strategies here poll with
an adaptive backoff -- busy (yielding to other coroutines) for ``spin``
seconds after the last sign of activity, then sleeping twice as long each
round up to ``poll_max`` -- and differ in *where* they poll:

* :class:`LoopProgress` (``progress: "poll"``) polls from a task of the event
  loop: completions resolve futures directly, with no thread hand-off;
* :class:`ThreadProgress` (``progress: "thread"``) polls from a thread, which
  wakes the loop (``call_soon_threadsafe``) when a request completes or a
  message arrives; the loop itself never calls ``Test``.

Blocking waits (``MPI_Wait`` in a thread) are not offered: MPICH's blocking
calls spin, so a thread parked in one burns a core while idle.
``benchmarks/mpi.py`` measures both strategies (latency and idle CPU);
docs/hpc.md gives the numbers and why "poll" is the default.

What is polled is given by the owner as two callables: ``probe()`` (take in
what arrived; True when something did) and the requests registered with
:meth:`Progress.watch`, each with a callback run on the loop when it completes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LoopProgress", "Progress", "ThreadProgress", "make_progress"]

logger = logging.getLogger(__name__)

Done = Callable[[], None]

PENDING_SPIN = 1.0
"""Seconds of polling without sleep while requests are in flight and none completes."""

BURST = 200e-6
"""Longest run of tests in one poll while requests are pending, in seconds."""


class Progress:
    """Requests being driven to completion, and the poll of incoming messages.

    ``probe`` runs in the polling context (the loop's task or the thread) and
    must only hand what it took to the loop through :meth:`on_loop`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        probe: Callable[[], bool],
        *,
        spin: float,
        poll_max: float,
    ) -> None:
        self.loop = loop
        self.probe = probe
        self.spin = spin
        self.poll_max = poll_max
        self.polls = 0  # rounds of polling so far (for tests and benchmarks)
        self._requests: list[Any] = []  # MPI.Request, parallel to _callbacks
        self._callbacks: list[tuple[Done, Any]] = []
        self._closed = False
        self._begin()

    def _begin(self) -> None:
        """Start polling (each strategy its own way)."""
        raise NotImplementedError

    def watch(self, request: Any, done: Done, keep: Any = None) -> None:
        """Run ``done()`` on the loop once ``request`` completes; ``keep`` (its
        buffers) stays referenced until then, whatever the caller does."""
        raise NotImplementedError

    def on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (soon, in order)."""
        raise NotImplementedError

    def watch_all(self, requests: list[Any], done: Done, keep: Any = None) -> None:
        """Run ``done()`` on the loop once every one of ``requests`` completed (at least one)."""
        left = len(requests)

        def one() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                done()

        for request in requests:
            self.watch(request, one, keep)

    def kick(self) -> None:
        """Something was posted: poll busily again."""

    async def close(self) -> None:
        self._closed = True

    @property
    def pending(self) -> int:
        """Requests not yet completed."""
        return len(self._requests)

    def _test(self) -> list[tuple[Done, Any]]:
        """Test the requests until one completes or BURST seconds passed; the callbacks
        of the completed ones (removed).

        MPI moves a large message a piece per call into it (MPICH's shared-memory
        cells, its TCP socket buffers): a burst of tests per poll keeps the data
        moving at MPI's speed instead of one piece per trip through the loop.
        """
        if not self._requests:
            return []
        from mpi4py import MPI

        testsome = MPI.Request.Testsome
        until = time.perf_counter() + BURST
        while True:
            done = testsome(self._requests)
            if done or time.perf_counter() >= until:
                break
        if not done:
            return []
        finished = [self._callbacks[i] for i in done]
        gone = set(done)
        self._requests = [r for i, r in enumerate(self._requests) if i not in gone]
        self._callbacks = [c for i, c in enumerate(self._callbacks) if i not in gone]
        return finished

    def _backoff(self, idle_since: float, delay: float) -> float:
        """The next sleep: none while busy, then doubling up to ``poll_max``."""
        quiet = time.perf_counter() - idle_since
        # In flight, MPI moves data only while it is called: keep calling, for
        # up to PENDING_SPIN without a completion (a large message, a peer a
        # little late), before sleeping between polls as when idle.
        if quiet < self.spin or (self._requests and quiet < PENDING_SPIN):
            return 0.0
        return min(self.poll_max, max(delay * 2, 10e-6))


class LoopProgress(Progress):
    """Polls from a task of the event loop (``progress: "poll"``)."""

    def _begin(self) -> None:
        self._wake: asyncio.Future[None] | None = None
        self._task = self.loop.create_task(self._run(), name="fmi-mpi-progress")

    def watch(self, request: Any, done: Done, keep: Any = None) -> None:
        self._requests.append(request)
        self._callbacks.append((done, keep))
        self.kick()

    def on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)  # already on the loop

    def kick(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _run(self) -> None:
        idle_since = time.perf_counter()
        delay = 0.0
        while not self._closed:
            self.polls += 1
            busy = False
            try:
                busy = self.probe()
                finished = self._test()
                busy = busy or bool(finished)
                _run_all(finished)
                # No name may keep the buffers of the last completion alive: a
                # received buffer is reused only once nothing refers to it.
                del finished
            except Exception:  # MPI or a callback failed: keep polling the others
                logger.exception("MPI progress failed")
            if busy:
                idle_since, delay = time.perf_counter(), 0.0
            else:
                delay = self._backoff(idle_since, delay)
            if delay == 0.0:
                if not busy:
                    # Nothing moved: let the other processes of the node run
                    # (ranks often outnumber cores), then the loop's other tasks.
                    os.sched_yield()
                await asyncio.sleep(0)
                continue
            self._wake = self.loop.create_future()
            handle = self.loop.call_later(delay, self.kick)
            try:
                await self._wake
            finally:
                handle.cancel()
                self._wake = None
            if self._requests:  # woken by a new request
                idle_since, delay = time.perf_counter(), 0.0

    async def close(self) -> None:
        await super().close()
        self.kick()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


class ThreadProgress(Progress):
    """Polls from a daemon thread that wakes the loop (``progress: "thread"``)."""

    def _begin(self) -> None:
        self._incoming: collections.deque[tuple[Any, Done, Any]] = collections.deque()
        self._event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmi-mpi-progress", daemon=True)
        self._thread.start()

    def watch(self, request: Any, done: Done, keep: Any = None) -> None:
        self._incoming.append((request, done, keep))
        self.kick()

    def on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def kick(self) -> None:
        self._event.set()

    def _run(self) -> None:
        idle_since = time.perf_counter()
        delay = 0.0
        while not self._closed:
            self.polls += 1
            while self._incoming:
                request, done, keep = self._incoming.popleft()
                self._requests.append(request)
                self._callbacks.append((done, keep))
            busy = False
            try:
                busy = self.probe()
                finished = self._test()
            except Exception:
                logger.exception("MPI progress failed")
                finished = []
            if finished:
                busy = True
                self.loop.call_soon_threadsafe(_run_all, finished)
                finished = []  # hold no buffers of completed requests here
            if busy:
                idle_since, delay = time.perf_counter(), 0.0
                continue
            delay = self._backoff(idle_since, delay)
            if delay:
                if self._event.wait(delay):
                    self._event.clear()
                    idle_since, delay = time.perf_counter(), 0.0
            else:
                os.sched_yield()  # other ranks of the node, and the loop thread's GIL

    async def close(self) -> None:
        await super().close()
        self.kick()
        await asyncio.to_thread(self._thread.join, 5.0)


def _run_all(finished: list[tuple[Done, Any]]) -> None:
    for item in finished:
        try:
            item[0]()
        except Exception:
            logger.exception("MPI completion callback failed")


def make_progress(
    strategy: str,
    loop: asyncio.AbstractEventLoop,
    probe: Callable[[], bool],
    *,
    spin: float,
    poll_max: float,
) -> Progress:
    """The progress engine named ``strategy`` ("poll" or "thread")."""
    cls = ThreadProgress if strategy == "thread" else LoopProgress
    return cls(loop, probe, spin=spin, poll_max=poll_max)
