"""Who registered where, with expiry: the rendezvous server's table of peers, without I/O.

Entries are keyed ``(comm, run_id, peer)`` and live ``ttl`` seconds unless
renewed; time is passed in, so expiry is tested without sockets or sleeping.
Who may take an entry someone else holds is the server core's decision
(:mod:`~fmi_async.holepunch.server_core`); the table only remembers the
owner and when it last renewed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from .net import Address

__all__ = ["EntryKey", "Registry"]

logger = logging.getLogger(__name__)

EntryKey = tuple[str, str, int]  # comm, run_id, peer


class Registry:
    """Who registered where, with expiry; pure bookkeeping, time passed in.

    Entries live in insertion order and a renewal moves one to the end, so
    with one TTL for all the stale entries are always at the front and expiry
    is amortised O(1).
    """

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[EntryKey, tuple[Address, float]] = OrderedDict()
        self._nat: dict[EntryKey, bool] = {}
        self._owners: dict[EntryKey, object] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<Registry entries={len(self._entries)}/{self.max_entries} ttl={self.ttl}>"

    def expire(self, now: float) -> int:
        """Drop the entries whose TTL has passed; returns how many."""
        dropped = 0
        while self._entries:
            key, (_, expires) = next(iter(self._entries.items()))
            if expires > now:
                break
            del self._entries[key]
            self._nat.pop(key, None)
            self._owners.pop(key, None)
            dropped += 1
        return dropped

    def register(
        self, key: EntryKey, addr: Address, now: float, nat: bool = False, owner: object = None
    ) -> bool:
        """Add or renew an entry for ``owner``; False if the table is full.

        Whether ``owner`` may take an entry someone else holds is the
        caller's decision (:meth:`owner` and :meth:`renewed` tell it who
        holds it and since when).
        """
        self.expire(now)
        if key not in self._entries and len(self._entries) >= self.max_entries:
            return False
        self._entries[key] = (addr, now + self.ttl)
        self._nat[key] = nat
        self._owners[key] = owner
        self._entries.move_to_end(key)
        return True

    def owner(self, key: EntryKey, now: float) -> object:
        """Who holds the live entry ``key`` (None if nobody, or registered without an owner)."""
        return self._owners.get(key) if self.get(key, now) is not None else None

    def renewed(self, key: EntryKey) -> float | None:
        """When the entry was last registered or renewed."""
        entry = self._entries.get(key)
        return None if entry is None else entry[1] - self.ttl

    def get(self, key: EntryKey, now: float) -> Address | None:
        """The address of the live entry ``key``, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def behind_nat(self, key: EntryKey) -> bool:
        """Whether the peer's register showed an address translator in between."""
        return self._nat.get(key, False)
