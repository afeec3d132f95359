"""The user's object: a group of peers, point-to-point messages and collectives."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import replace
from types import TracebackType
from typing import Any

from .calls import CommunicatorCalls
from .channels import registry
from .channels.base import Channel, ChannelContext
from .channels.mailbox import Mailbox, ReceiveGuard
from .channels.memory import MemoryHub
from .config import Config, check_timeout
from .dispatch import CollectiveRunner
from .errors import (
    ArgumentError,
    BrokenCommunicatorError,
    ClosedError,
    ConfigError,
    FMIError,
    PeerError,
)
from .groups import CommunicatorGroups
from .jobs.lease import JobLease, lease_for
from .selection.cost import channel_cost
from .selection.model import load_cost_model
from .selection.plan import Hint

__all__ = ["Communicator"]

logger = logging.getLogger(__name__)


class Communicator(CollectiveRunner, CommunicatorCalls, CommunicatorGroups):
    """A peer's view of a group of ``num_peers`` peers named ``comm_name``.

    Use it as an async context manager; it opens the configured channels on
    entry and closes them, with everything this peer stored, on exit.
    """

    def __init__(
        self,
        peer_id: int,
        num_peers: int,
        config: Config | dict[str, Any] | str | os.PathLike[str] | None = None,
        comm_name: str = "FMI_WORLD",
        faas_memory: int = 2048,
        hint: Hint = Hint.FAST,
        *,
        run_id: str | None = None,
        timeout: float | None = None,
        hub: MemoryHub | None = None,
    ) -> None:
        if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
            raise ArgumentError(f"num_peers must be a positive int, got {num_peers!r}")
        if isinstance(peer_id, bool) or not isinstance(peer_id, int):
            raise ArgumentError(f"peer_id must be an int, got {peer_id!r}")
        if not 0 <= peer_id < num_peers:
            raise ArgumentError(f"peer_id {peer_id} is out of range for {num_peers} peers")
        if not isinstance(comm_name, str) or not comm_name:
            raise ArgumentError("comm_name must be a non-empty string")
        if not isinstance(hint, Hint):
            raise ArgumentError(f"hint must be fmi.Hint.FAST or fmi.Hint.CHEAP, got {hint!r}")
        self.peer_id = peer_id
        self.num_peers = num_peers
        self.comm_name = comm_name
        self.faas_memory = faas_memory
        self.config = Config.load(config)
        if hub is not None and "memory" not in self.config.backends:
            self.config = self.config.with_backend("memory")
        self.run_id = run_id or os.environ.get("FMI_RUN_ID", "default")
        if timeout is not None:
            # The communicator's timeout is its channels' too (rendezvous lookups,
            # connection set-up, storage polls), not only its calls'.
            self.config = replace(self.config, timeout=check_timeout(timeout, "timeout"))
        self.timeout = self.config.timeout
        self._hint = hint
        self._hub = hub
        self._mpi_comm: Any = None
        self._mailbox = Mailbox(peer_id)
        self._guard = ReceiveGuard()
        self._background: set[asyncio.Task[None]] = set()
        self._broken: BaseException | None = None
        self._lease: JobLease | None = None
        self.epoch: str | None = None  # the job lease's epoch, once open
        self._channels: dict[str, Channel] = {}
        self._gates: dict[int, asyncio.Future[Any]] = {}
        self._plans: dict[tuple[Any, ...], Any] = {}  # call traits -> dispatch.Planned
        self._p2p: Channel | None = None
        self._seq = 0
        self._state = "new"
        self._collectives: Counter[str] = Counter()
        self._predicted_seconds = 0.0
        self._predicted_usd = 0.0
        self._models = load_cost_model(self.config.model, faas_memory)
        self._opened_at: float | None = None
        # sub-communicators (fmi_async.groups)
        self._parent: Communicator | None = None
        self._scope: str | None = None
        self._children: list[Communicator] = []
        self._group_calls: Counter[tuple[int, ...]] = Counter()
        self._group_lock = asyncio.Lock()
        self._own_mpi_comm: Any = None

    @classmethod
    def from_mpi(
        cls,
        mpi_comm: Any = None,
        *,
        config: Config | dict[str, Any] | str | os.PathLike[str] | None = None,
        comm_name: str = "FMI_WORLD",
        hint: Hint = Hint.FAST,
        run_id: str | None = None,
        timeout: float | None = None,
        faas_memory: int = 2048,
    ) -> Communicator:
        """A communicator on the ranks of an mpi4py communicator (``COMM_WORLD`` when None).

        Peer id and size are the rank and size of ``mpi_comm`` (a
        sub-communicator works too); the config's ``MPI`` backend is enabled
        if it is not there.  Opening it is collective over ``mpi_comm``.
        Raises :class:`~fmi_async.errors.ConfigError` when mpi4py is missing.
        """
        from .channels.mpi import import_mpi

        mpi = import_mpi()
        comm = mpi.COMM_WORLD if mpi_comm is None else mpi_comm
        loaded = Config.load(config)
        if "mpi" not in loaded.backends:
            loaded = loaded.with_backend("mpi")
        self = cls(
            comm.Get_rank(),
            comm.Get_size(),
            loaded,
            comm_name,
            faas_memory,
            hint,
            run_id=run_id,
            timeout=timeout,
        )
        self._mpi_comm = comm
        return self

    # ---------------------------------------------------------------- life cycle

    def __repr__(self) -> str:
        chans = ",".join(self._channels) or "-"
        return (
            f"<Communicator {self.comm_name!r} peer={self.peer_id}/{self.num_peers} "
            f"run={self.run_id}{'.' + self.epoch if self.epoch else ''} channels={chans} "
            f"{self._state}>"
        )

    @property
    def rank(self) -> int:
        return self.peer_id

    @property
    def size(self) -> int:
        return self.num_peers

    async def open(self) -> None:
        if self._state == "open":
            return
        if self._state == "closed":
            raise ClosedError(f"{self!r} was closed; create a new Communicator")
        names = self.config.enabled()
        if not names:
            raise ConfigError(
                "no channel is enabled: enable a backend in the config (Direct/TCP, Redis, S3, "
                "DynamoDB) or create in-process peers with fmi.local_peers(n)"
            )
        pinned = self.config.collective_channel
        if pinned is not None and pinned not in names:
            raise ConfigError(f"config names collective_channel {pinned!r} but it is not enabled")
        # Every enabled channel's options are checked before anything is claimed
        # or connected: a typo fails here, on every peer alike.
        classes = {name: registry.channel_class(name) for name in names}
        for cls in classes.values():
            cls.parse_options(self.config)
        try:
            run = await self._acquire_lease()
            for name, cls in classes.items():
                ctx = ChannelContext(
                    self.peer_id,
                    self.num_peers,
                    self.comm_name,
                    run,
                    self.config,
                    self._mailbox,
                    hub=self._hub,
                    mpi_comm=self._mpi_comm,
                )
                chan = cls(ctx)
                self._channels[name] = chan
                await chan.open()
        except BaseException:
            await self._close_channels()
            await self._release_lease()
            self._state = "closed"
            raise
        preferred = self.config.channel
        if preferred is not None:
            if preferred not in self._channels:
                raise ConfigError(f"config names channel {preferred!r} but it is not enabled")
            self._p2p = self._channels[preferred]
        else:
            self._p2p = next(self._channels[n] for n in registry.names() if n in self._channels)
        self._state = "open"
        self._opened_at = time.perf_counter()
        logger.debug("%r opened", self)

    async def _acquire_lease(self) -> str:
        """Form the job's lease (DESIGN.md section 8, "a job is a job"); the run id the
        channels use, ``run_id.epoch``, so no key or pairing of another job can match.

        The formation is also the check that every peer opened with the same
        ``num_peers`` (:class:`~fmi_async.errors.JobMismatchError`).
        """
        lease = lease_for(self.config, self.comm_name, self.run_id, self.peer_id, self.num_peers)
        if lease is None:
            return self.run_id  # in-process peers: one hub per group cannot mix jobs
        self._lease = lease
        deadline = asyncio.get_running_loop().time() + self.timeout
        self.epoch = await lease.acquire(deadline)
        lease.on_lost(self._break)
        return f"{self.run_id}.{self.epoch}"

    async def _release_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()

    async def close(self, *, synchronize: bool | None = None) -> None:
        """Close every channel, deleting whatever this peer stored.

        With a storage channel open, peers first meet in a barrier (bounded
        by the communicator's timeout): otherwise a peer that finishes early
        would delete an object, a broadcast value say, that a slower peer has
        yet to read.  ``async with`` synchronizes on a normal exit and skips
        it when leaving with an exception; ``synchronize`` forces either way.

        Raises the barrier's :class:`~fmi_async.errors.FMIError` when that
        final barrier fails (after closing everything all the same): the
        peers did not all finish, and objects a slower peer still needed are
        gone, so a clean exit must not be reported.
        """
        if self._state == "closed":
            return
        if self._parent is not None:
            # A sub-communicator stores nothing of its own (its parent's channels
            # do, and delete it at the parent's close): no final barrier.
            self._state = "closed"
            await self._settle_background()
            self._guard.cancel()
            await self._close_as_child()
            logger.debug("%r closed", self)
            return
        if synchronize is None:
            synchronize = True
        failure: FMIError | None = None
        if (
            synchronize
            and self._state == "open"
            and self._broken is None
            and self.num_peers > 1
            and any(c.kind == "mediated" for c in self._channels.values())
        ):
            storage = next(n for n, c in self._channels.items() if c.kind == "mediated")
            try:
                # Messages only (each consumed, so deleted, by its reader): an
                # object stored for this barrier would be deleted by its owner's
                # close before every peer had read it.
                await self.barrier(channel=storage, algorithm="direct:dissemination")
                for chan in self._channels.values():
                    chan.all_delivered()
            except FMIError as exc:
                logger.warning(
                    "peer %d: closing without the final barrier (%s); objects this peer "
                    "stored are deleted now and peers still reading them will time out",
                    self.peer_id,
                    exc,
                )
                failure = exc
        self._state = "closed"
        await self._settle_background()
        self._guard.cancel()
        for child in list(self._children):
            await child.close()
        await self._close_channels()
        await self._release_lease()
        logger.debug("%r closed", self)
        if failure is not None:
            raise PeerError(
                f"peer {self.peer_id} closed {self.comm_name!r} without the final barrier: "
                f"{failure}"
            ) from failure

    async def _settle_background(self) -> None:
        """Let the aborts still being announced reach the other peers (each bounded)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _close_channels(self) -> None:
        for chan in list(self._channels.values()):
            try:
                await chan.close()
            except Exception:  # closing must go on for the other channels
                logger.exception("closing %r failed", chan)

    async def __aenter__(self) -> Communicator:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(synchronize=exc_type is None)

    def _channel(self, name: str | None = None) -> Channel:
        self._usable()
        if name is None:
            assert self._p2p is not None
            return self._p2p
        try:
            return self._channels[name]
        except KeyError:
            raise ArgumentError(
                f"channel {name!r} is not enabled; enabled: {sorted(self._channels)}"
            ) from None

    # ---------------------------------------------------------------- hints and stats

    def hint(self, hint: Hint | None = None) -> Hint:
        """Set (and return) the optimisation hint for later operations."""
        if hint is not None:
            if not isinstance(hint, Hint):
                raise ArgumentError(f"hint must be fmi.Hint.FAST or fmi.Hint.CHEAP, got {hint!r}")
            self._hint = hint
        return self._hint

    def stats(self) -> dict[str, Any]:
        """What each channel carried and cost, which plans ran, and the model's predictions.

        ``channels[name]["usd"]`` prices the channel's counted requests, bytes
        and infrastructure share with the cost model; ``cost["faas_usd"]`` is
        this function's own GB-seconds since the communicator opened.
        """
        channels: dict[str, Any] = {}
        total = 0.0
        for name, chan in self._channels.items():
            entry = chan.stats.as_dict()
            entry["usd"] = channel_cost(chan.kind, chan.stats, self._models.channel(name))
            total += entry["usd"]
            channels[name] = entry
        elapsed = 0.0 if self._opened_at is None else time.perf_counter() - self._opened_at
        faas = self._models.faas_cost(elapsed, 1)
        return {
            "peer": self.peer_id,
            "num_peers": self.num_peers,
            "comm_name": self.comm_name,
            "hint": self._hint.value,
            "channels": channels,
            "collectives": dict(self._collectives),
            "predicted": {"seconds": self._predicted_seconds, "usd": self._predicted_usd},
            "cost": {
                "channels_usd": total,
                "faas_usd": faas,
                "total_usd": total + faas,
                "faas_memory_mb": self.faas_memory,
                "seconds_open": elapsed,
            },
        }

    def _deadline(self, timeout: float | None) -> float:
        t = self.timeout if timeout is None else check_timeout(timeout)
        return self._mailbox.running_loop().time() + t

    def _usable(self) -> None:
        if self._state != "open":
            raise ClosedError(f"{self!r} is not open; use `async with comm:` or await comm.open()")
        if self._broken is not None:
            raise BrokenCommunicatorError(
                f"{self!r} is broken and cannot be used: {self._broken}"
            ) from self._broken

    def _break(self, exc: BaseException) -> None:
        """Make every later call fail with ``exc`` as the cause (the job lease was lost)."""
        if self._broken is None:
            logger.error("peer %d: communicator broken: %s", self.peer_id, exc)
            self._broken = exc
            self._mailbox.fail(
                BrokenCommunicatorError(f"{self!r} is broken and cannot be used: {exc}")
            )
            for child in self._children:
                child._break(exc)
