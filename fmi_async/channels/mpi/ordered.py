"""Collective steps on an MPI communicator, posted in sequence order on every rank.

MPI matches the collectives of a communicator by the order in which each
rank posts them: one rank posting ``Ibcast`` where another posts
``Iallreduce``, or one rank skipping a collective the others post, is an
error MPI does not report -- it hangs, or pairs the wrong buffers.  The
library's collectives can fail on one peer only (a wrong root, a value that
cannot be serialized, a timeout), so this module keeps the ranks in step:

* every collective of the communicator (numbered ``seq``) is one *step*,
  queued in ``seq`` order; a step's MPI operations are posted only after the
  previous step's, so concurrent collectives are posted in the same order on
  every rank;
* with ``check`` on (the default), a step starts with a small ``Iallreduce``
  (MAX of three int64) of a hash of the peer's plan identifier -- which
  names the collective, root, operator, dtype and shape -- and, for a peer
  that failed before it could run the collective, of its rank.  Every peer
  posts it, whether its own call was good or not, and every peer learns the
  same verdict: run it, a plan differs
  (:class:`~fmi_async.errors.PlanMismatchError` on every peer), or peer ``r``
  gave up (:class:`~fmi_async.errors.AbortedError` naming it).  Only then is
  the collective itself posted, by all or by none;
* a native collective (:mod:`fmi_async.collectives.native`) is a generator
  that yields lists of MPI requests and returns the result; it is driven here
  to its end even when its caller stopped waiting (a timeout, a
  cancellation): MPI cannot withdraw a posted collective, and the ranks that
  did not give up must find it posted.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import AbortedError, BrokenChannelError, PlanMismatchError

if TYPE_CHECKING:
    from .channel import MPIChannel

__all__ = ["Native", "Ordered", "Step"]

logger = logging.getLogger(__name__)

Native = Generator[list[Any], None, Any]
"""A native collective: yields lists of MPI requests to wait for, returns the result."""

CAUSE_WAIT = 1.0
"""Seconds a peer told of an abort by the check waits for the announcement saying why."""
CAUSE_POLL = 2e-3

POST_SPIN = 30e-6
"""Seconds of busy testing right after posting, before handing requests to progress."""

_VOTES = 256  # check vectors kept, by plan

_NONE = np.iinfo(np.int64).min + 1  # neutral for MAX, and its negation fits
_NOBODY = -(1 << 40)  # "no peer gave up", below every -rank


@dataclass(eq=False)
class Step:
    """One collective of the communicator, as this channel runs it."""

    seq: int
    plan: str
    native: bool  # a native collective will be attached (the plan's family is "mpi")
    failed: bool = False  # this peer gave up before running it
    gen: Native | None = None
    future: asyncio.Future[Any] = field(default_factory=lambda: _future())
    started: bool = False


def _future() -> asyncio.Future[Any]:
    future = asyncio.get_running_loop().create_future()
    # Its caller may have stopped waiting (timeout, cancellation): the outcome
    # is then nobody's, and must not be reported as never retrieved.
    future.add_done_callback(_consume)
    return future


def plan_hash(plan: str) -> int:
    """63 bits of a plan identifier, alike on every peer."""
    digest = hashlib.blake2b(plan.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Ordered:
    """The queue of collective steps of one MPI channel (see the module docstring)."""

    def __init__(self, channel: MPIChannel) -> None:
        self.channel = channel
        self.check = channel.options.check
        self._queue: collections.deque[Step] = collections.deque()
        self._steps: dict[int, Step] = {}
        self._running: Step | None = None
        self._votes: dict[str, np.ndarray] = {}
        self._last = 0  # the highest seq queued (seqs are queued in increasing order)
        self._closed = False

    def __repr__(self) -> str:
        return f"<Ordered queued={len(self._queue)} running={self._running is not None}>"

    # ------------------------------------------------------------ the communicator's side

    def gate(self, seq: int, plan: str, *, native: bool) -> asyncio.Future[Any] | None:
        """Queue collective ``seq``; the future of its check (None: nothing to wait for).

        For a native step the returned future is the collective's result.
        """
        if not self.check and not native:
            return None
        step = Step(seq, plan, native)
        self._enqueue(step)
        return step.future

    def skip(self, seq: int, rank: int) -> None:
        """This peer gave up collective ``seq`` before running it: post its part of the
        check all the same, saying so, so that the other peers learn it at once.

        Nothing to do once the step started (its check is posted already).
        """
        if not self.check:
            return
        if seq > self._last:
            self._enqueue(Step(seq, "", native=False, failed=True))
            return
        step = self._steps.get(seq)
        if step is not None and not step.started and step.gen is None:
            step.failed = True  # a native collective that failed before it was attached
            self._advance()

    def attach(self, seq: int, gen: Native) -> asyncio.Future[Any]:
        """The native collective of step ``seq`` (queued by :meth:`gate`); its future.

        Called before the first ``await`` after :meth:`gate`, so no step can
        start without it.
        """
        step = self._steps.get(seq)
        if step is None:  # check off: the step is queued now, still in seq order
            step = Step(seq, "", native=True)
            self._enqueue(step)
        step.gen = gen
        self._advance()
        return step.future

    def close(self) -> None:
        self._closed = True
        for step in [*self._queue, *([self._running] if self._running else [])]:
            if not step.future.done():
                step.future.set_exception(
                    BrokenChannelError(f"collective #{step.seq}: the MPI channel was closed")
                )
            if step.gen is not None:
                step.gen.close()
        self._queue.clear()

    # ------------------------------------------------------------ running the queue

    def _enqueue(self, step: Step) -> None:
        self._last = max(self._last, step.seq)
        self._steps[step.seq] = step
        self._queue.append(step)
        self._advance()

    def _advance(self) -> None:
        while self._running is None and self._queue and not self._closed:
            step = self._queue[0]
            if step.native and step.gen is None and not step.failed:
                # attach() comes before the caller's first await, or skip() when
                # the native collective failed on this peer before it could
                return
            self._queue.popleft()
            self._running = step
            try:
                self._start(step)
            except Exception as exc:  # MPI refused to post: this step fails, the next go on
                self._fail(step, _broken(step, exc))

    def _start(self, step: Step) -> None:
        channel = self.channel
        step.started = True
        if not self.check:
            self._run_native(step)
            return
        mine: np.ndarray | None
        if step.failed:
            mine = np.array([_NONE, _NONE, -channel.peer_id], dtype=np.int64)
        else:
            mine = self._votes.get(step.plan)
            if mine is None:  # plans repeat: their votes are kept (read-only)
                h = plan_hash(step.plan)
                mine = np.array([h, -h, _NOBODY], dtype=np.int64)
                mine.flags.writeable = False
                if len(self._votes) >= _VOTES:
                    del self._votes[next(iter(self._votes))]
                self._votes[step.plan] = mine
        verdict = np.empty(3, dtype=np.int64)
        request = channel.comm.Iallreduce(mine, verdict, channel.MPI.MAX)
        self._after([request], (mine, verdict), lambda: self._checked(step, verdict))

    def _after(self, requests: list[Any], keep: Any, then: Callable[[], None]) -> None:
        """``then()`` once every request completed: at once when they complete within
        POST_SPIN seconds of busy testing (a small collective whose peers are there
        too: no trip through the event loop), else when the progress engine sees it."""
        test = self.channel.MPI.Request.Testall
        until = time.perf_counter() + POST_SPIN
        while not test(requests):
            if time.perf_counter() >= until:
                break
        else:
            then()
            return
        assert self.channel.progress is not None
        self.channel.progress.watch_all(requests, then, keep)

    def _checked(self, step: Step, verdict: np.ndarray) -> None:
        if step.failed:
            self._done(step)
            return
        high, low, quitter = verdict.tolist()
        error: BaseException | None = None
        if quitter != _NOBODY:
            if step.gen is not None:
                step.gen.close()
            self._done(step)
            self._tell_abort(step, -quitter, time.monotonic() + CAUSE_WAIT)
            return
        if high != -low:
            error = PlanMismatchError(
                f"collective #{step.seq}: peer {self.channel.peer_id} runs plan {step.plan!r} "
                "but another peer runs a different one; every peer must call the same "
                "collectives in the same order, with the same root, operator, algorithm and "
                "channel, and values of the same shape and dtype"
            )
        if error is not None:
            if step.gen is not None:
                step.gen.close()
            self._fail(step, error)
            return
        if step.native:
            self._run_native(step)
            return
        if not step.future.done():
            step.future.set_result(None)
        self._done(step)

    def _tell_abort(self, step: Step, peer: int, until: float) -> None:
        """Fail the step with the abort peer ``peer`` announced, which follows its check
        by a moment (a message on the channel); without it by ``until``, say who."""
        if step.future.done():
            return
        verdict = self.channel.mailbox.aborted(step.seq)
        if isinstance(verdict, AbortedError):
            step.future.set_exception(verdict)
        elif time.monotonic() < until and not self._closed:
            loop = step.future.get_loop()
            loop.call_later(CAUSE_POLL, self._tell_abort, step, peer, until)
        else:
            step.future.set_exception(
                AbortedError(
                    f"collective #{step.seq} on peer {self.channel.peer_id} was aborted by peer "
                    f"{peer}, which gave up before running it (its announcement of why did not "
                    f"arrive within {CAUSE_WAIT}s)",
                    peer=peer,
                )
            )

    def _run_native(self, step: Step, _: object = None) -> None:
        gen = step.gen
        if gen is None:
            logger.error("collective #%d: no native collective attached", step.seq)
            self._fail(step, BrokenChannelError(f"collective #{step.seq}: nothing to run"))
            return
        try:
            requests = gen.send(None)
        except StopIteration as stop:
            if not step.future.done():
                step.future.set_result(stop.value)
            self._done(step)
            return
        except Exception as exc:
            self._fail(step, _broken(step, exc))
            return
        if not requests:
            self._run_native(step)
            return
        self._after(requests, None, lambda: self._run_native(step))

    def _fail(self, step: Step, error: BaseException) -> None:
        if not step.future.done():
            step.future.set_exception(error)
        self._done(step)

    def _done(self, step: Step) -> None:
        self._steps.pop(step.seq, None)
        if self._running is step:
            self._running = None
        self._advance()


def _broken(step: Step, exc: BaseException) -> BaseException:
    from ...errors import FMIError

    if isinstance(exc, FMIError):
        return exc
    return BrokenChannelError(f"collective #{step.seq}: MPI failed: {exc}")


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # nobody awaits a skipped step: mark its outcome seen
