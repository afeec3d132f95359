"""The job lease held by the rendezvous server (jobs with the tcp or udp channel).

The server applies the transitions of the lease protocol to its own table
and answers a claim only when the group formed (or failed), so nobody polls.
"""

from __future__ import annotations

import asyncio
import logging

from ..config import JobConfig
from ..errors import (
    ClosedError,
    CommTimeout,
    FMIError,
    JobConflictError,
    JobMismatchError,
    LeaseLostError,
)
from .base import RELEASE_TIMEOUT, JobLease, spawn_detached

__all__ = ["RendezvousLease"]

logger = logging.getLogger(__name__)


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
        from ..holepunch.client import RendezvousClient

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
            spawn_detached(self._release_slot(""), f"lease release {self.comm_name}/{self.run_id}")
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
