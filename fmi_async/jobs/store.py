"""The job lease on a storage backend: the lease protocol over conditional writes.

:class:`StoreLease` drives the transitions of :mod:`fmi_async.jobs.record`
(sans-IO) over a :class:`RecordStore`, one record per ``(comm_name,
run_id)`` (:mod:`fmi_async.jobs.stores`: Redis, S3, DynamoDB).  Storage
records carry wall-clock times: peers' clocks are assumed to agree to well
within ``lease_ttl`` (and within :data:`SETTLE_MARGIN` for the settle
window).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, Protocol

from ..channels.backoff import Backoff
from ..config import JobConfig
from ..errors import (
    BackendError,
    BrokenChannelError,
    ClosedError,
    CommTimeout,
    FMIError,
    JobConflictError,
    JobConflictTimeout,
    JobMismatchError,
    LeaseLostError,
)
from .base import RELEASE_TIMEOUT, JobLease, spawn_detached
from .record import (
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

__all__ = ["RecordStore", "SETTLE_MARGIN", "StoreLease"]

logger = logging.getLogger(__name__)


SETTLE_MARGIN: Final = 0.05
"""Storage backends: extra wait after a settle window (clock differences between peers)."""
REQUEST_GRACE: Final = 1.0
"""Seconds one storage request may run past the deadline it started before."""
_FORM_POLL = Backoff(initial=0.01, maximum=0.2)
_WAIT_POLL = Backoff(initial=0.05, maximum=0.25)
_CAS_ATTEMPTS: Final = 16  # conditional writes per refresh or release before giving up
_DISTINCT = "give each job a distinct run_id (`fmi run` makes one per run)"


class RecordStore(Protocol):
    """Atomic operations on one stored lease record (Redis, S3, DynamoDB).

    A *token* identifies the stored version (the value, an ETag, a version
    attribute); the conditional writes succeed only if the record is still
    at that version, and return the new token, or None when another writer
    came first.  ``expires`` is the record's expiry in wall-clock seconds, so
    that the backend's own expiry can clean it up.  Transient failures raise
    :class:`~fmi_async.errors.BrokenChannelError` (retried), others
    :class:`~fmi_async.errors.BackendError` or
    :class:`~fmi_async.errors.ConfigError`.
    """

    backend: str

    @property
    def where(self) -> str:
        """The backend and its location, for messages."""
        ...

    async def open(self) -> None: ...

    async def read(self) -> tuple[bytes | None, Any]: ...

    async def create(self, data: bytes, expires: float) -> Any | None: ...

    async def replace(self, data: bytes, token: Any, expires: float) -> Any | None: ...

    async def delete(self, token: Any) -> bool: ...

    async def close(self) -> None: ...


class StoreLease(JobLease):
    """The lease on a storage backend: the transitions over conditional writes.

    ``clock`` gives wall-clock seconds (records are shared between machines).
    """

    def __init__(
        self,
        store: RecordStore,
        comm_name: str,
        run_id: str,
        peer_id: int,
        num_peers: int,
        job: JobConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(comm_name, run_id, peer_id, num_peers, job)
        self.store = store
        self.backend = store.backend
        self._clock = clock
        self._held = ""  # the epoch of a slot this instance holds, once claimed

    async def acquire(self, deadline: float) -> str:
        if self._state != "new":
            raise ClosedError(f"{self!r}: a lease is acquired once; make a new one")
        self._state = "acquiring"
        try:
            await self._retrying(self.store.open, deadline)
            epoch = await self._acquire(deadline)
        except asyncio.CancelledError:
            spawn_detached(self._give_up(), f"lease release {self.comm_name}/{self.run_id}")
            raise
        except BaseException:
            await self._give_up()
            raise
        return self._start(epoch)

    async def _acquire(self, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        started = loop.time()
        form_polls: Iterator[float] = _FORM_POLL.delays()
        wait_polls: Iterator[float] = _WAIT_POLL.delays()
        where = (self.comm_name, self.run_id)
        while True:
            data, token = await self._retrying(self.store.read, deadline)
            rec = None if data is None else LeaseRecord.decode(data)
            now = self._clock()
            if not self._held:
                remaining = max(0.0, deadline - loop.time())
                step = claim(
                    rec,
                    peer=self.peer_id,
                    nonce=self.nonce,
                    num_peers=self.num_peers,
                    now=now,
                    hold_until=now + remaining + FORM_GRACE,
                    ttl=self.ttl,
                    settle=self.settle,
                    new_epoch=secrets.token_hex(EPOCH_BYTES),
                )
            else:
                step = observe(rec, peer=self.peer_id, nonce=self.nonce, epoch=self._held, now=now)
            if step.write and not await self._write(step.record, token, deadline):
                await asyncio.sleep(random.uniform(0.0, 0.005))  # another peer wrote first
                continue
            current = step.record
            if step.outcome == "granted":
                assert current is not None
                return current.epoch
            if step.outcome in ("joined", "settling"):
                assert current is not None
                self._held = current.epoch
            elif step.outcome == "busy":
                assert current is not None
                if self.job.on_conflict == "error":
                    raise JobConflictError(busy_message(current, *where, now))
            elif step.outcome == "mismatch":
                assert current is not None
                raise JobMismatchError(mismatch_message(current, *where, self.num_peers))
            elif step.outcome == "poisoned":
                assert current is not None
                raise poison_error(current, *where)
            else:  # lost while forming
                raise JobConflictError(lost_forming_message(*where))
            remaining = deadline - loop.time()
            if remaining <= 0:
                waited = loop.time() - started
                if self._held:
                    raise CommTimeout(formation_timeout_message(current, *where, waited))
                raise JobConflictTimeout(busy_timeout_message(current, *where, waited))
            if step.outcome == "settling":
                assert current is not None and current.completed is not None
                delay = current.completed + current.settle - now + SETTLE_MARGIN
            elif step.outcome == "busy":
                assert current is not None
                delay = min(next(wait_polls), max(0.0, current.expires - now) + 0.01)
            else:
                delay = next(form_polls)
            await asyncio.sleep(max(0.0, min(delay, remaining)))

    async def _write(self, rec: LeaseRecord | None, token: Any, deadline: float) -> bool:
        """One conditional write of the step's record; False when another peer came first."""
        if rec is None:
            return bool(await self._retrying(lambda: self.store.delete(token), deadline))
        data = rec.encode()
        if token is None:
            created = await self._retrying(lambda: self.store.create(data, rec.expires), deadline)
            return created is not None
        replaced = await self._retrying(
            lambda: self.store.replace(data, token, rec.expires), deadline
        )
        return replaced is not None

    async def _retrying(self, op: Callable[[], Awaitable[Any]], deadline: float) -> Any:
        """``op()``, retried with backoff on transient failures until ``deadline``.

        Like a poll, the last request may start at the deadline and take one
        request's time (at most :data:`REQUEST_GRACE`) beyond it.
        """
        loop = asyncio.get_running_loop()
        delays = _FORM_POLL.delays()
        while True:
            remaining = deadline - loop.time()
            try:
                async with asyncio.timeout(max(remaining, 0.0) + REQUEST_GRACE):
                    return await op()
            except BrokenChannelError as exc:
                if deadline - loop.time() <= 0:
                    raise
                logger.debug("%r: %s; retrying", self, exc)
                await asyncio.sleep(min(next(delays), max(0.0, deadline - loop.time())))
            except TimeoutError:
                raise CommTimeout(
                    f"{self.store.where} did not answer in time for the job lease of {self.where}"
                ) from None

    async def _transition(
        self, step_of: Callable[[LeaseRecord | None, float], Step], deadline: float
    ) -> Step:
        """Read, apply ``step_of``, write conditionally; repeated while other peers write first."""
        for _attempt in range(_CAS_ATTEMPTS):
            data, token = await self._retrying(self.store.read, deadline)
            rec = None if data is None else LeaseRecord.decode(data)
            step = step_of(rec, self._clock())
            if not step.write or await self._write(step.record, token, deadline):
                return step
            await asyncio.sleep(random.uniform(0.0, 0.01))
        raise BackendError(
            f"{self.store.where}: the job lease of {self.where} changed under {_CAS_ATTEMPTS} "
            "writes in a row"
        )

    async def _refresh_once(self) -> FMIError | None:
        loop = asyncio.get_running_loop()
        step = await self._transition(
            lambda rec, now: refresh(
                rec,
                peer=self.peer_id,
                nonce=self.nonce,
                epoch=self.epoch,
                num_peers=self.num_peers,
                now=now,
                ttl=self.ttl,
            ),
            loop.time() + self.ttl / 3,
        )
        if step.outcome == "granted":
            return None
        if step.outcome == "poisoned" and step.record is not None:
            return poison_error(step.record, self.comm_name, self.run_id)
        other = step.record.epoch if step.record is not None else "?"
        return LeaseLostError(
            f"another job (epoch {other}) took {self.where} after this job's lease "
            f"(epoch {self.epoch}) lapsed; this job's keys are its own, but the name is no "
            f"longer reserved for it; {_DISTINCT}"
        )

    async def _give_up(self) -> None:
        """After a failed acquire: free a slot this instance holds, close the store."""
        try:
            # Not holding a slot may only mean the claim's answer never came (a
            # cancellation): an empty epoch releases a slot this nonce holds in
            # any record, and is a read and nothing else when it holds none.
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self._release_slot(self._held)
        except (FMIError, TimeoutError) as exc:
            logger.debug("%r: could not give the slot back: %s", self, exc)
        finally:
            self._state = "released"
            await self._close_store()

    async def _release_slot(self, epoch: str) -> None:
        loop = asyncio.get_running_loop()
        await self._transition(
            lambda rec, now: release(
                rec, peer=self.peer_id, nonce=self.nonce, epoch=epoch, now=now
            ),
            loop.time() + RELEASE_TIMEOUT,
        )

    async def _close_store(self) -> None:
        try:
            await self.store.close()
        except Exception as exc:  # closing a client must not fail a close
            logger.debug("%r: closing the store: %s", self, exc)

    async def release(self) -> None:
        if self._state in ("new", "released"):
            return
        was_open = self._state in ("open", "lost")
        self._state = "released"
        await self._stop_refresh()
        if was_open:
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT):
                    await self._release_slot(self.epoch)
                logger.debug("%r released", self)
            except (FMIError, TimeoutError) as exc:
                logger.warning(
                    "%r: could not release the job lease (%s); it expires after %gs",
                    self,
                    exc or type(exc).__name__,
                    self.ttl,
                )
        await self._close_store()


# ---------------------------------------------------------------- the rendezvous server
