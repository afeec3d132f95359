"""Admission of unproven connections: bounded, per source, oldest evicted first.

A peer's listening port and the rendezvous server accept connections from
anyone who can reach them.  Until a connection has proved itself (the
membership handshake on a peer's port; a first complete, valid request at
the server) it is *unproven*, and unproven connections must not be able to
crowd out the legitimate ones.  :class:`Admission` is the policy, without any
I/O (sans-IO, like the protocol), so both places share it and it is tested
without sockets:

* at most ``max_per_source`` unproven connections older than ``grace``
  seconds from one source address: a new one from a source at its limit
  evicts that source's oldest, so a source holding idle or slowloris
  connections only ever pushes out its own.  Connections younger than
  ``grace`` are left alone by this rule: a burst of honest connections from
  one address (peers on one host, functions behind one NAT gateway) is
  normal, and each of them proves itself within a round trip;
* at most ``max_total`` unproven connections in all, whatever their age: a
  new one evicts the oldest of all instead of being refused.

Evicting the oldest rather than refusing the newest is what keeps an honest
peer in: idle or slowloris connections are old by the time it arrives, and
its own handshake completes within a round trip, long before it becomes the
oldest.  (Refusing the newest, the behaviour this replaces, let about 64
idle connections lock every later one out.)  An attacker who opens
connections faster than one per ``max_total`` round trips can still evict
honest handshakes; the connecting side retries, and a sustained flood ends
in a clear error there, never a hang.  Together with a short handshake
deadline (``security.handshake_timeout``) this bounds what strangers can
hold: ``max_total`` sockets for at most that long each.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from ..errors import ArgumentError

__all__ = ["Admission"]

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Hashable)


class Admission(Generic[T]):
    """Unproven connections by age and source; see the module doc.

    ``admit`` returns the connections the caller must now close (at most two:
    the source's oldest and the overall oldest); ``settle`` forgets one that
    proved itself or ended.  ``evicted`` counts evictions, for logs and stats.
    Raises :class:`~fmi_async.errors.ArgumentError` for a limit below 1 or a
    negative ``grace``.
    """

    def __init__(self, max_total: int, max_per_source: int, grace: float = 0.5) -> None:
        if max_total < 1 or max_per_source < 1 or grace < 0:
            raise ArgumentError("admission limits must be at least 1, grace at least 0")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.grace = grace
        self.evicted = 0
        self._all: OrderedDict[T, str] = OrderedDict()  # oldest first
        self._by_source: dict[str, OrderedDict[T, float]] = {}  # oldest first, admission time
        self._warned_at: float | None = None
        self._unreported = 0

    def __repr__(self) -> str:
        return (
            f"<Admission unproven={len(self._all)}/{self.max_total} "
            f"sources={len(self._by_source)} per_source<={self.max_per_source} "
            f"evicted={self.evicted}>"
        )

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, conn: object) -> bool:
        return conn in self._all

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._all))

    def count(self, source: str) -> int:
        """Unproven connections from ``source`` now."""
        return len(self._by_source.get(source, ()))

    def admit(self, conn: T, source: str, now: float) -> list[T]:
        """Take ``conn`` (from ``source``, at time ``now``) in; returns the ones evicted for it."""
        if conn in self._all:
            return []
        evicted: list[T] = []
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.max_per_source:
            oldest, since = next(iter(mine.items()))
            if now - since >= self.grace:
                evicted.append(oldest)
                self.settle(oldest)
        if len(self._all) >= self.max_total:
            evicted.append(next(iter(self._all)))
            self.settle(evicted[-1])
        self._all[conn] = source
        self._by_source.setdefault(source, OrderedDict())[conn] = now
        self.evicted += len(evicted)
        self._unreported += len(evicted)
        return evicted

    def settle(self, conn: T) -> bool:
        """Forget ``conn`` (it proved itself, failed or closed); False if it was not here."""
        source = self._all.pop(conn, None)
        if source is None:
            return False
        mine = self._by_source[source]
        del mine[conn]
        if not mine:
            del self._by_source[source]
        return True

    def report(self, now: float, every: float = 10.0) -> int:
        """Evictions not yet reported, if a report is due (at most one per ``every`` s), else 0.

        Under a flood every eviction would otherwise be a log line; callers
        log a WARNING with the count this returns instead.
        """
        if not self._unreported:
            return 0
        if self._warned_at is not None and now - self._warned_at < every:
            return 0
        count, self._unreported, self._warned_at = self._unreported, 0, now
        return count
