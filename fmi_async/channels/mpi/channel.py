"""The MPI channel: peers are the ranks of an mpi4py communicator.

On an HPC cluster the job is started by ``mpiexec``/``srun``; this channel
moves the library's messages over MPI's nonblocking point-to-point calls, on a
private duplicate of the given communicator (so the application's own MPI
traffic never matches ours), and the collectives of the ``mpi`` algorithm
family (:mod:`fmi_async.collectives.native`) onto MPI's own nonblocking
collectives.

Point to point.  A message is a header (its key, the payload's serializer and
header, the lengths of its out-of-band buffers) sent with tag ``HEAD``, and
-- unless small enough to travel inside the header -- each buffer sent
with tag ``BODY`` straight from its memory (numpy arrays are never pickled or
copied), split in pieces under MPI's 2 GiB count limit.  MPI keeps messages
of one source and tag in order, and a header's body receives are posted as
soon as the header is taken, so bodies always meet their header.  Headers are
taken with a matched probe (``Improbe``) from any source and delivered to the
peer's :class:`~fmi_async.channels.mailbox.Mailbox`: the library's matching
(source, tag, early messages never block) is the same as on every channel.

Progress is driven by :mod:`fmi_async.channels.mpi.progress`.  Ordered
collective steps (the per-collective check and the native collectives) run
through :class:`~fmi_async.channels.mpi.ordered.Ordered`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from ...errors import ArgumentError, BrokenChannelError, ConfigError, ProtocolError
from ...wire import BufferRecycler, Key, Payload
from ...wire.framing import decode_key, encode_key
from ..base import ChannelContext, DirectChannel
from ..options import ChannelOptions, option
from .ordered import Ordered
from .progress import Progress, make_progress

__all__ = ["MPIChannel", "MPIOptions", "import_mpi"]

logger = logging.getLogger(__name__)

HEAD = 1
"""MPI tag of message headers on the channel's private communicator."""
BODY = 2
"""MPI tag of message bodies (out-of-band buffers), in the order of their header."""
INLINE = 8192
"""Buffers up to this many bytes in all travel inside the header message."""
PIECE = 1 << 30
"""Largest piece of a buffer in one MPI message (MPI counts are C ints)."""
PROBES_PER_POLL = 64
"""Headers taken in one poll at most (the others wait for the next one)."""


def import_mpi() -> Any:
    """``mpi4py.MPI``, or a ConfigError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(
            "the MPI channel needs mpi4py: pip install 'fmi-async[mpi]' (on a cluster, build "
            f"mpi4py against the site's MPI; see docs/hpc.md): {exc}"
        ) from None
    return MPI


@dataclass(frozen=True)
class MPIOptions(ChannelOptions):
    """``backends.MPI``: how the channel drives MPI."""

    progress: str = option(
        "poll",
        choices=("poll", "thread"),
        doc="who polls MPI: the event loop (poll) or a progress thread (thread)",
    )
    poll_spin: float = option(
        2e-3, ge=0, doc="seconds of busy polling (yielding to other tasks) after activity"
    )
    poll_max: float = option(
        1e-3, gt=0, le=1, doc="longest sleep between two polls when idle, in seconds"
    )
    check: bool = option(
        True,
        doc="every collective first checks, in one small MPI allreduce, that every peer "
        "planned it alike (off: MPI's own semantics, a mismatch is undefined)",
    )


class MPIChannel(DirectChannel):
    """Messages and collectives over MPI between the ranks of one communicator."""

    name = "mpi"
    Options = MPIOptions
    options: MPIOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        self.MPI = import_mpi()
        base = ctx.mpi_comm if ctx.mpi_comm is not None else self.MPI.COMM_WORLD
        size, rank = base.Get_size(), base.Get_rank()
        if (rank, size) != (self.peer_id, self.num_peers):
            raise ArgumentError(
                f"the MPI communicator has rank {rank} of {size} but this communicator is peer "
                f"{self.peer_id} of {self.num_peers}; use fmi.Communicator.from_mpi(comm), "
                "which takes both from MPI"
            )
        self.base = base
        self.comm: Any = None
        self.progress: Progress | None = None
        self.ordered: Ordered | None = None
        self._status = self.MPI.Status()
        self._recyclers: dict[int, BufferRecycler] = {}
        # Results of native collectives (mpi algorithm family), reused likewise.
        self.recycler = BufferRecycler(slots=4)

    async def open(self) -> None:
        # A private context: the application's own MPI messages never match ours.
        self.comm = self.base.Dup()
        loop = asyncio.get_running_loop()
        self.progress = make_progress(
            self.options.progress,
            loop,
            self._probe,
            spin=self.options.poll_spin,
            poll_max=self.options.poll_max,
        )
        self.ordered = Ordered(self)
        await super().open()

    async def close(self) -> None:
        if self._state == "closed":
            return
        await super().close()
        if self.progress is not None:
            await self.progress.close()
        if self.ordered is not None:
            self.ordered.close()
        comm, self.comm = self.comm, None
        if comm is not None and (self.progress is None or not self.progress.pending):
            # Requests still pending (an abandoned collective) keep it alive.
            comm.Free()

    def collective_started(
        self, seq: int, plan: str, *, native: bool
    ) -> asyncio.Future[Any] | None:
        if self.ordered is None:
            return None
        return self.ordered.gate(seq, plan, native=native)

    def collective_abandoned(self, seq: int) -> None:
        if self.ordered is not None:
            self.ordered.skip(seq, self.peer_id)

    # ---------------------------------------------------------------- sending

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        start = time.perf_counter()
        buffers = [memoryview(b).cast("B") for b in payload.buffers]
        lengths = [len(b) for b in buffers]
        inline = sum(lengths) <= INLINE
        head = msgpack.packb(
            [
                encode_key(key),
                payload.serializer,
                payload.header,
                [bytes(b) for b in buffers] if inline else lengths,
                inline,
            ]
        )
        if dst == self.peer_id:  # to itself: no MPI, a copy (the sender may reuse its arrays)
            self.mailbox.deliver(dst, key, payload.copy())
            self.stats.sent(payload)
            return
        requests = [self._isend(head, dst, HEAD)]
        if not inline:
            for buf in buffers:
                for at in range(0, len(buf), PIECE):
                    requests.append(self._isend(buf[at : at + PIECE], dst, BODY))
        if not self.MPI.Request.Testall(requests):
            await self.wait_all(requests, (head, buffers))
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    def _isend(self, buf: Any, dst: int, tag: int) -> Any:
        try:
            return self.comm.Isend(buf, dst, tag)
        except self.MPI.Exception as exc:
            raise BrokenChannelError(f"MPI send to peer {dst} failed: {exc}") from exc

    async def wait_all(self, requests: list[Any], keep: Any) -> None:
        """Until every request completed; buffers in ``keep`` live until then, even
        when the caller is cancelled (MPI cannot withdraw a posted send)."""
        assert self.progress is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not fut.done():
                fut.set_result(None)

        self.progress.watch_all(requests, done, keep)
        await fut

    # ---------------------------------------------------------------- receiving

    def _probe(self) -> bool:
        """Take in the headers that arrived (in the polling context); True if any."""
        comm, status, progress = self.comm, self._status, self.progress
        if comm is None or progress is None:
            return False
        took = False
        for _ in range(PROBES_PER_POLL):
            try:
                message = comm.Improbe(self.MPI.ANY_SOURCE, HEAD, status)
            except self.MPI.Exception as exc:
                # MPI itself failed: every receive fails now rather than at its deadline.
                self.comm = None
                error = BrokenChannelError(f"MPI failed on peer {self.peer_id}: {exc}")
                progress.on_loop(self.mailbox.fail, error)
                return False
            if message is None:
                break
            took = True
            src = status.Get_source()
            head = bytearray(status.Get_count(self.MPI.BYTE))
            message.Recv(head)
            try:
                self._take(src, head, progress)
            except (ValueError, TypeError, ProtocolError, msgpack.UnpackException) as exc:
                logger.warning("peer %d: malformed MPI message from %d: %s", self.peer_id, src, exc)
        return took

    def _take(self, src: int, head: bytearray, progress: Progress) -> None:
        raw_key, serializer, header, parts, inline = msgpack.unpackb(head)
        key = decode_key(raw_key)
        if inline:
            payload = Payload(header, tuple(parts), serializer)
            progress.on_loop(self._arrived, src, key, payload)
            return
        # Large buffers come from a pool per source, reused once the user dropped
        # them: new memory costs a page fault per page, and MPICH's large-message
        # path is several times slower into memory at an address it has not seen.
        recycler = self._recyclers.get(src)
        if recycler is None:
            recycler = self._recyclers[src] = BufferRecycler()
        buffers = [recycler.allocate(n) for n in parts]
        requests = []
        for view in buffers:
            for at in range(0, len(view), PIECE):
                requests.append(self.comm.Irecv(view[at : at + PIECE], src, BODY))
        if not requests:
            progress.on_loop(self._arrived, src, key, Payload(header, (), serializer))
            return
        payload = Payload(header, tuple(buffers), serializer)
        progress.watch_all(requests, lambda: self._arrived(src, key, payload), buffers)

    def _arrived(self, src: int, key: Key, payload: Payload) -> None:
        if self._state == "open":
            self.mailbox.deliver(src, key, payload)
