"""Pairings and their arbitration, without I/O (time is passed in).

A pairing is named ``(comm, run_id, transport, initiator, responder)``.  Each
side *joins* it with the endpoint the server observed for it; when both have
joined, each learns the other's endpoints.  Each then *reports* whether
punching worked, and the table decides: ``direct`` only if both succeeded,
otherwise ``relay``.  Whoever reports, or asks again, later gets the same
outcome, so the two sides can never disagree about how their traffic flows
(FMI's TCPunch has no such step: one side may believe in a connection the
other gave up on).

A TCP pair is one connection per direction, so two peers that cannot punch
would pair (and wait for the punch deadline) twice.  A ``relay`` verdict for
TCP is therefore remembered per *unordered* pair for ``relay_memory``
seconds: a later TCP pairing of the same two peers in the same communicator
and run is decided ``relay`` the moment its second side joins, and both sides
learn it together, before anyone punches.  ``direct`` verdicts are not
reused (each direction punches its own connection), nor are UDP ones (a UDP
pair is paired once anyway).

A UDP pair decided ``relay`` talks through the server: the table keeps the
two endpoints the pairing observed, by the pairing's nonce, and
:meth:`PairingTable.relay_target` tells where a relayed datagram goes (only
from one of the two, to the other), so the server relays for nobody else.

Everything is bounded: the number of open pairings, how long a pairing waits
for its second side (``join_timeout``), how long a decided one is remembered
(``keep``), how long a ``relay`` verdict allows opening a relay, how many
remembered relay verdicts are kept (``max_pairings``, oldest dropped first),
and how many UDP relays (``max_relays``, the one idle longest dropped
first, and any idle for ``relay_idle_timeout``).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .messages import NONCE_LEN, Outcome
from .net import Address

__all__ = ["PairKey", "Side", "Pairing", "PairingTable"]

logger = logging.getLogger(__name__)

PairKey = tuple[str, str, str, int, int]  # comm, run_id, transport, initiator, responder
PeerPair = tuple[str, str, int, int]  # comm, run_id, lower peer, higher peer


@dataclass
class Side:
    """One side's view: where the server saw it and what it said about itself."""

    observed: Address
    local: Address
    request_id: int | None = None
    result: bool | None = None
    link: Any = None  # where the server answers this side; opaque here


@dataclass(eq=False)
class Pairing:
    key: PairKey
    expires: float
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(NONCE_LEN))
    sides: dict[int, Side] = field(default_factory=dict)
    outcome: Outcome | None = None
    reported_at: float | None = None
    reused: bool = False  # decided from a remembered relay verdict, nobody punched

    def __repr__(self) -> str:
        return f"<Pairing {self.key} sides={sorted(self.sides)} outcome={self.outcome}>"

    @property
    def complete(self) -> bool:
        return len(self.sides) == 2

    def other(self, peer: int) -> int:
        _, _, _, initiator, responder = self.key
        return responder if peer == initiator else initiator


class PairingTable:
    """Open pairings in creation order, so expiry scans only the front."""

    def __init__(
        self,
        *,
        join_timeout: float = 60.0,
        result_timeout: float = 30.0,
        keep: float = 60.0,
        relay_memory: float = 600.0,
        max_pairings: int = 10_000,
        max_relays: int = 1024,
        relay_idle_timeout: float = 3600.0,
    ) -> None:
        self.join_timeout = join_timeout
        self.result_timeout = result_timeout
        self.keep = keep
        self.relay_memory = relay_memory
        self.max_pairings = max_pairings
        self.max_relays = max_relays
        self.relay_idle_timeout = relay_idle_timeout
        self._pairings: OrderedDict[PairKey, Pairing] = OrderedDict()
        self._relays: OrderedDict[tuple[str, str, int, int], float] = OrderedDict()
        # TCP relay verdicts per unordered pair, until when; oldest first
        self._remembered: OrderedDict[PeerPair, float] = OrderedDict()
        self.decided: Counter[str] = Counter()  # outcomes so far, for summaries
        # The latest outcome per transport and unordered pair of peers (a pair
        # pairs again after a lost connection, or once per direction): what a
        # summary counts, one entry per pair; bounded like the table.
        self.outcomes: OrderedDict[tuple[str, PeerPair], Outcome] = OrderedDict()
        self.reused = 0  # pairings decided from a remembered relay verdict
        # UDP relays by pairing nonce, the one idle longest first: both endpoints, last use
        self._udp_relays: OrderedDict[bytes, tuple[Address, Address, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pairings)

    def __repr__(self) -> str:
        return f"<PairingTable pairings={len(self._pairings)}/{self.max_pairings}>"

    def get(self, key: PairKey) -> Pairing | None:
        return self._pairings.get(key)

    def expire(self, now: float) -> list[Pairing]:
        """Drop pairings past their time; the undecided ones are returned."""
        dropped = []
        for key, pairing in list(self._pairings.items()):
            if pairing.expires > now:
                continue
            del self._pairings[key]
            if pairing.outcome is None:
                dropped.append(pairing)
        while self._relays:
            rkey, until = next(iter(self._relays.items()))
            if until > now:
                break
            del self._relays[rkey]
        while self._remembered:
            pair, until = next(iter(self._remembered.items()))
            if until > now:
                break
            del self._remembered[pair]
        return dropped

    def remembered_relay(self, comm: str, run_id: str, a: int, b: int, now: float) -> bool:
        """Whether a TCP pairing of peers ``a`` and ``b`` (either way) was relayed lately."""
        until = self._remembered.get(_peer_pair(comm, run_id, a, b))
        return until is not None and until > now

    def join(
        self,
        key: PairKey,
        peer: int,
        observed: Address,
        local: Address,
        now: float,
        request_id: int | None = None,
        link: Any = None,
    ) -> Pairing | None:
        """Add ``peer``'s side; None when the table is full.

        A join to a decided pairing starts a new one (the peers pair again,
        say after a lost connection).  A side joining again before the
        outcome (a retransmitted UDP join) updates its side in place.
        """
        self.expire(now)
        pairing = self._pairings.get(key)
        if pairing is not None and pairing.outcome is not None:
            del self._pairings[key]
            pairing = None
        if pairing is None:
            if len(self._pairings) >= self.max_pairings:
                return None
            pairing = Pairing(key, now + self.join_timeout)
            self._pairings[key] = pairing
        side = pairing.sides.get(peer)
        if (
            side is not None
            and side.result is not None
            and (side.observed, side.local)
            != (
                observed,
                local,
            )
        ):
            # The same peer from elsewhere after it reported: a fresh attempt.
            del self._pairings[key]
            return self.join(key, peer, observed, local, now, request_id, link)
        pairing.sides[peer] = Side(observed, local, request_id, link=link)
        if pairing.complete:
            pairing.expires = max(pairing.expires, now + self.result_timeout + self.keep)
            comm, run_id, transport, initiator, responder = key
            if (
                pairing.outcome is None
                and transport == "tcp"
                and self.remembered_relay(comm, run_id, initiator, responder, now)
            ):
                # Both sides are in: they hear the verdict together, nobody punches.
                pairing.reused = True
                self.reused += 1
                self.decide(key, "relay", now)
        return pairing

    def report(self, key: PairKey, peer: int, ok: bool, now: float) -> Outcome | None:
        """Record ``peer``'s punch result; the outcome once both reported (or decided)."""
        pairing = self._pairings.get(key)
        if pairing is None or peer not in pairing.sides:
            return None
        if pairing.outcome is not None:
            return pairing.outcome
        pairing.sides[peer].result = ok
        if pairing.reported_at is None:
            pairing.reported_at = now
        results = [s.result for s in pairing.sides.values()]
        if pairing.complete and None not in results:
            return self.decide(key, "direct" if all(results) else "relay", now)
        return None

    def decide(self, key: PairKey, outcome: Outcome, now: float) -> Outcome:
        """Fix the outcome (a missing report counts as failure); it never changes after."""
        pairing = self._pairings[key]
        if pairing.outcome is None:
            pairing.outcome = outcome
            pairing.expires = now + self.keep
            self.decided[outcome] += 1
            comm, run_id, _, initiator, responder = key
            latest = (key[2], _peer_pair(comm, run_id, initiator, responder))
            self.outcomes[latest] = outcome
            self.outcomes.move_to_end(latest)
            while len(self.outcomes) > self.max_pairings:
                self.outcomes.popitem(last=False)
            if outcome == "relay":
                self._relays[(comm, run_id, initiator, responder)] = now + self.keep
                self._relays.move_to_end((comm, run_id, initiator, responder))
                while len(self._relays) > self.max_pairings:
                    self._relays.popitem(last=False)
                if key[2] == "udp" and pairing.complete:
                    self._open_udp_relay(pairing, now)
                if key[2] == "tcp" and not pairing.reused:
                    # Only a verdict from real punching starts (or restarts) the memory.
                    pair = _peer_pair(comm, run_id, initiator, responder)
                    self._remembered[pair] = now + self.relay_memory
                    self._remembered.move_to_end(pair)
                    while len(self._remembered) > self.max_pairings:
                        self._remembered.popitem(last=False)
            again = " (remembered for this pair)" if pairing.reused else ""
            logger.debug("pairing %s/%s %s %d->%d: %s%s", *key, outcome, again)
        return pairing.outcome

    def overdue(self, key: PairKey, now: float) -> bool:
        """True when one side reported and the other has not within ``result_timeout``."""
        pairing = self._pairings.get(key)
        return (
            pairing is not None
            and pairing.outcome is None
            and pairing.reported_at is not None
            and now - pairing.reported_at >= self.result_timeout
        )

    def relay_allowed(
        self, comm: str, run_id: str, initiator: int, responder: int, now: float
    ) -> bool:
        until = self._relays.get((comm, run_id, initiator, responder))
        return until is not None and until > now

    def _open_udp_relay(self, pairing: Pairing, now: float) -> None:
        (a, side_a), (b, side_b) = pairing.sides.items()
        self._udp_relays[pairing.nonce] = (side_a.observed, side_b.observed, now)
        while len(self._udp_relays) > self.max_relays:
            self._udp_relays.popitem(last=False)
        logger.debug("pairing %s: relaying udp %d<->%d", pairing.key, a, b)

    def relay_target(self, nonce: bytes, source: Address, now: float) -> Address | None:
        """Where a datagram of the UDP relay ``nonce`` from ``source`` goes, or None."""
        relay = self._udp_relays.get(nonce)
        if relay is None:
            return None
        a, b, used = relay
        if now - used > self.relay_idle_timeout:
            del self._udp_relays[nonce]
            return None
        if source not in (a, b):
            return None
        self._udp_relays[nonce] = (a, b, now)
        self._udp_relays.move_to_end(nonce)
        return b if source == a else a


def _peer_pair(comm: str, run_id: str, a: int, b: int) -> PeerPair:
    return (comm, run_id, min(a, b), max(a, b))
