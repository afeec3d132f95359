"""The matching layer direct channels deliver into, and a collective's bookkeeping.

A :class:`Mailbox` matches messages by ``(source, key)`` like MPI matches
``(source, tag)``: an early message for another key waits in its own queue and
never blocks anybody else.  It also keeps what makes failures safe (DESIGN.md
section 8): aborts, plan agreement, stale-message eviction and the hand-back of
a message whose waiter was cancelled.  :class:`ReceiveGuard` (in
:mod:`fmi_async.channels.guard`, re-exported here) does the last for receives
that run as tasks (storage channels).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import zlib
from collections import deque

from ..errors import AbortedError, CommTimeout, PlanMismatchError
from ..wire import Key, Payload, dumps, loads
from .guard import ReceiveGuard

__all__ = [
    "SCOPE",
    "Mailbox",
    "ReceiveGuard",
    "abort_error",
    "abort_payload",
    "describe_key",
    "is_plan_tag",
    "plan_mismatch",
    "plan_probe",
    "plan_tag",
]

logger = logging.getLogger(__name__)


def describe_key(key: Key) -> str:
    """Human-readable key for error messages: ``tag 3`` or ``bcast #5 step 2``."""
    if len(key) >= 2 and key[0] == SCOPE:
        return f"{describe_key(key[2:])} of sub-communicator {key[1]}"
    if len(key) >= 2 and key[0] == "u":
        return f"tag {key[1]}"
    if len(key) >= 3 and key[0] == "c":
        steps = key[3:] if is_plan_tag(key[2]) else key[2:]
        return f"collective #{key[1]} step {'/'.join(str(k) for k in steps)}"
    return repr(key)


SCOPE = "g"
"""First part of the keys of a sub-communicator's messages: ``("g", scope, key...)``."""

_SWEEP_SLACK = 1e-3  # a timer may fire a clock tick early; such a wait has expired


class _Expired(Exception):
    """Internal: a mailbox wait ran out of time."""


def _expire(fut: asyncio.Future[Payload]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class Mailbox:
    """One peer's inbox, matched by ``(source, key)``; FIFO per match.

    Besides matching, the mailbox keeps the collective bookkeeping that makes
    failures safe (DESIGN.md section 8):

    * **Cancellation.**  A waiter cancelled after its message was handed to it
      gives the message back (to the next waiter, or to the head of the queue):
      a delivered message is never lost.
    * **Stale messages.**  Collective keys are ``("c", seq, plan, step...)``.
      Once this peer has finished collective ``seq`` (:meth:`finish`), later
      messages for it are dropped on arrival and queued ones are evicted, so
      an abandoned collective cannot leave memory behind.
    * **Aborts.**  ``("a", seq)`` messages carry another peer's verdict that
      collective ``seq`` is doomed; every wait of that collective fails at
      once with it, and later ones fail without waiting.
    * **Plan agreement.**  :meth:`begin` records this peer's plan tag for a
      collective; a message of the same collective under another plan tag
      fails it at once with :class:`~fmi_async.errors.PlanMismatchError`.
      Peers whose plans differ so much that no message ever crosses (each
      waits on another) are caught by ``("q", seq)`` probes: a peer that
      waited a while for another tells it its plan.
    """

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self._queues: dict[tuple[int, Key], deque[Payload]] = {}
        self._waiters: dict[tuple[int, Key], deque[asyncio.Future[Payload]]] = {}
        self._error: BaseException | None = None
        self._source_errors: dict[int, BaseException] = {}
        self._deadlines: dict[asyncio.Future[Payload], float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        # collective bookkeeping
        self._plans: dict[int, tuple[str, str]] = {}  # running seq -> (plan tag, plan ident)
        # seq not begun -> {plan tag: (a source, its plan)}
        self._early: dict[int, dict[str, tuple[int, Payload]]] = {}
        self._aborts: dict[int, BaseException] = {}  # seq -> why it is doomed
        self._finished_below = 1  # every collective below this seq has finished here
        self._finished: set[int] = set()  # finished seqs at or above _finished_below
        self.dropped = 0  # stale collective messages dropped or evicted
        # sub-communicators: scope -> (their mailbox, parent rank -> their rank)
        self._children: dict[str | int, tuple[Mailbox, dict[int, int]]] = {}
        self._orphans: dict[str | int, list[tuple[int, Key, Payload]]] = {}
        self._gone: set[str | int] = set()  # scopes closed (or never formed) here
        self._loop: asyncio.AbstractEventLoop | None = None  # see running_loop

    def __repr__(self) -> str:
        return (
            f"<Mailbox peer={self.owner} queued={sum(len(q) for q in self._queues.values())} "
            f"waiting={sum(len(w) for w in self._waiters.values())} "
            f"running={sorted(self._plans)} dropped={self.dropped}>"
        )

    # ---------------------------------------------------------------- delivery

    def deliver(self, src: int, key: Key, payload: Payload) -> None:
        kind = key[0] if key else None
        if kind == SCOPE:
            self._route(src, key, payload)
            return
        if kind == "c" and len(key) >= 3:
            # The common case first: a message of a running collective under this
            # peer's plan tag (what the checks below would let through, faster).
            running = self._plans.get(key[1])  # type: ignore[arg-type]
            if running is not None and key[2] == running[0] and key[1] not in self._aborts:
                self._hand_over((src, key), payload)
                return
        if kind == "c" or kind == "a" or kind == "q":
            seq = key[1]
            if not isinstance(seq, int) or self._is_finished(seq):
                self.dropped += 1  # a message of a collective this peer has left
                return
            if kind == "a":
                self._on_abort(seq, payload)
                return
            if kind == "q":
                self._on_probe(seq, src, payload)
                return
            if seq in self._aborts:
                self.dropped += 1
                return
            tag = key[2] if len(key) >= 3 else None
            if (
                isinstance(tag, str)
                and is_plan_tag(tag)
                and not self._plan_agrees(seq, src, tag, payload)
            ):
                self.dropped += 1
                return
        self._hand_over((src, key), payload)

    def _route(self, src: int, key: Key, payload: Payload) -> None:
        """A message of a sub-communicator: to its mailbox, under its rank of ``src``.

        One that comes before this peer formed the sub-communicator waits for
        :meth:`adopt`; one for a sub-communicator closed here is dropped.
        """
        scope = key[1] if len(key) >= 2 else None
        if scope is None or scope in self._gone:
            self.dropped += 1
            return
        child = self._children.get(scope)
        if child is None:
            self._orphans.setdefault(scope, []).append((src, key[2:], payload))
            return
        box, ranks = child
        rank = ranks.get(src)
        if rank is None:  # not a member: nothing of it can be meant for this group
            self.dropped += 1
            return
        box.deliver(rank, key[2:], payload)

    def adopt(self, scope: str | int, box: Mailbox, members: list[int]) -> None:
        """Route messages of sub-communicator ``scope`` to ``box``; ``members[r]`` is
        the rank here of its rank ``r``.  Messages that came early are delivered now."""
        ranks = {parent: rank for rank, parent in enumerate(members)}
        self._children[scope] = (box, ranks)
        self._gone.discard(scope)
        if self._error is not None:
            box.fail(self._error)
        for src, exc in self._source_errors.items():
            if src in ranks:
                box.fail_source(ranks[src], exc)
        for src, key, payload in self._orphans.pop(scope, ()):
            rank = ranks.get(src)
            if rank is None:
                self.dropped += 1
            else:
                box.deliver(rank, key, payload)

    def disown(self, scope: str | int) -> None:
        """Sub-communicator ``scope`` is closed here (or was never formed): drop its messages."""
        self._children.pop(scope, None)
        self.dropped += len(self._orphans.pop(scope, ()))
        self._gone.add(scope)

    def _plan_agrees(self, seq: int, src: int, tag: str, payload: Payload) -> bool:
        """Compare a plan tag that ``src`` sent for collective ``seq`` with this peer's plan;
        a collective not begun here keeps the first message of each tag for :meth:`begin`."""
        expected = self._plans.get(seq)
        if expected is None:
            early = self._early.setdefault(seq, {})
            if tag not in early:
                early[tag] = (src, payload)
            return True
        if tag == expected[0]:
            return True
        self._mismatch(seq, src, _plan_of(payload))
        return False

    def _hand_over(self, match: tuple[int, Key], payload: Payload, *, first: bool = False) -> None:
        waiters = self._waiters.get(match)
        while waiters:
            fut = waiters.popleft()
            if not waiters:
                del self._waiters[match]
            if not fut.done():
                fut.set_result(payload)
                return
        queue = self._queues.setdefault(match, deque())
        if first:
            queue.appendleft(payload)
        else:
            queue.append(payload)

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop, remembered: ``asyncio.get_running_loop`` costs a
        system call (``getpid``) on Python 3.11, and a mailbox lives in one loop."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def take_now(self, src: int, key: Key) -> Payload | None:
        """The first message queued for ``(src, key)``, taken without waiting; ``None``
        if there is none (then :meth:`take` waits for it)."""
        match = (src, key)
        queue = self._queues.get(match)
        if not queue:
            return None
        payload = queue.popleft()
        if not queue:
            del self._queues[match]
        return payload

    async def take(self, src: int, key: Key, timeout: float | None, channel: str) -> Payload:
        payload = self.take_now(src, key)
        if payload is not None:
            return payload
        match = (src, key)
        if self._error is not None:
            raise self._error
        if src in self._source_errors:
            raise self._source_errors[src]
        if key and key[0] == "c" and key[1] in self._aborts:
            raise self._aborts[key[1]]
        loop = self.running_loop()
        fut: asyncio.Future[Payload] = loop.create_future()
        waiting = self._waiters.get(match)
        if waiting is None:
            self._waiters[match] = deque((fut,))
        else:
            waiting.append(fut)
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
        except BaseException:
            # Cancelled (or timed out from outside) after the message was handed
            # to this waiter: give it back instead of dropping it.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._hand_over(match, fut.result(), first=True)
            raise
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

    # ---------------------------------------------------------------- failures

    def fail(self, exc: BaseException) -> None:
        """Wake every waiter with ``exc`` (channel broke or was closed)."""
        self._error = exc
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
        self._waiters.clear()
        for box, _ in self._children.values():
            box.fail(exc)

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
        for box, ranks in self._children.values():
            if src in ranks:
                box.fail_source(ranks[src], exc)

    def clear_source(self, src: int) -> None:
        """``src`` reconnected: receives from it wait normally again."""
        self._source_errors.pop(src, None)
        for box, ranks in self._children.values():
            if src in ranks:
                box.clear_source(ranks[src])

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values()) + sum(
            len(o) for o in self._orphans.values()
        )

    # ---------------------------------------------------------------- collectives

    def begin(self, seq: int, plan_tag: str, plan: str) -> None:
        """Collective ``seq`` starts here under ``plan``.

        Raises :class:`~fmi_async.errors.PlanMismatchError` if a message of
        this collective already arrived under another plan, and the abort a
        peer already sent for it, if any.
        """
        self._plans[seq] = (plan_tag, plan)
        early = self._early.pop(seq, None) if self._early else None
        if early:
            for other, (src, theirs) in early.items():
                if other != plan_tag:
                    self._mismatch(seq, src, _plan_of(theirs))
                    break
        if self._aborts and seq in self._aborts:
            raise self._aborts[seq]

    def finish(self, seq: int, *, failed: bool = False) -> None:
        """Collective ``seq`` is over on this peer: later messages for it are dropped;
        after a failure, the ones already queued are evicted too."""
        self._plans.pop(seq, None)
        if self._early:
            self._early.pop(seq, None)
        if self._aborts:
            self._aborts.pop(seq, None)
        if seq == self._finished_below and not self._finished:
            self._finished_below += 1  # collectives finish in order, nearly always
        elif seq >= self._finished_below:
            self._finished.add(seq)
            while self._finished_below in self._finished:
                self._finished.remove(self._finished_below)
                self._finished_below += 1
        if failed:
            for match in [m for m in self._queues if _collective_seq(m[1]) == seq]:
                self.dropped += len(self._queues.pop(match))

    def abort(self, seq: int, exc: BaseException) -> None:
        """Fail collective ``seq`` on this peer: every wait of it raises ``exc`` now."""
        if self._is_finished(seq) or seq in self._aborts:
            return
        if len(self._aborts) >= _MAX_ABORTS:  # bounded: forget the oldest verdict
            del self._aborts[next(iter(self._aborts))]
        self._aborts[seq] = exc
        for match, waiters in list(self._waiters.items()):
            if _collective_seq(match[1]) == seq:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
        for match in [m for m in self._queues if _collective_seq(m[1]) == seq]:
            self.dropped += len(self._queues.pop(match))

    def aborted(self, seq: int) -> BaseException | None:
        """The verdict that dooms collective ``seq``, if one arrived."""
        return self._aborts.get(seq)

    def _is_finished(self, seq: int) -> bool:
        return seq < self._finished_below or seq in self._finished

    def _on_abort(self, seq: int, payload: Payload) -> None:
        self.abort(seq, abort_error(payload, seq, self.owner))

    def _on_probe(self, seq: int, src: int, payload: Payload) -> None:
        """A peer waiting on this one for collective ``seq`` says which plan it runs."""
        self._plan_agrees(seq, src, plan_tag(_plan_of(payload)), payload)

    def _mismatch(self, seq: int, src: int, theirs: str) -> None:
        mine = self._plans.get(seq, ("", "?"))[1]
        self.abort(seq, plan_mismatch(f"collective #{seq}", self.owner, mine, src, theirs))


_MAX_ABORTS = 4096


@functools.lru_cache(maxsize=1024)
def plan_tag(ident: str) -> str:
    """The short tag of a plan that direct channels carry in every collective key:
    ``#`` and 8 hex digits of a CRC of the plan identifier."""
    return f"#{zlib.crc32(ident.encode()):08x}"


def is_plan_tag(part: object) -> bool:
    return isinstance(part, str) and len(part) == 9 and part[0] == "#"


def _plan_of(payload: Payload) -> str:
    """The plan identifier a collective message carries (for error messages only)."""
    try:
        return str(loads(payload)[0])
    except Exception:
        return "?"


def plan_mismatch(
    what: str, rank: int, mine: str, src: int | str, theirs: str
) -> PlanMismatchError:
    """The error of peer ``rank`` finding that peer ``src`` runs another plan of ``what``."""
    return PlanMismatchError(
        f"{what}: peer {rank} runs plan {mine!r} but peer {src} runs plan {theirs!r}; every "
        "peer must call the same collectives in the same order, with the same root, operator, "
        "algorithm and channel, and values of the same shape and dtype"
    )


def plan_probe(plan: str) -> Payload:
    """What a ``("q", seq)`` probe carries: the waiting peer's plan identifier."""
    return dumps([plan])


def _collective_seq(key: Key) -> int | None:
    if len(key) >= 2 and key[0] == "c" and isinstance(key[1], int):
        return key[1]
    return None


def abort_payload(peer: int, op: str, exc: BaseException) -> Payload:
    """What an abort message carries: who gave up, and why."""
    cause = type(exc).__name__
    text = str(exc) or cause
    return dumps([peer, op, cause, text[:2000]])


def abort_error(payload: Payload, seq: int, owner: int) -> AbortedError:
    """The error a peer raises for an abort message it received."""
    try:
        peer, op, cause, text = loads(payload)
        peer, op, cause, text = int(peer), str(op), str(cause), str(text)
    except Exception:
        peer, op, cause, text = -1, "collective", "ProtocolError", "malformed abort message"
    return AbortedError(
        f"{op} (collective #{seq}) on peer {owner} was aborted by peer {peer}: {cause}: {text}",
        peer=peer,
        cause=cause,
    )
