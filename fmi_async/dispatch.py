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
from .channels.mailbox import Mailbox, ReceiveGuard, abort_payload, plan_tag
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


class Planned:
    """A plan with what every call under it needs, worked out once (a cache entry):
    its identifier and tag, the channel, the algorithm, the stats key and the
    channels that must see every collective."""

    __slots__ = ("channel", "counted", "fn", "ident", "native", "plan", "tag", "watchers")

    def __init__(self, chosen: Plan, channels: dict[str, Channel], fn: AlgorithmFn | None) -> None:
        self.plan = chosen
        self.ident = chosen.ident
        self.tag = plan_tag(self.ident)
        self.channel = channels[chosen.channel]
        self.native = chosen.family == "mpi"
        self.fn = (
            fn if fn is not None else algorithms.get(chosen.family, chosen.op, chosen.algorithm).fn
        )
        self.counted = f"{chosen.op}/{chosen.channel}/{chosen.family}:{chosen.algorithm}"
        # Most channels do not watch collectives (the base class's hook returns None).
        self.watchers = tuple(
            chan
            for chan in channels.values()
            if type(chan).collective_started is not Channel.collective_started
        )

    def __repr__(self) -> str:
        return f"<Planned {self.ident}>"


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
    _plans: dict[tuple[Any, ...], Any]  # call traits -> Planned
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
        fixed: tuple[Plan, AlgorithmFn] | None = None,
    ) -> tuple[CollectiveContext, Planned, tuple[Any, ...]]:
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
            planned = (
                self._plan(op, call)
                if fixed is None
                else Planned(fixed[0], self._channels, fixed[1])
            )
            ident = planned.ident
            ctx = CollectiveContext(
                rank=self.peer_id,
                size=self.num_peers,
                seq=seq,
                op=op,
                plan=ident,
                channel=planned.channel,
                deadline=deadline,
                serializer=self.config.serializer,
                mailbox=self._mailbox,
                guard=self._guard,
                tag=planned.tag,
            )
            self._mailbox.begin(seq, planned.tag, ident)
            for chan in planned.watchers:
                gate = chan.collective_started(seq, ident, native=planned.native)
                if gate is not None and not planned.native:
                    self._gates[seq] = gate
        except BaseException as exc:
            self._abandon(seq, op, exc)
            raise
        chosen = planned.plan
        self._collectives[planned.counted] += 1
        self._predicted_seconds += chosen.seconds
        self._predicted_usd += chosen.usd
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "peer %d: %s #%d plan %s (predicted %.3gs, $%.3g)",
                self.peer_id,
                op,
                seq,
                ident,
                chosen.seconds,
                chosen.usd,
            )
        return ctx, planned, call.args

    def _plan(self, op: str, call: Call) -> Planned:
        """plan() for this call, remembered with what running it needs: it is a pure
        function of the call's traits, and a loop of small collectives would
        otherwise pay it every time."""
        key: tuple[Any, ...] = (op, self._hint, *call.traits)
        try:
            planned: Planned | None = self._plans.get(key)
        except TypeError:  # an operator whose function cannot be hashed
            key, planned = (), None
        if planned is None:
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
                # A call's channel= wins; else the config's collective_channel.
                channel=call.channel or self.config.collective_channel,
                algorithm=call.algorithm,
            )
            planned = Planned(chosen, self._channels, None)
            if key:
                if len(self._plans) >= PLAN_CACHE:
                    del self._plans[next(iter(self._plans))]
                self._plans[key] = planned
        return planned

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
        ctx, planned, args = self._start(op, timeout, prepare, fixed)
        try:
            if self._gates:
                result = await self._gated(ctx, planned, args, fixed is not None)
            else:
                result = await planned.fn(ctx, *args)
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

    async def _gated(
        self, ctx: CollectiveContext, planned: Planned, args: tuple[Any, ...], fixed: bool
    ) -> Any:
        """Run the planned algorithm once a channel that sees every collective says go.

        ``args`` are the collective's arguments in the order
        :data:`~fmi_async.collectives.registry.COLLECTIVES` declares them.
        """
        fn = planned.fn
        gate = self._gates.pop(ctx.seq, None)
        if fixed and gate is not None:
            return await self._overlapped(ctx, gate, fn(ctx, *args))
        if gate is not None:
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
