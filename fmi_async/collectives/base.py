"""The context a collective algorithm runs in.

Every collective call gets a :class:`CollectiveContext`: the caller's rank and
group size, a private sequence number, the plan identifier, one deadline for
the whole operation, and the channel.  Algorithms only use ``send``/``recv``
(direct family) or ``put``/``get`` (mediated family) of the context; they never
see user tags, so collective traffic can never match a user ``recv``
(the key space is ``("c", seq, step...)``, user messages use ``("u", tag)``;
the same idea as mpi4py's ``util/pkl5`` running collectives on a duplicated
communicator).

Each message carries the plan identifier.  A peer that receives a message
sent under another plan raises :class:`~fmi_async.errors.PlanMismatchError`
naming both, instead of silently mixing data or hanging.  On direct channels
the key also carries a short tag of the plan (``("c", seq, "#1a2b3c4d",
step...)``), so the receiving mailbox sees a mismatch as soon as the message
arrives, whatever step the other algorithm waits on.

Waits on storage channels run in slices: between two slices the context
looks for an abort object of the collective (``("a", seq)``, put by a peer
that gave up), so a doomed collective fails within a slice instead of at
its deadline.  Direct channels need no polling: aborts arrive in the mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..channels.base import Channel
from ..channels.mailbox import (
    Mailbox,
    ReceiveGuard,
    abort_error,
    plan_mismatch,
    plan_probe,
    plan_tag,
)
from ..errors import (
    AbortedError,
    ArgumentError,
    BackendUnavailable,
    CommTimeout,
    ProtocolError,
)
from ..wire.serialize import Payload, dumps, dumps_pair, loads, pair_prefix

__all__ = ["CollectiveContext", "StorageOps", "Step", "ABORT_PROBE_FIRST", "ABORT_PROBE_MAX"]

logger = logging.getLogger(__name__)

Step = int | str | tuple[int | str, ...]

ABORT_PROBE_FIRST = 0.5
"""Seconds a storage wait runs before its first look for an abort (doubling after)."""
ABORT_PROBE_MAX = 2.0
"""Longest slice between two looks for an abort on a storage channel."""
PLAN_PROBE_AFTER = 1.0
"""Seconds a wait runs before this peer tells the awaited peer its plan (direct
channels: a message; storage: an object, published after the slice that ends
past this time)."""


class StorageOps(Protocol):
    """The one-to-many operations storage channels add to :class:`Channel`."""

    async def put(self, key: tuple[str | int, ...], payload: Payload) -> None: ...

    async def get(self, key: tuple[str | int, ...], timeout: float | None) -> Payload: ...


class CollectiveContext:
    """Everything one collective call needs; created by the communicator.

    ``tag`` is :func:`~fmi_async.channels.mailbox.plan_tag` of ``plan``, when
    the caller has it at hand (the runner keeps it with the cached plan).
    """

    def __init__(
        self,
        *,
        rank: int,
        size: int,
        seq: int,
        op: str,
        plan: str,
        channel: Channel,
        deadline: float | None,
        serializer: str = "msgpack",
        mailbox: Mailbox | None = None,
        guard: ReceiveGuard | None = None,
        tag: str | None = None,
    ) -> None:
        self.rank = rank
        self.size = size
        self.seq = seq
        self.op = op
        self.plan = plan
        self.channel = channel
        self.deadline = deadline
        self.serializer = serializer
        self.mailbox = mailbox
        self.guard = guard
        self.direct = channel.kind == "direct"
        self.tag = plan_tag(plan) if tag is None else tag
        self._head: bytes | None = None  # msgpack of "[plan, " (see pack)
        self._probed: set[int] | None = None
        self._published = False

    def __repr__(self) -> str:
        return (
            f"<CollectiveContext {self.op}#{self.seq} rank={self.rank}/{self.size} "
            f"plan={self.plan} channel={self.channel.name}>"
        )

    # -- helpers --------------------------------------------------------------

    @property
    def _what(self) -> str:
        return f"{self.op} (collective #{self.seq})"

    def key(self, step: Step) -> tuple[str | int, ...]:
        if isinstance(step, tuple):
            if self.direct:
                return ("c", self.seq, self.tag, *step)
            return ("c", self.seq, *step)
        if self.direct:
            return ("c", self.seq, self.tag, step)
        return ("c", self.seq, step)

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        mailbox = self.mailbox
        loop = asyncio.get_running_loop() if mailbox is None else mailbox.running_loop()
        left = self.deadline - loop.time()
        if left <= 0:
            raise CommTimeout(
                f"{self.op} (collective #{self.seq}) on peer {self.rank} ran past its deadline "
                f"on channel {self.channel.name}"
            )
        return left

    def pack(self, value: Any) -> Payload:
        """Serialize ``value`` together with the plan identifier: ``[plan, value]``.

        With msgpack that is the array header and the packed plan (made once
        per collective) followed by the packed value -- the same bytes
        ``dumps([plan, value])`` gives, whose out-of-band buffers are the value's.
        """
        if self.serializer != "msgpack":
            return dumps([self.plan, value], self.serializer)
        head = self._head
        if head is None:
            head = self._head = pair_prefix(self.plan)
        return dumps_pair(head, value)

    def unpack(self, payload: Payload, src: int | str) -> Any:
        try:
            plan, value = loads(payload)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.op}: malformed collective message from {src}") from exc
        if plan != self.plan:
            raise plan_mismatch(self._what, self.rank, self.plan, src, plan)
        return value

    def _timeout(self, exc: CommTimeout) -> CommTimeout:
        return CommTimeout(f"{self.op} (collective #{self.seq}): {exc}")

    # -- point to point -------------------------------------------------------

    async def send_payload(self, dst: int, step: Step, payload: Payload) -> None:
        if self.deadline is None or not self.channel.send_waits(dst):
            await self.channel.send(dst, self.key(step), payload)
            return
        # A send may wait for a connection (rendezvous lookup, punching) or for
        # flow control: the collective's deadline bounds that too.
        await self._bounded(
            self.channel.send(dst, self.key(step), payload), f"could not send to peer {dst}"
        )

    async def _bounded(self, work: Awaitable[None], failure: str) -> None:
        """``work``, stopped at the collective's deadline with a CommTimeout saying ``failure``."""
        try:
            async with asyncio.timeout_at(self.deadline):
                await work
        except TimeoutError as exc:
            if isinstance(exc, CommTimeout):
                raise self._timeout(exc) from None
            raise CommTimeout(
                f"{self._what}: peer {self.rank} {failure} on channel {self.channel.name} "
                "before the deadline"
            ) from None

    async def send(self, dst: int, step: Step, value: Any) -> None:
        await self.send_payload(dst, step, self.pack(value))

    async def recv_payload(self, src: int, step: Step) -> Payload:
        if self.direct:
            return await self._recv_direct(src, self.key(step), step)
        try:
            return await self._recv_stored(src, step)
        except AbortedError as exc:
            raise self._waited(exc, src, step) from None

    def _waited(self, exc: AbortedError, src: int, step: Step) -> AbortedError:
        """Another peer gave up while this one waited: say on whom this one
        waited, which may be the peer that is really missing."""
        return AbortedError(
            f"{exc} (peer {self.rank} was waiting for a message from peer {src}, step {step})",
            peer=exc.peer,
            cause=exc.cause,
        )

    async def _recv_direct(self, src: int, key: tuple[str | int, ...], step: Step) -> Payload:
        try:
            remaining = self.remaining()
            first = (
                PLAN_PROBE_AFTER
                if remaining is not None and remaining > PLAN_PROBE_AFTER
                else remaining
            )
            try:
                return await self.channel.recv(src, key, first)
            except CommTimeout as exc:
                if first is None or first >= remaining:  # type: ignore[operator]
                    raise self._timeout(exc) from None
            return await self._recv_probed(src, key)
        except AbortedError as exc:
            raise self._waited(exc, src, step) from None

    async def _recv_probed(self, src: int, key: tuple[str | int, ...]) -> Payload:
        """A direct wait that lasted PLAN_PROBE_AFTER: perhaps ``src`` runs another plan
        and waits on us too, so that no message of either ever crosses.  Tell it
        ours; if they differ its mailbox fails the collective and the abort comes back."""
        await self._send_probe(src)
        try:
            return await self.channel.recv(src, key, self.remaining())
        except CommTimeout as exc:
            raise self._timeout(exc) from None

    async def _recv_stored(self, src: int, step: Step) -> Payload:
        key = self.key(step)
        guard = self.guard

        async def fetch(seconds: float) -> Payload:
            if guard is None:
                return await self.channel.recv(src, key, seconds)
            return await guard.recv(self.channel, src, key, seconds)

        return await self._sliced(fetch, "", src)

    async def _sliced(
        self, fetch: Callable[[float], Awaitable[Payload]], who: str, src: int | None
    ) -> Payload:
        """Wait on storage in slices, looking for an abort of this collective between them.

        Once the wait has lasted PLAN_PROBE_AFTER this peer also publishes its plan (``("q", seq,
        rank)``) and compares it with the awaited peer's, if that one published
        too: peers whose plans differ so much that each waits on another would
        otherwise only meet their deadline.
        """
        piece = ABORT_PROBE_FIRST
        waited = 0.0
        while True:
            left = self.remaining()
            remaining = math.inf if left is None else left
            wait = min(remaining, piece)
            try:
                payload: Payload = await fetch(wait)
                return payload
            except (CommTimeout, BackendUnavailable) as exc:
                # The slice ran out, waiting or retrying a failing backend (whose
                # receives recover a message whose reply was lost): go on in the
                # next slice while the collective's deadline allows.
                if wait >= remaining:
                    if isinstance(exc, BackendUnavailable):
                        raise
                    raise CommTimeout(f"{self.op} (collective #{self.seq}): {exc}{who}") from None
            waited += wait
            await self._look_for_abort(src, waited)
            piece = min(piece * 2, ABORT_PROBE_MAX)

    async def _send_probe(self, dst: int) -> None:
        if self._probed is None:
            self._probed = set()
        elif dst in self._probed:
            return
        self._probed.add(dst)
        try:
            await self.channel.send(dst, ("q", self.seq), plan_probe(self.plan))
        except Exception as exc:  # best effort: the wait goes on and its deadline holds
            logger.debug("%r: plan probe to peer %d failed: %r", self, dst, exc)

    async def _look_for_abort(self, src: int | None, waited: float) -> None:
        if self.mailbox is not None:
            verdict = self.mailbox.aborted(self.seq)
            if verdict is not None:
                raise verdict
        storage = self._mediated()
        if not self._published and waited >= PLAN_PROBE_AFTER:
            self._published = True
            await storage.put(("q", self.seq, self.rank), plan_probe(self.plan))
        try:
            payload = await storage.get(("a", self.seq), 0)
        except CommTimeout:
            pass  # nobody gave up
        else:
            raise abort_error(payload, self.seq, self.rank)
        if src is None or src == self.rank:
            return
        try:
            theirs = await storage.get(("q", self.seq, src), 0)
        except CommTimeout:
            return  # it has not waited long yet, or is just slow
        plan = loads(theirs)[0]
        if plan != self.plan:
            raise plan_mismatch(self._what, self.rank, self.plan, src, plan)

    async def recv(self, src: int, step: Step) -> Any:
        if self.direct:  # one coroutine less than through recv_payload
            return self.unpack(await self._recv_direct(src, self.key(step), step), src)
        return self.unpack(await self.recv_payload(src, step), src)

    async def sendrecv(self, dst: int, value: Any, src: int, step: Step) -> Any:
        """Send to ``dst`` and receive from ``src`` concurrently (an exchange)."""
        if self.direct:
            # A direct channel delivers into the mailbox whether a receive waits or
            # not, and none of its sends waits for the other peer to receive: the
            # send then the receive, in this task, is the same exchange without
            # a task of its own (the receive's message may arrive meanwhile).
            payload = self.pack(value)
            key = self.key(step)
            if self.channel.send_waits(dst):
                await self.send_payload(dst, step, payload)
            else:
                await self.channel.send(dst, key, payload)
            return self.unpack(await self._recv_direct(src, key, step), src)
        # Storage: the receive (a poll) waits in a task while the send runs in the caller's.
        receive = asyncio.ensure_future(self.recv(src, step))
        try:
            await self.send(dst, step, value)
        except BaseException:
            receive.cancel()
            with contextlib.suppress(BaseException):
                await receive
            raise
        return await receive

    # -- storage (mediated channels) ------------------------------------------

    def _mediated(self) -> StorageOps:
        if not hasattr(self.channel, "put") or not hasattr(self.channel, "get"):
            raise ArgumentError(
                f"channel {self.channel.name} is not a storage channel (it has no put/get)"
            )
        return self.channel

    async def put(self, step: Step, value: Any) -> None:
        payload = self.pack(value)
        if self.deadline is None:
            await self._mediated().put(self.key(step), payload)
            return
        # a put retried through a storage outage stops at the collective's deadline
        await self._bounded(self._mediated().put(self.key(step), payload), "could not store data")

    async def get(self, step: Step, origin: int | str = "storage") -> Any:
        key = self.key(step)
        storage = self._mediated()

        async def fetch(seconds: float) -> Payload:
            return await storage.get(key, seconds)

        who = f" (peer {origin} stores it)" if isinstance(origin, int) else ""
        src = origin if isinstance(origin, int) else None
        return self.unpack(await self._sliced(fetch, who, src), origin)
