"""The rendezvous server's job leases, sans-IO: a table of lease records, and claims in progress.

:class:`LeaseTable` is pure bookkeeping with time passed in: it applies the
transitions of :mod:`fmi_async.jobs.record` to one record per
``(comm, run_id)``, atomically (the server is one event loop), and holds at
most ``max_records`` of them.  :class:`LeaseDesk` answers ``claim``,
``refresh`` and ``release`` requests over it.  A claim is answered once its
group formed (or failed), or, when it asked to wait for another job, once
that job's record is gone: :meth:`LeaseDesk.step` moves a claim on and says
when to step it again, and the server core (:mod:`~fmi_async.holepunch.server_core`)
steps every waiting claim of a record that changed, so nobody polls.  Every
wait is bounded by the request's timeout, capped by the server's.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Final

from ..jobs.record import (
    EPOCH_BYTES,
    FORM_GRACE,
    LeaseRecord,
    Step,
    busy_message,
    busy_timeout_message,
    claim,
    formation_timeout_message,
    lost_forming_message,
    mismatch_message,
    observe,
    poison_error,
    refresh,
    release,
)
from .messages import Claim, Error, ErrorCode, LeaseGrant, Message, Ok, Refresh, Release

__all__ = ["LeaseTable", "LeaseDesk", "ClaimInProgress", "LeaseKey"]

logger = logging.getLogger(__name__)

LeaseKey = tuple[str, str]  # comm, run_id

MIN_TTL: Final = 0.05
MAX_TTL: Final = 3600.0
DEFAULT_TTL: Final = 30.0
MAX_SETTLE: Final = 60.0


class LeaseTable:
    """Lease records by ``(comm, run_id)``; pure, time passed in, bounded.

    Expired records are dropped when touched, and all of them when the table
    is full; a new record beyond ``max_records`` live ones is refused.
    """

    def __init__(self, max_records: int = 10_000) -> None:
        self.max_records = max_records
        self.records: dict[LeaseKey, LeaseRecord] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"<LeaseTable records={len(self.records)}/{self.max_records}>"

    def get(self, key: LeaseKey, now: float) -> LeaseRecord | None:
        """The live record of ``key``, or None."""
        rec = self.records.get(key)
        if rec is not None and not rec.live(now):
            del self.records[key]
            return None
        return rec

    def expire(self, now: float) -> int:
        """Drop every expired record; returns how many."""
        dead = [key for key, rec in self.records.items() if not rec.live(now)]
        for key in dead:
            del self.records[key]
        return len(dead)

    def _apply(self, key: LeaseKey, step: Step) -> Step:
        if step.write:
            if step.record is None:
                self.records.pop(key, None)
            else:
                self.records[key] = step.record
        return step

    def claim(
        self,
        key: LeaseKey,
        *,
        peer: int,
        nonce: str,
        num_peers: int,
        now: float,
        hold_until: float,
        ttl: float,
        settle: float,
    ) -> Step | None:
        """:func:`~fmi_async.jobs.record.claim` on ``key``; None when the table is full."""
        rec = self.get(key, now)
        if rec is None and len(self.records) >= self.max_records:
            self.expire(now)
            if len(self.records) >= self.max_records:
                return None
        step = claim(
            rec,
            peer=peer,
            nonce=nonce,
            num_peers=num_peers,
            now=now,
            hold_until=hold_until,
            ttl=ttl,
            settle=settle,
            new_epoch=secrets.token_hex(EPOCH_BYTES),
        )
        return self._apply(key, step)

    def observe(self, key: LeaseKey, *, peer: int, nonce: str, epoch: str, now: float) -> Step:
        return observe(self.get(key, now), peer=peer, nonce=nonce, epoch=epoch, now=now)

    def refresh(
        self,
        key: LeaseKey,
        *,
        peer: int,
        nonce: str,
        epoch: str,
        num_peers: int,
        now: float,
        ttl: float,
    ) -> Step | None:
        """:func:`~fmi_async.jobs.record.refresh`; None when a restore finds the table full."""
        rec = self.get(key, now)
        if rec is None and len(self.records) >= self.max_records:
            self.expire(now)
            if len(self.records) >= self.max_records:
                return None
        step = refresh(
            rec, peer=peer, nonce=nonce, epoch=epoch, num_peers=num_peers, now=now, ttl=ttl
        )
        return self._apply(key, step)

    def release(self, key: LeaseKey, *, peer: int, nonce: str, epoch: str, now: float) -> Step:
        step = release(self.get(key, now), peer=peer, nonce=nonce, epoch=epoch, now=now)
        return self._apply(key, step)


def _clamp(value: float | None, default: float, low: float, high: float) -> float:
    return min(max(default if value is None else value, low), high)


@dataclass(slots=True)
class ClaimInProgress:
    """A claim the desk has not answered yet, and when to step it again."""

    msg: Claim
    start: float
    deadline: float
    wake: float
    epoch: str = ""  # of the slot this claim holds, once it holds one

    @property
    def key(self) -> LeaseKey:
        return (self.msg.comm, self.msg.run_id)


class LeaseDesk:
    """Answers lease requests on the rendezvous server; sans-IO, time passed in.

    Proofs are checked by the caller.  :attr:`changed` collects the keys
    whose record was written since the caller last cleared it: the claims
    waiting on those must be stepped again.
    """

    def __init__(
        self, *, default_wait: float = 30.0, max_wait: float = 600.0, max_records: int = 10_000
    ) -> None:
        self.table = LeaseTable(max_records)
        self.default_wait = default_wait
        self.max_wait = max_wait
        self.changed: set[LeaseKey] = set()

    def __repr__(self) -> str:
        return f"<LeaseDesk {self.table!r}>"

    def claim(self, msg: Claim, now: float) -> ClaimInProgress:
        """Start a claim; :meth:`step` it at once."""
        wait = _clamp(msg.timeout, self.default_wait, 0.0, self.max_wait)
        return ClaimInProgress(msg, now, now + wait, now)

    def step(self, claim: ClaimInProgress, now: float) -> Message | None:
        """Move ``claim`` on: its answer, or None to be stepped again at ``claim.wake``
        (or sooner, when its record changes)."""
        msg, key = claim.msg, claim.key
        nonce = msg.nonce.hex()
        ttl = _clamp(msg.ttl, DEFAULT_TTL, MIN_TTL, MAX_TTL)
        step: Step | None
        if not claim.epoch:
            step = self.table.claim(
                key,
                peer=msg.peer,
                nonce=nonce,
                num_peers=msg.num_peers,
                now=now,
                hold_until=claim.deadline + FORM_GRACE,
                ttl=ttl,
                settle=_clamp(msg.settle, 0.0, 0.0, MAX_SETTLE),
            )
            if step is None:
                return Error(
                    "overloaded",
                    f"the rendezvous server holds {self.table.max_records} job leases "
                    "already; retry later",
                    msg.id,
                )
        else:
            step = self.table.observe(key, peer=msg.peer, nonce=nonce, epoch=claim.epoch, now=now)
        if step.write:
            self.changed.add(key)
        rec = step.record
        if step.outcome == "granted":
            assert rec is not None
            return LeaseGrant(rec.epoch, ttl, msg.id)
        if step.outcome in ("joined", "settling"):
            assert rec is not None
            claim.epoch = rec.epoch
        elif step.outcome == "busy":
            assert rec is not None
            if not msg.wait:
                return Error("conflict", busy_message(rec, msg.comm, msg.run_id, now), msg.id)
        elif step.outcome == "mismatch":
            assert rec is not None
            text = mismatch_message(rec, msg.comm, msg.run_id, msg.num_peers)
            return Error("mismatch", text, msg.id)
        elif step.outcome == "poisoned":
            assert rec is not None
            return _poisoned(rec, msg)
        else:
            return Error("conflict", lost_forming_message(msg.comm, msg.run_id), msg.id)
        if now >= claim.deadline:
            waited = now - claim.start
            if claim.epoch:
                self.table.release(key, peer=msg.peer, nonce=nonce, epoch=claim.epoch, now=now)
                self.changed.add(key)
                text = formation_timeout_message(rec, msg.comm, msg.run_id, waited)
                return Error("timeout", text, msg.id)
            text = busy_timeout_message(rec, msg.comm, msg.run_id, waited)
            return Error("busy", text, msg.id)
        claim.wake = claim.deadline
        if rec is not None:
            if step.outcome == "settling" and rec.completed is not None:
                claim.wake = min(claim.wake, rec.completed + rec.settle)
            elif step.outcome == "busy":
                claim.wake = min(claim.wake, rec.expires)
        return None

    def refresh(self, msg: Refresh, now: float) -> Message:
        """The answer to a refresh: ``ok``, or ``error`` (``expired``, ``conflict``, ...)."""
        key = (msg.comm, msg.run_id)
        ttl = _clamp(msg.ttl, DEFAULT_TTL, MIN_TTL, MAX_TTL)
        step = self.table.refresh(
            key,
            peer=msg.peer,
            nonce=msg.nonce.hex(),
            epoch=msg.epoch,
            num_peers=msg.num_peers,
            now=now,
            ttl=ttl,
        )
        if step is None:
            return Error("overloaded", "the rendezvous server's lease table is full", msg.id)
        if step.write:
            self.changed.add(key)
        if step.outcome == "granted":
            return Ok(ttl=ttl, id=msg.id)
        rec = step.record
        if step.outcome == "poisoned" and rec is not None:
            return _poisoned(rec, msg)
        other = rec.epoch if rec is not None else "?"
        return Error(
            "expired",
            f"another job (epoch {other}) took communicator {msg.comm!r} run {msg.run_id!r} "
            f"after this job's lease (epoch {msg.epoch}) lapsed",
            msg.id,
        )

    def release(self, msg: Release, now: float) -> Message:
        """The answer to a release: always ``ok`` (a slot already gone is released too)."""
        key = (msg.comm, msg.run_id)
        step = self.table.release(
            key, peer=msg.peer, nonce=msg.nonce.hex(), epoch=msg.epoch, now=now
        )
        if step.write:
            self.changed.add(key)
        return Ok(id=msg.id)


def _poisoned(rec: LeaseRecord, msg: Claim | Refresh) -> Message:
    error = poison_error(rec, msg.comm, msg.run_id)
    code: ErrorCode = "mismatch" if rec.poison == "mismatch" else "conflict"
    return Error(code, str(error), msg.id)
