"""Cancellation-safe receives from channels that consume in their backend.

:class:`ReceiveGuard` is the storage channels' counterpart of the mailbox's
hand-back of a message whose waiter was cancelled (DESIGN.md section 8:
"a cancelled or timed-out receive never drops a delivered message").
:mod:`fmi_async.channels.mailbox` re-exports it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import CommTimeout
from ..wire import Key, Payload

if TYPE_CHECKING:
    from .base import Channel

__all__ = ["ReceiveGuard"]

logger = logging.getLogger(__name__)


class ReceiveGuard:
    """Cancellation-safe receives from channels that consume in their backend.

    A storage channel's ``recv`` takes the message out of Redis, S3 or
    DynamoDB; a caller cancelled at that moment would drop it.  Here the
    receive runs in a task that a cancellation of the caller does not stop:
    what it fetches goes to the next receive of the same ``(source, key)``.
    The task ends by itself at its own timeout.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[int, Key], asyncio.Task[Payload]] = {}

    def __repr__(self) -> str:
        return f"<ReceiveGuard pending={len(self._pending)}>"

    async def recv(self, channel: Channel, src: int, key: Key, timeout: float | None) -> Payload:
        match = (src, key)
        inherited = self._pending.pop(match, None)
        if inherited is not None:
            try:
                return await self._wait(match, inherited)
            except CommTimeout:
                pass  # the earlier caller's shorter wait ran out: wait anew with ours
        task = asyncio.ensure_future(channel.recv(src, key, timeout))
        task.add_done_callback(_retrieve)
        return await self._wait(match, task)

    async def _wait(self, match: tuple[int, Key], task: asyncio.Task[Payload]) -> Payload:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() or (not task.cancelled() and task.exception() is None):
                self._pending[match] = task  # running, or holding a message: hand it on
            raise

    def cancel(self) -> None:
        """Stop the receives that nobody waits for any more (the channel is closing)."""
        for task in self._pending.values():
            task.cancel()
        self._pending.clear()


def _retrieve(task: asyncio.Task[Payload]) -> None:
    # A receive abandoned by its caller may still fail; its error is nobody's.
    if not task.cancelled():
        task.exception()
