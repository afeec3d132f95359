"""The rendezvous server's job leases: a table of lease records, and who waits on them.

:class:`LeaseTable` is pure bookkeeping with time passed in: it applies the
transitions of :mod:`fmi_async.lease_record` to one record per
``(comm, run_id)``, atomically (the server is one event loop), and holds at
most ``max_records`` of them.  :class:`LeaseService` is the thin async part
the server hands ``claim``, ``refresh`` and ``release`` requests to: a claim
waits, without polling, until its group formed (or failed), or, when it
asked to wait for another job, until that job's record is gone; every wait
is bounded by the request's timeout, capped by the server's.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Final

from ..lease_record import (
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
from . import protocol as p

__all__ = ["LeaseTable", "LeaseService", "LeaseKey"]

logger = logging.getLogger(__name__)

LeaseKey = tuple[str, str]  # comm, run_id

MIN_TTL: Final = 0.05
MAX_TTL: Final = 3600.0
DEFAULT_TTL: Final = 30.0
MAX_SETTLE: Final = 60.0
_AUTH_HINT: Final = (
    "invalid or missing proof: this peer's security.secret does not match the "
    "rendezvous server's secret"
)


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
        """:func:`~fmi_async.lease_record.claim` on ``key``; None when the table is full."""
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
        """:func:`~fmi_async.lease_record.refresh`; None when a restore finds the table full."""
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


class LeaseService:
    """Serves lease requests on the rendezvous server (one per server, on its loop)."""

    def __init__(
        self,
        secret: bytes | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        default_wait: float = 30.0,
        max_wait: float = 600.0,
        max_records: int = 10_000,
    ) -> None:
        self.secret = secret
        self.table = LeaseTable(max_records)
        self.default_wait = default_wait
        self.max_wait = max_wait
        self._clock = clock
        self._changed: dict[LeaseKey, asyncio.Event] = {}
        self._waiting: dict[LeaseKey, int] = {}

    def __repr__(self) -> str:
        return f"<LeaseService {self.table!r} waiting={sum(self._waiting.values())}>"

    async def handle(self, msg: p.Claim | p.Refresh | p.Release) -> p.Message:
        """The answer to one lease request (``error`` code ``auth`` without a valid proof)."""
        if not p.verify(msg, self.secret):
            logger.warning("rendezvous: rejected %s of peer %d", msg.TYPE, msg.peer)
            return p.Error("auth", _AUTH_HINT, msg.id)
        if isinstance(msg, p.Claim):
            return await self._claim(msg)
        if isinstance(msg, p.Refresh):
            return self._refresh(msg)
        return self._release(msg)

    # ---------------------------------------------------------------- waiting

    def _notify(self, key: LeaseKey) -> None:
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    async def _wait_change(self, key: LeaseKey, seconds: float) -> None:
        """Until the record of ``key`` changes, or ``seconds`` pass."""
        event = self._changed.setdefault(key, asyncio.Event())
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]
                if self._changed.get(key) is event:
                    del self._changed[key]

    # ---------------------------------------------------------------- requests

    async def _claim(self, msg: p.Claim) -> p.Message:
        key = (msg.comm, msg.run_id)
        nonce = msg.nonce.hex()
        ttl = _clamp(msg.ttl, DEFAULT_TTL, MIN_TTL, MAX_TTL)
        settle = _clamp(msg.settle, 0.0, 0.0, MAX_SETTLE)
        wait = _clamp(msg.timeout, self.default_wait, 0.0, self.max_wait)
        start = self._clock()
        deadline = start + wait
        epoch = ""  # of the slot this claim holds, once it holds one
        while True:
            now = self._clock()
            step: Step | None
            if not epoch:
                step = self.table.claim(
                    key,
                    peer=msg.peer,
                    nonce=nonce,
                    num_peers=msg.num_peers,
                    now=now,
                    hold_until=deadline + FORM_GRACE,
                    ttl=ttl,
                    settle=settle,
                )
                if step is None:
                    return p.Error(
                        "overloaded",
                        f"the rendezvous server holds {self.table.max_records} job leases "
                        "already; retry later",
                        msg.id,
                    )
            else:
                step = self.table.observe(key, peer=msg.peer, nonce=nonce, epoch=epoch, now=now)
            if step.write:
                self._notify(key)
            rec = step.record
            if step.outcome == "granted":
                assert rec is not None
                return p.LeaseGrant(rec.epoch, ttl, msg.id)
            if step.outcome in ("joined", "settling"):
                assert rec is not None
                epoch = rec.epoch
            elif step.outcome == "busy":
                assert rec is not None
                if not msg.wait:
                    text = busy_message(rec, msg.comm, msg.run_id, now)
                    return p.Error("conflict", text, msg.id)
            elif step.outcome == "mismatch":
                assert rec is not None
                text = mismatch_message(rec, msg.comm, msg.run_id, msg.num_peers)
                return p.Error("mismatch", text, msg.id)
            elif step.outcome == "poisoned":
                assert rec is not None
                return _poisoned(rec, msg)
            else:
                return p.Error("conflict", lost_forming_message(msg.comm, msg.run_id), msg.id)
            if now >= deadline:
                waited = now - start
                if epoch:
                    self.table.release(key, peer=msg.peer, nonce=nonce, epoch=epoch, now=now)
                    self._notify(key)
                    text = formation_timeout_message(rec, msg.comm, msg.run_id, waited)
                    return p.Error("timeout", text, msg.id)
                text = busy_timeout_message(rec, msg.comm, msg.run_id, waited)
                return p.Error("busy", text, msg.id)
            wake = deadline
            if rec is not None:
                if step.outcome == "settling" and rec.completed is not None:
                    wake = min(wake, rec.completed + rec.settle)
                elif step.outcome == "busy":
                    wake = min(wake, rec.expires)
            await self._wait_change(key, wake - now)

    def _refresh(self, msg: p.Refresh) -> p.Message:
        key = (msg.comm, msg.run_id)
        ttl = _clamp(msg.ttl, DEFAULT_TTL, MIN_TTL, MAX_TTL)
        step = self.table.refresh(
            key,
            peer=msg.peer,
            nonce=msg.nonce.hex(),
            epoch=msg.epoch,
            num_peers=msg.num_peers,
            now=self._clock(),
            ttl=ttl,
        )
        if step is None:
            return p.Error("overloaded", "the rendezvous server's lease table is full", msg.id)
        if step.write:
            self._notify(key)
        if step.outcome == "granted":
            return p.Ok(ttl=ttl, id=msg.id)
        rec = step.record
        if step.outcome == "poisoned" and rec is not None:
            return _poisoned(rec, msg)
        other = rec.epoch if rec is not None else "?"
        return p.Error(
            "expired",
            f"another job (epoch {other}) took communicator {msg.comm!r} run {msg.run_id!r} "
            f"after this job's lease (epoch {msg.epoch}) lapsed",
            msg.id,
        )

    def _release(self, msg: p.Release) -> p.Message:
        key = (msg.comm, msg.run_id)
        step = self.table.release(
            key, peer=msg.peer, nonce=msg.nonce.hex(), epoch=msg.epoch, now=self._clock()
        )
        if step.write:
            self._notify(key)
        return p.Ok(id=msg.id)


def _poisoned(rec: LeaseRecord, msg: p.Claim | p.Refresh) -> p.Message:
    error = poison_error(rec, msg.comm, msg.run_id)
    code: p.ErrorCode = "mismatch" if rec.poison == "mismatch" else "conflict"
    return p.Error(code, str(error), msg.id)
