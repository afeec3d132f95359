"""Asking the rendezvous server again while it cannot be reached, within a deadline.

A rendezvous server restarts (a deploy, a crash and its supervisor) or is
unreachable for a moment; the requests of a running job must not fail at
once for that, nor cascade to the other peers.  :func:`retry_unreachable`
runs an attempt again after jittered, growing waits (the project's
:class:`~fmi_async.channels.backoff.Backoff`) while it fails with
:class:`~fmi_async.errors.BrokenChannelError`, until the caller's deadline;
the :class:`~fmi_async.holepunch.client.RendezvousClient` asks its lookups
and registers through it, and :func:`retry_pairing` a pairing's initiator.

A restarted server has lost its state: registrations, pairings, relay
verdicts.  Peers register again by themselves (their control connections
reconnect); a pairing is started again by its initiator, after a lookup that
waits for the responder's registration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeVar

from ..channels.backoff import Backoff
from ..errors import BrokenChannelError

if TYPE_CHECKING:
    from .client import RendezvousClient

__all__ = ["RENDEZVOUS_RETRY", "retry_pairing", "retry_unreachable"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

RENDEZVOUS_RETRY: Final = Backoff(initial=0.05, maximum=1.0)
"""Waits between attempts while the rendezvous server cannot be reached: a
restart takes a fraction of a second to a few seconds, and its peers must
register again before a pairing can go on."""


async def retry_unreachable(
    attempt: Callable[[], Awaitable[T]],
    deadline: float,
    where: str,
    what: str,
    backoff: Backoff = RENDEZVOUS_RETRY,
) -> T:
    """``await attempt()``, again while the server cannot be reached, until ``deadline``.

    ``deadline`` is in ``loop.time()`` seconds; one attempt is always made.
    An attempt that fails with :class:`~fmi_async.errors.BrokenChannelError`
    (refused or reset connection, the server closing it without an answer,
    an ``overloaded`` or ``internal`` refusal) is tried again after a wait
    from ``backoff``; no attempt starts after the deadline.  Raises the
    other errors at once, and, when the deadline comes first, a
    :class:`~fmi_async.errors.BrokenChannelError` that names the server
    (``where``), ``what`` failed, how often and for how long, chained to the
    last failure.  Only for attempts that are harmless to repeat.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    failures = 0
    delays = backoff.delays()
    while True:
        try:
            return await attempt()
        except BrokenChannelError as exc:
            failures += 1
            pause = next(delays)
            if loop.time() + pause >= deadline:
                raise BrokenChannelError(
                    f"{what}: {where} could not be reached for {loop.time() - start:.3g}s "
                    f"({failures} attempt(s)) within the call's deadline; last error: {exc}"
                ) from exc
            logger.debug("%s: %s; attempt %d in %.3gs", what, exc, failures + 1, pause)
            await asyncio.sleep(pause)


async def retry_pairing(
    client: RendezvousClient,
    comm: str,
    run_id: str,
    responder: int,
    pair_once: Callable[[float], Awaitable[T]],
    join_timeout: float,
    seconds: float,
) -> T:
    """The initiator's pairing: ``await pair_once(join_timeout)``, again while
    the server cannot be reached or drops the connection, for up to
    ``seconds`` (:func:`retry_unreachable`); a later attempt waits for the
    other side's join only as long as is left.

    Before it joins again it looks ``responder`` up, which waits until the
    responder has registered again: a restarted server knows nobody until the
    control connections come back, and invites only peers it knows.  Raises
    what ``pair_once`` and :meth:`RendezvousClient.lookup_info` raise.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    attempts = 0

    async def attempt() -> T:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            left = max(0.001, deadline - loop.time())
            await client.lookup_info(comm, run_id, responder, timeout=left)
        return await pair_once(max(0.001, min(join_timeout, deadline - loop.time())))

    what = f"pairing with peer {responder}"
    return await retry_unreachable(attempt, deadline, client._where, what)
