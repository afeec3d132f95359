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
naming both, instead of silently mixing data or hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from ..channels.base import Channel
from ..errors import ArgumentError, CommTimeout, PlanMismatchError, ProtocolError
from ..wire import Payload, dumps, loads

__all__ = ["CollectiveContext", "StorageOps", "Step"]

logger = logging.getLogger(__name__)

Step = int | str | tuple[int | str, ...]


class StorageOps(Protocol):
    """The one-to-many operations storage channels add to :class:`Channel`."""

    async def put(self, key: tuple[str | int, ...], payload: Payload) -> None: ...

    async def get(self, key: tuple[str | int, ...], timeout: float | None) -> Payload: ...


class CollectiveContext:
    """Everything one collective call needs; created by the communicator."""

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
    ) -> None:
        self.rank = rank
        self.size = size
        self.seq = seq
        self.op = op
        self.plan = plan
        self.channel = channel
        self.deadline = deadline
        self.serializer = serializer

    def __repr__(self) -> str:
        return (
            f"<CollectiveContext {self.op}#{self.seq} rank={self.rank}/{self.size} "
            f"plan={self.plan} channel={self.channel.name}>"
        )

    # -- helpers --------------------------------------------------------------

    def key(self, step: Step) -> tuple[str | int, ...]:
        parts = step if isinstance(step, tuple) else (step,)
        return ("c", self.seq, *parts)

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise CommTimeout(
                f"{self.op} (collective #{self.seq}) on peer {self.rank} ran past its deadline "
                f"on channel {self.channel.name}"
            )
        return left

    def pack(self, value: Any) -> Payload:
        """Serialize ``value`` together with the plan identifier."""
        return dumps([self.plan, value], self.serializer)

    def unpack(self, payload: Payload, src: int | str) -> Any:
        try:
            plan, value = loads(payload)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"{self.op}: malformed collective message from {src}") from exc
        if plan != self.plan:
            raise PlanMismatchError(
                f"{self.op} (collective #{self.seq}): peer {self.rank} runs plan {self.plan!r} "
                f"but peer {src} sent a message under plan {plan!r}; every peer must call the "
                "same collectives in the same order with values of the same shape and dtype"
            )
        return value

    def _timeout(self, exc: CommTimeout) -> CommTimeout:
        return CommTimeout(f"{self.op} (collective #{self.seq}): {exc}")

    # -- point to point -------------------------------------------------------

    async def send_payload(self, dst: int, step: Step, payload: Payload) -> None:
        await self.channel.send(dst, self.key(step), payload)

    async def send(self, dst: int, step: Step, value: Any) -> None:
        await self.send_payload(dst, step, self.pack(value))

    async def recv_payload(self, src: int, step: Step) -> Payload:
        try:
            return await self.channel.recv(src, self.key(step), self.remaining())
        except CommTimeout as exc:
            raise self._timeout(exc) from None

    async def recv(self, src: int, step: Step) -> Any:
        return self.unpack(await self.recv_payload(src, step), src)

    async def sendrecv(self, dst: int, value: Any, src: int, step: Step) -> Any:
        """Send to ``dst`` and receive from ``src`` concurrently (an exchange)."""
        # The receive waits in a task, the send runs in the caller's: one task per exchange.
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
        await self._mediated().put(self.key(step), self.pack(value))

    async def get(self, step: Step, origin: int | str = "storage") -> Any:
        try:
            payload = await self._mediated().get(self.key(step), self.remaining())
        except CommTimeout as exc:
            who = f" (peer {origin} stores it)" if isinstance(origin, int) else ""
            raise CommTimeout(f"{self.op} (collective #{self.seq}): {exc}{who}") from None
        return self.unpack(payload, origin)
