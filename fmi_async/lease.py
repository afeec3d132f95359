"""Job leases: one job at a time per communicator name and run id.

Peers of two jobs that open the same ``comm_name`` with the same run id would
use the same storage keys, pairing names and membership proofs, and read each
other's messages.  A *job lease* prevents it: when a communicator opens, its
peers form one lease record per ``(comm_name, run_id)`` on one backend, and
the record's random *epoch* becomes part of the run id every channel uses
(``f"{run_id}.{epoch}"``).  Peers of another job get another epoch, hence
other keys, or an error; never each other's data.  The protocol is in
:mod:`fmi_async.lease_record` (sans-IO); ``docs/jobs.md`` tells the story for
users.

This module holds what a communicator calls: :func:`lease_for` picks the
backend from the configuration, and a :class:`JobLease` is acquired when the
communicator opens, renewed in the background, and released at close.
:class:`StoreLease` drives the protocol over conditional writes
(:mod:`fmi_async.lease_stores`: Redis, S3, DynamoDB); :class:`RendezvousLease`
asks the rendezvous server, which runs it on its own table.

Storage records carry wall-clock times: peers' clocks are assumed to agree to
well within ``lease_ttl`` (and within :data:`SETTLE_MARGIN` for the settle
window).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, Literal, Protocol

from .channels import registry
from .channels.backoff import Backoff
from .config import Config, JobConfig
from .errors import (
    ArgumentError,
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
from .lease_record import (
    EPOCH_BYTES,
    FORM_GRACE,
    NONCE_BYTES,
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

__all__ = [
    "JobLease",
    "lease_for",
    "settle_for",
    "RecordStore",
    "StoreLease",
    "RendezvousLease",
    "DEFAULT_SETTLE",
    "RELEASE_TIMEOUT",
]

logger = logging.getLogger(__name__)

DEFAULT_SETTLE: Final = 0.5
"""``job.settle`` for the run id ``"default"``: no run id was given, collisions are likely."""
SETTLE_MARGIN: Final = 0.05
"""Storage backends: extra wait after a settle window (clock differences between peers)."""
RELEASE_TIMEOUT: Final = 5.0
REQUEST_GRACE: Final = 1.0
"""Seconds one storage request may run past the deadline it started before."""
_FORM_POLL = Backoff(initial=0.01, maximum=0.2)
_WAIT_POLL = Backoff(initial=0.05, maximum=0.25)
_CAS_ATTEMPTS: Final = 16  # conditional writes per refresh or release before giving up
_DISTINCT = "give each job a distinct run_id (`fmi run` makes one per run)"


def settle_for(job: JobConfig, run_id: str, num_peers: int) -> float:
    """Seconds a group waits after it formed (see :class:`~fmi_async.config.JobConfig`)."""
    if num_peers == 1:
        return 0.0  # a group of one cannot mix two jobs
    if job.settle is not None:
        return job.settle
    return DEFAULT_SETTLE if run_id == "default" else 0.0


class JobLease(abc.ABC):
    """One communicator instance's share of its job's lease.

    :meth:`acquire` once, when the communicator opens; :meth:`release` at
    close.  While held, a background task renews the lease every
    ``lease_ttl / 3`` and calls the :meth:`on_lost` callbacks if it is lost.
    """

    backend: str = ""

    def __init__(
        self, comm_name: str, run_id: str, peer_id: int, num_peers: int, job: JobConfig
    ) -> None:
        if num_peers < 1 or not 0 <= peer_id < num_peers:
            raise ArgumentError(f"peer_id {peer_id} is out of range for {num_peers} peers")
        self.comm_name = comm_name
        self.run_id = run_id
        self.peer_id = peer_id
        self.num_peers = num_peers
        self.job = job
        self.ttl = job.lease_ttl
        self.settle = settle_for(job, run_id, num_peers)
        self.nonce = secrets.token_hex(NONCE_BYTES)
        self.epoch = ""
        self._state: Literal["new", "acquiring", "open", "lost", "released"] = "new"
        self._callbacks: list[Callable[[FMIError], None]] = []
        self._lost: FMIError | None = None
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        epoch = f" epoch={self.epoch}" if self.epoch else ""
        return (
            f"<{type(self).__name__} {self.backend} {self.comm_name!r} run={self.run_id} "
            f"peer={self.peer_id}/{self.num_peers}{epoch} {self._state}>"
        )

    @property
    def where(self) -> str:
        return f"communicator {self.comm_name!r} run {self.run_id!r}"

    @abc.abstractmethod
    async def acquire(self, deadline: float) -> str:
        """Claim this peer's slot and wait until all ``num_peers`` peers have; returns the epoch.

        ``deadline`` is in ``loop.time()`` seconds.  Raises
        :class:`~fmi_async.errors.JobConflictError` when another live job
        holds the name (``job.on_conflict: "error"``) or two jobs opened it at
        the same time, :class:`~fmi_async.errors.JobConflictTimeout` when the
        deadline passed while waiting for another job to close,
        :class:`~fmi_async.errors.JobMismatchError` when peers disagree on
        ``num_peers``, :class:`~fmi_async.errors.CommTimeout` when some peers
        did not open by the deadline, and the backend's errors
        (:class:`~fmi_async.errors.BrokenChannelError`,
        :class:`~fmi_async.errors.BackendError`,
        :class:`~fmi_async.errors.AuthenticationError`,
        :class:`~fmi_async.errors.ConfigError`).  On any failure the slot is
        given back.
        """

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lease back (the last peer deletes the record); never raises.

        Bounded by :data:`RELEASE_TIMEOUT`; a release that fails is logged,
        and the record then expires after ``lease_ttl``.
        """

    def on_lost(self, callback: Callable[[FMIError], None]) -> None:
        """Call ``callback`` with the error (once) if the lease is lost while open.

        The error is a :class:`~fmi_async.errors.LeaseLostError` (another job
        took the name after this lease lapsed, or renewing failed for longer
        than ``lease_ttl``), or the :class:`~fmi_async.errors.JobConflictError`
        / :class:`~fmi_async.errors.JobMismatchError` of a record poisoned
        late.  A callback registered after the loss is called at once.
        """
        self._callbacks.append(callback)
        if self._lost is not None:
            self._call(callback, self._lost)

    # ---------------------------------------------------------------- shared machinery

    def _start(self, epoch: str) -> str:
        self.epoch = epoch
        self._state = "open"
        self._refresher = asyncio.create_task(
            self._refresh_loop(), name=f"lease refresh {self.comm_name}/{self.run_id}"
        )
        logger.debug("%r acquired", self)
        return epoch

    def _call(self, callback: Callable[[FMIError], None], error: FMIError) -> None:
        try:
            callback(error)
        except Exception:  # a broken callback must not stop the others
            logger.exception("%r: on_lost callback failed", self)

    def _lose(self, error: FMIError) -> None:
        if self._lost is not None or self._state != "open":
            return
        self._lost = error
        self._state = "lost"
        logger.warning("%r: job lease lost: %s", self, error)
        for callback in list(self._callbacks):
            self._call(callback, error)

    async def _stop_refresh(self) -> None:
        task, self._refresher = self._refresher, None
        if task is None:
            return
        # asyncio.wait, not await task: a cancellation swallowed deep inside a
        # client (wait_for in Python 3.11) must not hang close; the loop also
        # stops by itself once the state is no longer "open".
        for _attempt in range(10):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=RELEASE_TIMEOUT / 10)
            if done:
                break
        else:
            logger.warning("%r: the lease renewal task did not stop", self)
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.debug("%r: lease renewal ended with %r", self, task.exception())

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.ttl / 3
        last_ok = loop.time()
        while self._state == "open":
            await asyncio.sleep(period * random.uniform(0.8, 1.0))
            if self._state != "open":
                return
            try:
                async with asyncio.timeout(period):
                    error = await self._refresh_once()
            except (FMIError, TimeoutError) as exc:
                stale = loop.time() - last_ok
                if stale >= self.ttl:
                    self._lose(
                        LeaseLostError(
                            f"the job lease of {self.where} could not be renewed for "
                            f"{stale:.3g}s, longer than job.lease_ttl ({self.ttl:g}s): "
                            f"{exc or type(exc).__name__}"
                        )
                    )
                    return
                logger.debug("%r: renewing failed, will retry: %s", self, exc)
                continue
            if error is not None:
                self._lose(error)
                return
            last_ok = loop.time()

    @abc.abstractmethod
    async def _refresh_once(self) -> FMIError | None:
        """Renew once; the loss as an error, None when renewed; raises when it cannot tell."""


# ---------------------------------------------------------------- storage backends


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


_background: set[asyncio.Task[Any]] = set()  # releases of cancelled acquires


def _spawn(coro: Awaitable[Any], name: str) -> None:
    async def run() -> None:
        await coro

    task = asyncio.create_task(run(), name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)


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
            _spawn(self._give_up(), f"lease release {self.comm_name}/{self.run_id}")
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
            if self._held:
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


class RendezvousLease(JobLease):
    """The lease held by the rendezvous server (tcp and udp jobs).

    The server applies the transitions to its table and answers a claim
    only when the group formed (or failed), so nobody polls.
    """

    backend = "rendezvous"

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes | None,
        comm_name: str,
        run_id: str,
        peer_id: int,
        num_peers: int,
        job: JobConfig,
        *,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(comm_name, run_id, peer_id, num_peers, job)
        from .holepunch.client import RendezvousClient

        self.client = RendezvousClient(host, port, secret, timeout=timeout)

    async def acquire(self, deadline: float) -> str:
        if self._state != "new":
            raise ClosedError(f"{self!r}: a lease is acquired once; make a new one")
        self._state = "acquiring"
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            self._state = "released"
            raise CommTimeout(f"no time left to claim the job lease of {self.where}")
        try:
            grant = await self.client.claim(
                self.comm_name,
                self.run_id,
                self.peer_id,
                self.num_peers,
                bytes.fromhex(self.nonce),
                wait=self.job.on_conflict == "wait",
                ttl=self.ttl,
                settle=self.settle,
                timeout=remaining,
            )
        except asyncio.CancelledError:
            # The server still holds the slot for this claim: give it back.
            self._state = "released"
            _spawn(self._release_slot(""), f"lease release {self.comm_name}/{self.run_id}")
            raise
        except BaseException:
            self._state = "released"  # the server freed the slot itself
            raise
        self.ttl = grant.ttl
        return self._start(grant.epoch)

    async def _release_slot(self, epoch: str) -> None:
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self.client.release_lease(
                    self.comm_name, self.run_id, self.peer_id, epoch, bytes.fromhex(self.nonce)
                )
        except (FMIError, TimeoutError) as exc:
            logger.warning(
                "%r: could not release the job lease (%s); it expires after %gs",
                self,
                exc or type(exc).__name__,
                self.ttl,
            )

    async def _refresh_once(self) -> FMIError | None:
        try:
            await self.client.refresh_lease(
                self.comm_name,
                self.run_id,
                self.peer_id,
                self.num_peers,
                self.epoch,
                bytes.fromhex(self.nonce),
                self.ttl,
            )
        except (JobConflictError, JobMismatchError, LeaseLostError) as exc:
            return exc
        return None

    async def release(self) -> None:
        if self._state in ("new", "released"):
            return
        was_open = self._state in ("open", "lost")
        self._state = "released"
        await self._stop_refresh()
        if was_open:
            await self._release_slot(self.epoch)


# ---------------------------------------------------------------- choosing the backend


def lease_for(
    config: Config, comm_name: str, run_id: str, peer_id: int, num_peers: int
) -> JobLease | None:
    """The lease of one peer of a job, on the one backend every peer chooses alike.

    The rendezvous server when ``tcp`` or ``udp`` is enabled, else Redis,
    else DynamoDB, else S3; None when only in-process channels are enabled
    (``memory``: one hub per group cannot mix jobs).  Raises
    :class:`~fmi_async.errors.ConfigError` when the chosen backend's options
    cannot work.
    """
    enabled = set(config.enabled())
    job = config.job
    for name in ("tcp", "udp"):
        if name in enabled:
            if config.secret is None and not config.insecure:
                config.check_security(name)  # refused before anything is said to the server
            options = _options(name, config)
            host, port = options.rendezvous(name.upper(), "it also holds the job lease")
            timeout = options.connect_timeout or 10.0
            return RendezvousLease(
                host,
                port,
                config.secret,
                comm_name,
                run_id,
                peer_id,
                num_peers,
                job,
                timeout=min(timeout, config.timeout),
            )
    from . import lease_stores

    key = lease_stores.record_name(comm_name, run_id)
    store: RecordStore
    if "redis" in enabled:
        store = lease_stores.RedisStore(_options("redis", config), key)
    elif "dynamodb" in enabled:
        store = lease_stores.DynamoDBStore(_options("dynamodb", config), key, config.timeout)
    elif "s3" in enabled:
        store = lease_stores.S3Store(_options("s3", config), key)
    else:
        return None
    return StoreLease(store, comm_name, run_id, peer_id, num_peers, job)


def _options(name: str, config: Config) -> Any:
    """Channel ``name``'s typed options (its lease store reads the same section)."""
    return registry.channel_class(name).parse_options(config)
