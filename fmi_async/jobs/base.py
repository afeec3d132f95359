"""The job lease every backend shares: :class:`JobLease`, its states and timings.

A :class:`JobLease` is acquired when the communicator opens, renewed in the
background, and released at close; it calls back when it is lost.  The
backends are :class:`~fmi_async.jobs.store.StoreLease` (conditional
writes on Redis, S3 or DynamoDB) and
:class:`~fmi_async.jobs.rendezvous.RendezvousLease` (the rendezvous
server); :func:`fmi_async.jobs.lease.lease_for` picks one.  See
:mod:`fmi_async.jobs.lease` for the whole story.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

from ..config import JobConfig
from ..errors import ArgumentError, FMIError, LeaseLostError
from .record import NONCE_BYTES

__all__ = [
    "DEFAULT_SETTLE",
    "RELEASE_TIMEOUT",
    "JobLease",
    "settle_for",
    "spawn_detached",
]

logger = logging.getLogger(__name__)


DEFAULT_SETTLE: Final = 0.5
"""``job.settle`` for the run id ``"default"``: no run id was given, collisions are likely."""
RELEASE_TIMEOUT: Final = 5.0


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


_background: set[asyncio.Task[Any]] = set()  # releases of cancelled acquires


def spawn_detached(coro: Awaitable[Any], name: str) -> None:
    async def run() -> None:
        await coro

    task = asyncio.create_task(run(), name=name)
    _background.add(task)
    task.add_done_callback(_background.discard)
