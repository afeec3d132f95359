"""A sub-communicator's view of one of its parent's channels.

A sub-communicator (:meth:`fmi_async.Communicator.split`, ``dup``,
``create_group``) shares its parent's channels -- connections, pools,
punched holes -- but never its messages.  A view translates the
sub-communicator's ranks to the parent's and puts every key it sends or
stores under the sub-communicator's scope, ``("g", scope, key...)``:

* on a direct channel the parent's :class:`~fmi_async.channels.mailbox.Mailbox`
  routes such a message to the sub-communicator's mailbox
  (:meth:`~fmi_async.channels.mailbox.Mailbox.adopt`), under the sender's
  rank there, so matching, aborts and plan agreement work on the
  sub-communicator's own sequence numbers;
* on a storage channel the scope is part of every stored name, so two
  sub-communicators (or one and its parent) never read each other's objects.

Closing a view fails the waits of its sub-communicator and nothing else; the
parent's close closes the channel itself (deleting whatever the
sub-communicator stored).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from ..errors import ArgumentError, ClosedError
from ..wire import Key, Payload
from .base import Channel, ChannelContext, ChannelStats, DirectChannel, MediatedChannel
from .mailbox import SCOPE, Mailbox

__all__ = ["DirectView", "StorageView", "view"]

logger = logging.getLogger(__name__)


class _View(Channel):
    """What both views share: the parent channel, the scope and the rank map."""

    parent: Channel
    scope: str
    members: tuple[int, ...]

    def _setup(
        self, parent: Channel, scope: str, members: Sequence[int], rank: int, mailbox: Mailbox
    ) -> None:
        self.parent = parent
        self.scope = scope
        self.members = tuple(members)
        self.ctx = ChannelContext(
            rank, len(members), parent.comm_name, parent.run_id, parent.config, mailbox
        )
        self.peer_id = rank
        self.num_peers = len(members)
        self.comm_name = parent.comm_name
        self.run_id = parent.run_id
        self.config = parent.config
        self.options = parent.options
        self.mailbox = mailbox
        self.stats = ChannelStats()
        self._state = "open"
        self._waits: set[asyncio.Future[Payload]] = set()

    async def close(self) -> None:
        """Fail this view's waits with ClosedError: those on the sub-communicator's
        mailbox and those polling the parent's storage (which stays open)."""
        await super().close()
        for wait in list(self._waits):
            wait.cancel()

    async def _until_closed(self, waiting: Awaitable[Payload]) -> Payload:
        """``waiting`` (a wait on the parent's channel), ended by this view's close."""
        task = asyncio.ensure_future(waiting)
        self._waits.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._state != "open" and (current is None or not current.cancelling()):
                raise ClosedError(
                    f"sub-communicator {self.scope}: channel view was closed while waiting"
                ) from None
            raise
        finally:
            self._waits.discard(task)

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._usable()
        start = time.perf_counter()
        await self.parent.send(self._peer(dst, "destination"), self._key(key), payload)
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    def _peer(self, rank: int, what: str) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(self.members):
            raise ArgumentError(
                f"{what} {rank!r} is out of range: this sub-communicator has peers "
                f"0..{len(self.members) - 1}"
            )
        return self.members[rank]

    def _key(self, key: Key) -> Key:
        return (SCOPE, self.scope, *key)

    def _usable(self) -> None:
        if self._state != "open":
            raise ClosedError(f"sub-communicator {self.scope}: channel view is {self._state}")
        if not self.parent.is_open:
            raise ClosedError(
                f"sub-communicator {self.scope}: the parent's channel {self.parent.name} is closed"
            )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} of {self.parent.name} scope={self.scope} "
            f"peer={self.peer_id}/{self.num_peers} {self._state}>"
        )


class DirectView(_View, DirectChannel):
    """A direct channel of the parent, seen by a sub-communicator."""

    def __init__(
        self, parent: Channel, scope: str, members: Sequence[int], rank: int, mailbox: Mailbox
    ) -> None:
        self.name = parent.name  # type: ignore[misc]  # the parent's, per instance
        self._setup(parent, scope, members, rank, mailbox)

    def send_waits(self, dst: int) -> bool:
        return self.parent.send_waits(self._peer(dst, "destination"))

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        self._peer(src, "source")
        self._usable()
        return await super().recv(src, key, timeout)


class StorageView(_View, MediatedChannel):
    """A storage channel of the parent, seen by a sub-communicator."""

    parent: MediatedChannel

    def __init__(
        self,
        parent: MediatedChannel,
        scope: str,
        members: Sequence[int],
        rank: int,
        mailbox: Mailbox,
    ) -> None:
        self.name = parent.name  # type: ignore[misc]  # the parent's, per instance
        self._setup(parent, scope, members, rank, mailbox)

    def location(self) -> str:
        return self.parent.location()

    def send_waits(self, dst: int) -> bool:
        return True

    def all_delivered(self) -> None:
        pass  # the parent's final barrier speaks for its channels

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        peer = self._peer(src, "source")
        self._usable()
        start = time.perf_counter()
        payload = await self._until_closed(self.parent.recv(peer, self._key(key), timeout))
        self.stats.received(payload, start)
        return payload

    async def put(self, key: Key, payload: Payload) -> None:
        self._usable()
        start = time.perf_counter()
        await self.parent.put(self._key(key), payload)
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    async def get(self, key: Key, timeout: float | None) -> Payload:
        self._usable()
        start = time.perf_counter()
        payload = await self._until_closed(self.parent.get(self._key(key), timeout))
        self.stats.received(payload, start)
        return payload

    async def delete(self, keys: Iterable[Key]) -> None:
        self._usable()
        await self.parent.delete([self._key(k) for k in keys])

    async def sweep(
        self, prefix: str, select: Callable[[str], bool], *, dry_run: bool = False
    ) -> list[str]:
        return await self.parent.sweep(prefix, select, dry_run=dry_run)


def view(
    parent: Channel, scope: str, members: Sequence[int], rank: int, mailbox: Mailbox
) -> Channel:
    """The view of ``parent`` for the sub-communicator ``scope`` whose rank ``r`` is
    the parent's rank ``members[r]``; this peer is its rank ``rank``."""
    if isinstance(parent, MediatedChannel):
        return StorageView(parent, scope, members, rank, mailbox)
    return DirectView(parent, scope, members, rank, mailbox)
