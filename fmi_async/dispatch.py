"""The collective runner: number, check, plan, run and settle one collective.

:class:`CollectiveRunner` is the part of
:class:`~fmi_async.communicator.Communicator` every collective goes through
(DESIGN.md section 8): the sequence number taken synchronously at the call,
the plan (remembered per call traits), the gate of a channel that sees every
collective, the run, and on failure the abandonment -- this peer's messages
of it evicted and the other peers told why, in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from .calls import Call
from .channels.base import Channel
from .channels.mailbox import Mailbox, ReceiveGuard, abort_payload
from .collectives import registry as algorithms
from .collectives.base import CollectiveContext
from .collectives.native import wait_for_step
from .collectives.registry import AlgorithmFn
from .config import Config
from .errors import AbortedError, CommTimeout, FMIError
from .selection.model import CostModel
from .selection.plan import Hint, Plan, plan

__all__ = ["ANNOUNCE_TIMEOUT", "PLAN_CACHE", "CollectiveRunner"]

logger = logging.getLogger(__name__)

PLAN_CACHE = 512
"""Plans a communicator remembers (the oldest is forgotten first)."""

ANNOUNCE_TIMEOUT = 10.0
"""Longest time spent telling the other peers that a collective was abandoned."""


class CollectiveRunner:
    """How a communicator runs its collectives (a mixin of
    :class:`~fmi_async.communicator.Communicator`, which provides the state
    declared here)."""

    peer_id: int
    num_peers: int
    timeout: float
    config: Config
    _hint: Hint
    _models: CostModel
    _mailbox: Mailbox
    _guard: ReceiveGuard
    _channels: dict[str, Channel]
    _gates: dict[int, asyncio.Future[Any]]
    _plans: dict[tuple[Any, ...], Plan]
    _seq: int
    _collectives: Counter[str]
    _predicted_seconds: float
    _predicted_usd: float
    _background: set[asyncio.Task[None]]

    def _usable(self) -> None:
        raise NotImplementedError  # the communicator's state check

    def _deadline(self, timeout: float | None) -> float:
        raise NotImplementedError  # the communicator's deadline

    def _start(
        self,
        op: str,
        timeout: float | None,
        prepare: Callable[[], Call],
        fixed: Plan | None = None,
    ) -> tuple[CollectiveContext, Plan, tuple[Any, ...]]:
        """Everything synchronous before the first await.

        The sequence number is taken first, then the call is checked and the
        plan chosen.  A check that fails on this peer only (a wrong root, an
        unknown operator, a value the serializer cannot carry) would leave the
        other peers inside collective ``seq`` while this one moved on; so
        the failure is announced to them (they raise
        :class:`~fmi_async.errors.AbortedError` naming this peer and the
        cause) and the sequence stays aligned on every peer.  Collectives
        started together (``asyncio.gather``) are numbered in call order.
        """
        self._usable()
        self._seq += 1
        seq = self._seq
        try:
            deadline = self._deadline(timeout)
            call = prepare()
            chosen = self._plan(op, call) if fixed is None else fixed
            ctx = CollectiveContext(
                rank=self.peer_id,
                size=self.num_peers,
                seq=seq,
                op=op,
                plan=chosen.ident,
                channel=self._channels[chosen.channel],
                deadline=deadline,
                serializer=self.config.serializer,
                mailbox=self._mailbox,
                guard=self._guard,
            )
            self._mailbox.begin(seq, ctx.tag, ctx.plan)
            native = chosen.family == "mpi"
            for chan in self._channels.values():
                gate = chan.collective_started(seq, ctx.plan, native=native)
                if gate is not None and not native:
                    self._gates[seq] = gate
        except BaseException as exc:
            self._abandon(seq, op, exc)
            raise
        self._collectives[f"{op}/{chosen.channel}/{chosen.family}:{chosen.algorithm}"] += 1
        self._predicted_seconds += chosen.seconds
        self._predicted_usd += chosen.usd
        logger.debug(
            "peer %d: %s #%d plan %s (predicted %.3gs, $%.3g)",
            self.peer_id,
            op,
            seq,
            ctx.plan,
            chosen.seconds,
            chosen.usd,
        )
        return ctx, chosen, call.args

    def _plan(self, op: str, call: Call) -> Plan:
        """plan() for this call, remembered: it is a pure function of the call's
        traits, and a loop of small collectives would otherwise pay it every time."""
        key: tuple[Any, ...] = (
            op,
            call.nbytes,
            call.operator,
            call.is_array,
            call.elements,
            call.root,
            call.signature,
            self._hint,
            call.channel,
            call.algorithm,
        )
        try:
            chosen = self._plans.get(key)
        except TypeError:  # an operator whose function cannot be hashed
            key, chosen = (), None
        if chosen is None:
            chosen = plan(
                op,
                nbytes=call.nbytes,
                num_peers=self.num_peers,
                channels=[(name, chan.kind) for name, chan in self._channels.items()],
                models=self._models,
                operator=call.operator,
                is_array=call.is_array,
                elements=call.elements,
                root=call.root,
                signature=call.signature,
                hint=self._hint,
                channel=call.channel,
                algorithm=call.algorithm,
            )
            if key:
                if len(self._plans) >= PLAN_CACHE:
                    del self._plans[next(iter(self._plans))]
                self._plans[key] = chosen
        return chosen

    async def _collective(
        self,
        op: str,
        timeout: float | None,
        prepare: Callable[[], Call],
        *,
        fixed: tuple[Plan, AlgorithmFn] | None = None,
    ) -> Any:
        """Check, plan, run and settle one collective (see :meth:`_start`).

        ``fixed``: the plan and the algorithm, not planned nor looked up (the
        agreement of :mod:`fmi_async.groups`, which is not a user collective).
        """
        ctx, chosen, args = self._start(op, timeout, prepare, None if fixed is None else fixed[0])
        try:
            result = await self._run(ctx, chosen, *args, fn=None if fixed is None else fixed[1])
        except BaseException as exc:
            self._abandon(ctx.seq, op, exc)
            raise
        self._mailbox.finish(ctx.seq)
        return result

    def _abandon(self, seq: int, op: str, exc: BaseException) -> None:
        """This peer leaves collective ``seq`` with ``exc``: evict its messages and,
        unless another peer's abort is the cause, tell every other peer why."""
        self._mailbox.finish(seq, failed=True)
        self._gates.pop(seq, None)
        for chan in self._channels.values():
            chan.collective_abandoned(seq)
        if isinstance(exc, AbortedError) or self.num_peers == 1:
            return
        logger.debug(
            "peer %d: %s #%d abandoned (%r); telling the others", self.peer_id, op, seq, exc
        )
        self._spawn(self._announce(seq, op, exc))

    async def _announce(self, seq: int, op: str, exc: BaseException) -> None:
        """Best effort, bounded: an abort of ``seq`` on every channel, to every other peer."""
        payload = abort_payload(self.peer_id, op, exc)
        others = [p for p in range(self.num_peers) if p != self.peer_id]

        async def one(chan: Channel) -> None:
            if chan.kind == "direct":
                sends = (chan.send(dst, ("a", seq), payload) for dst in others)
                await asyncio.gather(*sends, return_exceptions=True)
            else:
                storage: Any = chan
                await storage.put(("a", seq), payload)

        async with asyncio.timeout(min(self.timeout, ANNOUNCE_TIMEOUT)):
            results = await asyncio.gather(
                *(one(c) for c in self._channels.values() if c.is_open), return_exceptions=True
            )
        for result in results:
            if isinstance(result, BaseException):
                logger.debug("peer %d: abort of #%d not delivered: %r", self.peer_id, seq, result)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("peer %d: background task failed: %r", self.peer_id, task.exception())

    async def _run(
        self, ctx: CollectiveContext, chosen: Plan, *args: Any, fn: AlgorithmFn | None = None
    ) -> Any:
        """Run the chosen algorithm: one registry lookup, one uniform call.

        ``args`` are the collective's arguments in the order
        :data:`~fmi_async.collectives.registry.COLLECTIVES` declares them.
        """
        gate = self._gates.pop(ctx.seq, None)
        if fn is not None and gate is not None:
            return await self._overlapped(ctx, gate, fn(ctx, *args))
        if fn is None:
            fn = algorithms.get(chosen.family, chosen.op, chosen.algorithm).fn
        if gate is not None:  # a channel that sees every collective says go
            await wait_for_step(ctx, gate)
        return await fn(ctx, *args)

    @staticmethod
    async def _overlapped(
        ctx: CollectiveContext, gate: asyncio.Future[Any], work: Coroutine[Any, Any, Any]
    ) -> Any:
        """A fixed algorithm (an agreement) runs while the gate is waited for: when a
        peer never comes, its own timeout names the missing peers, the gate's cannot."""
        task = asyncio.ensure_future(work)
        try:
            await wait_for_step(ctx, gate)
        except CommTimeout:
            await asyncio.wait([task])
            named = None if task.cancelled() else task.exception()
            if isinstance(named, FMIError):
                raise named from None
            raise
        except BaseException:
            task.cancel()
            await asyncio.wait([task])
            raise
        return await task
