"""The job lease protocol, sans-IO: the record and its transitions.

One :class:`LeaseRecord` per ``(comm_name, run_id)`` holds the job's random
*epoch* (drawn by the first claimant, created atomically), ``num_peers``,
one slot per peer (``peer -> nonce``, the nonce random per communicator
instance), the peers that released, a state (``forming``, ``complete``,
``poisoned``) and an expiry.  Every change is one of the pure functions
below; time is passed in.  The rendezvous server applies them to an
in-memory table (:mod:`fmi_async.holepunch.leases`); Redis, S3 and DynamoDB
read the record, apply a transition and write the result back with a
conditional write, repeating when another peer wrote first
(:class:`fmi_async.jobs.lease.StoreLease`).  This module is the reference both
follow.

* :func:`claim`: no live record -> create it and take the slot.  A record
  with another ``num_peers`` -> a mismatch; a slot held by another instance
  (or already released) -> a conflict.  While the record forms, and while a
  complete group *settles* (``settle`` seconds after it formed), a conflict
  or a mismatch **poisons** the record: the group may be a mix of two jobs,
  so every peer of it raises.  After that the running job is left alone: the
  claimant hears ``busy`` (or ``mismatch``) and waits or raises.
* :func:`observe`: what a peer that holds a slot sees while it waits for the
  others (formation is the open barrier, and checks ``num_peers`` on every
  peer): ``joined``, ``settling``, ``granted``, ``poisoned`` or ``lost``.
* :func:`refresh`: every ``lease_ttl / 3`` while open.  A record that vanished
  (a restarted server, a flushed Redis) is restored; one with another epoch
  means the lease was lost.
* :func:`release`: at close; the last release deletes the record.  While
  forming, a peer that gives up frees its slot instead.

A poisoned record lingers :data:`POISON_LINGER` seconds so that every forming
peer sees why it must fail, then expires.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from ..errors import (
    BackendError,
    FMIError,
    JobConflictError,
    JobMismatchError,
)

__all__ = [
    "LeaseRecord",
    "Step",
    "Outcome",
    "claim",
    "observe",
    "refresh",
    "release",
    "poison_error",
    "busy_message",
    "busy_timeout_message",
    "mismatch_message",
    "formation_timeout_message",
    "lost_forming_message",
    "POISON_LINGER",
    "FORM_GRACE",
    "EPOCH_BYTES",
    "NONCE_BYTES",
]

logger = logging.getLogger(__name__)

State = Literal["forming", "complete", "poisoned"]
Outcome = Literal["joined", "settling", "granted", "busy", "mismatch", "poisoned", "lost"]
PoisonKind = Literal["conflict", "mismatch"]

EPOCH_BYTES: Final = 6  # 12 hex characters in every key
NONCE_BYTES: Final = 16
POISON_LINGER: Final = 2.0
"""Seconds a poisoned record stays, so every forming peer sees why it must fail."""
FORM_GRACE: Final = 1.0
"""Seconds a forming record outlives the deadline of its last claimant."""


# ---------------------------------------------------------------- the record, sans-IO


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One job's lease on ``(comm_name, run_id)``; immutable, changed by the transitions."""

    epoch: str
    num_peers: int
    expires: float
    slots: Mapping[int, str] = field(default_factory=dict)
    released: frozenset[int] = frozenset()  # complete: closed; forming: gave up
    state: State = "forming"
    completed: float | None = None
    settle: float = 0.0
    poison: PoisonKind | None = None
    reason: str = ""

    def live(self, now: float) -> bool:
        return self.expires > now

    def settled(self, now: float) -> bool:
        """Complete, and past the window in which a straggler still poisons it."""
        return (
            self.state == "complete"
            and self.completed is not None
            and now >= self.completed + self.settle
        )

    def missing(self) -> list[int]:
        """Peers that never claimed their slot (while forming, ``released`` holds the
        peers that claimed and gave up)."""
        return sorted(set(range(self.num_peers)) - set(self.slots) - self.released)

    def arrived(self) -> list[int]:
        """Peers that claimed their slot, including those that gave up since."""
        return sorted(set(self.slots) | self.released)

    def encode(self) -> bytes:
        """JSON bytes, as the storage backends keep it (readable with any client)."""
        body = {
            "v": 1,
            "epoch": self.epoch,
            "num_peers": self.num_peers,
            "expires": self.expires,
            "slots": {str(peer): nonce for peer, nonce in sorted(self.slots.items())},
            "released": sorted(self.released),
            "state": self.state,
            "completed": self.completed,
            "settle": self.settle,
            "poison": self.poison,
            "reason": self.reason,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord:
        """Parse :meth:`encode`'s bytes; :class:`~fmi_async.errors.BackendError` on garbage."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.get("v") != 1:
                raise ValueError("not a version 1 lease record")
            state = body["state"]
            poison = body["poison"]
            if state not in ("forming", "complete", "poisoned"):
                raise ValueError(f"state {state!r}")
            if poison not in (None, "conflict", "mismatch"):
                raise ValueError(f"poison {poison!r}")
            completed = body["completed"]
            return cls(
                epoch=str(body["epoch"]),
                num_peers=int(body["num_peers"]),
                expires=float(body["expires"]),
                slots={int(peer): str(nonce) for peer, nonce in body["slots"].items()},
                released=frozenset(int(peer) for peer in body["released"]),
                state=state,
                completed=None if completed is None else float(completed),
                settle=float(body["settle"]),
                poison=poison,
                reason=str(body["reason"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"a job lease record is malformed ({exc}); is another program writing "
                "under this communicator's prefix?"
            ) from exc


@dataclass(frozen=True, slots=True)
class Step:
    """The result of a transition: what the peer learns, and what the backend must store.

    ``record`` is the record after the step (None: there is none, or it is to
    be deleted); ``write`` says the backend must write it (delete when None).
    """

    outcome: Outcome | Literal["released"]
    record: LeaseRecord | None
    write: bool = False


def _state_outcome(rec: LeaseRecord, now: float) -> Outcome:
    if rec.state == "forming":
        return "joined"
    return "granted" if rec.settled(now) else "settling"


def _complete_if_full(rec: LeaseRecord, now: float, ttl: float) -> LeaseRecord:
    if len(rec.slots) < rec.num_peers:
        return rec
    return replace(
        rec,
        state="complete",
        completed=now,
        expires=now + rec.settle + ttl,
        released=frozenset(),
    )


def _poison(rec: LeaseRecord, kind: PoisonKind, reason: str, now: float) -> LeaseRecord:
    return replace(
        rec,
        state="poisoned",
        poison=kind,
        reason=reason,
        expires=min(rec.expires, now + POISON_LINGER),
    )


def claim(
    rec: LeaseRecord | None,
    *,
    peer: int,
    nonce: str,
    num_peers: int,
    now: float,
    hold_until: float,
    ttl: float,
    settle: float,
    new_epoch: str,
) -> Step:
    """``peer`` (instance ``nonce``) asks for its slot in a job of ``num_peers``.

    ``hold_until`` is when this claimant gives up forming (a forming record
    lives at least that long), ``new_epoch`` the epoch of the record if this
    claim creates it.  Outcomes: ``joined`` / ``settling`` / ``granted`` (the
    slot is ours), ``busy`` (a settled job holds it), ``mismatch`` (a settled
    job of another size holds it), ``poisoned`` (the record is, possibly by
    this claim).
    """
    if rec is None or not rec.live(now):
        fresh = LeaseRecord(
            new_epoch,
            num_peers,
            hold_until,
            {peer: nonce},
            settle=settle if num_peers > 1 else 0.0,
        )
        fresh = _complete_if_full(fresh, now, ttl)
        return Step(_state_outcome(fresh, now), fresh, write=True)
    if rec.state == "poisoned":
        return Step("poisoned", rec)
    mine = rec.slots.get(peer) == nonce and peer not in rec.released
    if mine and rec.num_peers == num_peers:
        return observe(rec, peer=peer, nonce=nonce, epoch=rec.epoch, now=now)
    # A group that is forming, or complete but not settled, has not started:
    # whatever collides with it now may have mixed two jobs, so all of it fails.
    open_window = not rec.settled(now)
    if rec.num_peers != num_peers:
        if open_window:
            reason = (
                f"peer {peer} opened it with num_peers={num_peers} while it formed for "
                f"num_peers={rec.num_peers}"
            )
            return Step("poisoned", _poison(rec, "mismatch", reason, now), write=True)
        return Step("mismatch", rec)
    if peer in rec.slots:
        if open_window:
            reason = f"peer {peer} was opened twice while the job formed"
            return Step("poisoned", _poison(rec, "conflict", reason, now), write=True)
        return Step("busy", rec)
    taken = replace(
        rec,
        slots={**rec.slots, peer: nonce},
        released=rec.released - {peer},
        expires=max(rec.expires, hold_until),
    )
    taken = _complete_if_full(taken, now, ttl)
    return Step(_state_outcome(taken, now), taken, write=True)


def observe(rec: LeaseRecord | None, *, peer: int, nonce: str, epoch: str, now: float) -> Step:
    """What a peer holding a slot of ``epoch`` sees: ``joined``, ``settling``,
    ``granted``, ``poisoned``, or ``lost`` (the record or the slot is gone)."""
    if rec is None or not rec.live(now) or rec.epoch != epoch:
        return Step("lost", rec)
    if rec.state == "poisoned":
        return Step("poisoned", rec)
    if rec.slots.get(peer) != nonce:
        return Step("lost", rec)
    return Step(_state_outcome(rec, now), rec)


def refresh(
    rec: LeaseRecord | None,
    *,
    peer: int,
    nonce: str,
    epoch: str,
    num_peers: int,
    now: float,
    ttl: float,
) -> Step:
    """Keep an open job's record alive: ``granted`` (maybe with a write), or
    ``lost`` / ``poisoned``.

    A record that vanished (a restarted rendezvous server, a flushed Redis)
    is restored with this peer's slot; the others add theirs at their next
    refresh.  The expiry is pushed only when less than ``5/6 ttl`` is left,
    so usually one peer per period writes.
    """
    if rec is None or not rec.live(now):
        restored = LeaseRecord(
            epoch, num_peers, now + ttl, {peer: nonce}, state="complete", completed=now
        )
        return Step("granted", restored, write=True)
    if rec.epoch != epoch:
        return Step("lost", rec)
    if rec.state == "poisoned":
        return Step("poisoned", rec)
    holder = rec.slots.get(peer)
    if holder is not None and holder != nonce:
        return Step("lost", rec)
    updated = rec
    if holder is None:
        updated = replace(updated, slots={**rec.slots, peer: nonce})
    # Renewals come every ttl/3: with 5/6 ttl as the bar, a lease survives one
    # failed renewal with ttl/6 to spare, and still one peer per period writes.
    if rec.expires - now < ttl * 5 / 6:
        updated = replace(updated, expires=now + ttl)
    return Step("granted", updated, write=updated is not rec)


def release(rec: LeaseRecord | None, *, peer: int, nonce: str, epoch: str, now: float) -> Step:
    """Give this peer's slot back: ``released`` (write, or delete if last) or ``lost``.

    While forming, the slot is freed, so that the peer may come back as a
    new instance.  Once complete, it is marked released; when every peer
    released, the record is deleted.  An empty ``epoch`` matches any record
    in which this nonce holds the slot (a claim cancelled before its answer).
    """
    if (
        rec is None
        or not rec.live(now)
        or (epoch and rec.epoch != epoch)
        or rec.state == "poisoned"
        or rec.slots.get(peer) != nonce
    ):
        return Step("lost", rec)
    if rec.state == "forming":
        slots = {p: n for p, n in rec.slots.items() if p != peer}
        if not slots:
            return Step("released", None, write=True)
        left = rec.released | {peer}
        return Step("released", replace(rec, slots=slots, released=left), write=True)
    released = rec.released | {peer}
    if released >= set(range(rec.num_peers)):
        return Step("released", None, write=True)
    return Step("released", replace(rec, released=released), write=True)


# ---------------------------------------------------------------- messages and errors


def _where(comm: str, run_id: str) -> str:
    return f"communicator {comm!r} run {run_id!r}"


_DISTINCT = "give each job a distinct run_id (`fmi run` makes one per run)"


def poison_error(rec: LeaseRecord, comm: str, run_id: str) -> FMIError:
    """The error every peer of a poisoned record raises."""
    where = _where(comm, run_id)
    if rec.poison == "mismatch":
        return JobMismatchError(
            f"peers of {where} disagree on num_peers: {rec.reason}; every peer must pass the "
            f"same num_peers (if these are two jobs, {_DISTINCT})"
        )
    return JobConflictError(f"two jobs opened {where} at the same time ({rec.reason}); {_DISTINCT}")


def busy_message(rec: LeaseRecord, comm: str, run_id: str, now: float) -> str:
    return (
        f"another live job holds {_where(comm, run_id)} (epoch {rec.epoch}, "
        f"{rec.num_peers} peers, lease valid {max(0.0, rec.expires - now):.3g}s more); "
        f'{_DISTINCT}, or set job.on_conflict to "wait" to wait for it to close'
    )


def busy_timeout_message(rec: LeaseRecord | None, comm: str, run_id: str, waited: float) -> str:
    epoch = f" (epoch {rec.epoch})" if rec is not None else ""
    return (
        f"waited {waited:.3g}s, until the deadline, for another job holding "
        f"{_where(comm, run_id)}{epoch} to close; {_DISTINCT}"
    )


def mismatch_message(rec: LeaseRecord, comm: str, run_id: str, num_peers: int) -> str:
    return (
        f"this peer opens {_where(comm, run_id)} with num_peers={num_peers}, but the job "
        f"holding it has num_peers={rec.num_peers}; every peer must pass the same num_peers "
        f"(if that is another job, {_DISTINCT})"
    )


def formation_timeout_message(
    rec: LeaseRecord | None, comm: str, run_id: str, waited: float
) -> str:
    if rec is None:
        return f"the peers of {_where(comm, run_id)} did not all open within {waited:.3g}s"
    return (
        f"peers {rec.missing()} of {_where(comm, run_id)} did not open within {waited:.3g}s "
        f"(peers {rec.arrived()} did); did they start, with the same comm_name, run id and "
        "num_peers?"
    )


def lost_forming_message(comm: str, run_id: str) -> str:
    return (
        f"the lease record of {_where(comm, run_id)} vanished while the job formed: another "
        f"job opened the same name at the same time, or the record was deleted; {_DISTINCT}"
    )
