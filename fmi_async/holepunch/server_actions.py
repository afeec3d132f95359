"""What the rendezvous core and its adapters share: links, actions, limits, waiting requests.

The core (:mod:`~fmi_async.holepunch.server_core`) decides; the adapters
(:mod:`~fmi_async.holepunch.server`) move bytes and run timers.  Between
them: a :class:`Link` names where a request came from (a TCP connection, or
a UDP endpoint), the actions say what to do (:class:`Send`, :class:`Close`,
:class:`Splice`, :class:`StartTimer`, :class:`StopTimer`),
:class:`ServerLimits` holds every bound, and :class:`WaitTable` remembers
the requests answered later, by the link they came on and by what they
wait for.  Nothing here does I/O or decides anything.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, fields

from ..errors import ArgumentError
from .messages import Message, Transport
from .net import Address

__all__ = [
    "Link",
    "Send",
    "Close",
    "Splice",
    "StartTimer",
    "StopTimer",
    "Action",
    "ServerLimits",
    "Wait",
    "WaitTable",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Link:
    """Where a request came from and where its answers go.

    A TCP connection is one link (``number`` tells connections apart); over
    UDP the observed endpoint is the link.
    """

    transport: Transport
    observed: Address | None
    number: int = 0


@dataclass(frozen=True, slots=True)
class Send:
    link: Link
    message: Message


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``link`` once what was sent to it is out (nothing to do over UDP)."""

    link: Link


@dataclass(frozen=True, slots=True)
class Splice:
    """Join two TCP links into a relay, byte for byte, until both ends closed."""

    a: Link
    b: Link


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call the core's ``timer(token, now)`` after ``seconds`` (unless stopped)."""

    token: int
    seconds: float


@dataclass(frozen=True, slots=True)
class StopTimer:
    token: int


Action = Send | Close | Splice | StartTimer | StopTimer


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Every bound of the rendezvous server, in seconds or counts.

    Raises :class:`~fmi_async.errors.ArgumentError` for a value that cannot
    work (a timeout or a count that is not positive).
    """

    handshake_timeout: float = 5.0  # a new connection's first request, and every message begun
    max_unproven: int = 1024  # connections without a valid request yet, in all
    max_unproven_per_source: int = 32  # ...and from one source address
    ttl: float = 3600.0  # a registration's life unless renewed
    default_lookup_timeout: float = 30.0  # a lookup's or join's wait when it names none
    max_lookup_timeout: float = 600.0  # and the most any may ask for
    idle_timeout: float = 60.0  # a connection with nothing going on
    max_entries: int = 100_000  # registrations, and job lease records
    max_pending: int = 10_000  # lookups waiting for their peer
    max_connections: int = 4096
    max_pairings: int = 10_000
    result_timeout: float = 30.0  # for the second punch report after the first
    relay_memory: float = 600.0  # a TCP pair relayed lately is relayed again without punching
    relay_wait: float = 30.0  # for the second side of a relay
    relay_idle_timeout: float = 3600.0
    max_relays: int = 1024

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ArgumentError(f"the rendezvous server's {spec.name} must be positive")


@dataclass(slots=True)
class Wait:
    """A request answered later: by another request, or when its timer runs out."""

    token: int
    link: Link
    message: Message
    index: Hashable  # what it waits for
    seconds: float = 0.0
    state: object = None  # the core's own, per kind of request


class WaitTable:
    """Waiting requests by token, by link and by what they wait for."""

    def __init__(self) -> None:
        self._waits: dict[int, Wait] = {}
        self._by_link: dict[Link, set[int]] = {}
        self._by_index: dict[Hashable, dict[int, Wait]] = {}
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._waits)

    def __repr__(self) -> str:
        return f"<WaitTable waits={len(self._waits)} links={len(self._by_link)}>"

    def add(self, link: Link, message: Message, index: Hashable, seconds: float) -> Wait:
        self._tokens += 1
        wait = Wait(self._tokens, link, message, index, seconds)
        self._waits[wait.token] = wait
        self._by_link.setdefault(link, set()).add(wait.token)
        self._by_index.setdefault(index, {})[wait.token] = wait
        return wait

    def get(self, token: int) -> Wait | None:
        return self._waits.get(token)

    def waiting_for(self, index: Hashable) -> list[Wait]:
        """The requests waiting for ``index``, oldest first."""
        return list(self._by_index.get(index, {}).values())

    def count(self, index: Hashable) -> int:
        return len(self._by_index.get(index, ()))

    def of_link(self, link: Link) -> list[Wait]:
        return [self._waits[token] for token in self._by_link.get(link, ())]

    def forget(self, wait: Wait) -> Wait:
        """Drop ``wait`` from every index; returns it."""
        self._waits.pop(wait.token, None)
        tokens = self._by_link.get(wait.link)
        if tokens is not None:
            tokens.discard(wait.token)
            if not tokens:
                del self._by_link[wait.link]
        waits = self._by_index.get(wait.index)
        if waits is not None:
            waits.pop(wait.token, None)
            if not waits:
                del self._by_index[wait.index]
        return wait
