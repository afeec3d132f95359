"""The channel interfaces: what every channel provides and what it raises.

A channel moves opaque :class:`~fmi_async.wire.Payload` objects for a message
*key* between the peers of one communicator.  It knows nothing of
collectives.  There are two kinds, each an abstract class here:

* :class:`DirectChannel` -- peers exchange messages (TCP, UDP, in-process
  queues), delivered into the receiving peer's
  :class:`~fmi_async.channels.mailbox.Mailbox`, which matches them by
  ``(source, key)``.
* :class:`MediatedChannel` -- peers exchange objects through shared storage
  (Redis, S3, DynamoDB): point-to-point messages, and objects :meth:`put`
  once and :meth:`get` by any number of peers.

Every channel is built from one :class:`ChannelContext` and reads its
backend's section of the config as a typed options object
(:mod:`fmi_async.channels.options`); the channels that exist are listed in
:mod:`fmi_async.channels.registry`.

Errors every channel operation may raise (all :class:`~fmi_async.errors.FMIError`):

* :class:`~fmi_async.errors.ClosedError` -- this channel was closed (by you);
* :class:`~fmi_async.errors.CommTimeout` -- the deadline passed;
* :class:`~fmi_async.errors.BrokenChannelError` -- the connection or the
  backend broke and the operation cannot complete;
* :class:`~fmi_async.errors.BackendUnavailable` -- a storage backend kept
  failing transiently until the deadline;
* :class:`~fmi_async.errors.ProtocolError` -- a peer or server sent bytes
  that are not a valid message;
* :class:`~fmi_async.errors.AbortedError` /
  :class:`~fmi_async.errors.PlanMismatchError` -- another peer gave up the
  collective this message belongs to, or planned it differently.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..config import Config
from ..errors import ClosedError
from ..wire import Key, Payload
from . import registry
from .mailbox import Mailbox
from .options import ChannelOptions, parse_options

if TYPE_CHECKING:
    from .memory import MemoryHub

__all__ = [
    "Channel",
    "ChannelContext",
    "ChannelStats",
    "DirectChannel",
    "MediatedChannel",
]

logger = logging.getLogger(__name__)


@dataclass
class ChannelStats:
    """What a channel carried; dollars are filled in by the cost model."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    pairs: dict[int, str] = field(default_factory=dict)  # peer -> "direct" / "relayed" / ...

    def sent(self, payload: Payload) -> None:
        """Count one message or object sent."""
        self.messages_sent += 1
        self.bytes_sent += payload.nbytes

    def received(self, payload: Payload, since: float | None = None) -> None:
        """Count one message or object received; ``since`` (``perf_counter``) adds
        the time the receive took."""
        self.messages_received += 1
        self.bytes_received += payload.nbytes
        if since is not None:
            self.seconds += time.perf_counter() - since

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages_sent": self.messages_sent,
            "bytes_sent": self.bytes_sent,
            "messages_received": self.messages_received,
            "bytes_received": self.bytes_received,
            "requests": dict(self.requests),
            "seconds": round(self.seconds, 6),
            "pairs": dict(self.pairs),
        }


@dataclass(frozen=True)
class ChannelContext:
    """Everything a channel is built from: who this peer is, in which job.

    ``run_id`` is the job's run id including its lease epoch (``run.epoch``):
    every name or pairing a channel makes carries it, so two jobs never mix.
    ``hub`` is the in-process meeting point of peers that share one process
    (:func:`fmi_async.local_peers`); only the memory channel uses it.
    ``mpi_comm`` is the mpi4py communicator of a job launched by MPI
    (:meth:`fmi_async.Communicator.from_mpi`; ``COMM_WORLD`` when None); only
    the MPI channel uses it.
    """

    peer_id: int
    num_peers: int
    comm_name: str
    run_id: str
    config: Config
    mailbox: Mailbox
    hub: MemoryHub | None = None
    mpi_comm: Any = None


class Channel(abc.ABC):
    """A way to move payloads between the peers of one communicator.

    Subclasses set ``name`` (their registry name), ``kind`` and ``Options``
    (their typed options class).  Building one parses its options:
    :class:`~fmi_async.errors.ConfigError` names a bad or unknown key.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["direct", "mediated"]]
    Options: ClassVar[type[ChannelOptions]] = ChannelOptions

    def __init__(self, ctx: ChannelContext) -> None:
        self.ctx = ctx
        self.peer_id = ctx.peer_id
        self.num_peers = ctx.num_peers
        self.comm_name = ctx.comm_name
        self.run_id = ctx.run_id
        self.config = ctx.config
        self.options: Any = self.parse_options(ctx.config)
        self.mailbox = ctx.mailbox
        self.stats = ChannelStats()
        self._state: Literal["new", "open", "closed"] = "new"

    @classmethod
    def parse_options(cls, config: Config) -> ChannelOptions:
        """This channel's section of ``config`` as its ``Options``.

        Raises :class:`~fmi_async.errors.ConfigError` naming a bad or unknown key.
        """
        section = registry.spec(cls.name).config_name
        return parse_options(cls.Options, config.options(cls.name), section)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} peer={self.peer_id}/{self.num_peers} "
            f"comm={self.comm_name!r} {self._state}>"
        )

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError(f"channel {self.name} of peer {self.peer_id} is {self._state}")

    async def open(self) -> None:
        """Connect to whatever the channel needs (server, storage, rendezvous).

        Raises :class:`~fmi_async.errors.ConfigError` for settings that
        cannot work, :class:`~fmi_async.errors.BackendError` or
        :class:`~fmi_async.errors.BackendUnavailable` when the backend
        cannot be reached within the deadline.
        """
        self._state = "open"

    async def close(self) -> None:
        """Release connections and delete what this peer stored; idempotent.

        Waits of this peer still in progress fail with
        :class:`~fmi_async.errors.ClosedError`.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        self.mailbox.fail(ClosedError(f"channel {self.name} of peer {self.peer_id} was closed"))

    def send_waits(self, dst: int) -> bool:
        """Whether a send to ``dst`` may have to wait (for a connection, flow control
        or a backend).  Callers with a deadline bound only such sends; a channel
        that knows a send completes at once says False and saves them the timer."""
        return True

    def all_delivered(self) -> None:  # noqa: B027 - a hook most channels need not override
        """Every peer has received every message sent to it (a final barrier said so).

        A channel that would otherwise clean up its sent messages at close
        (storage) leaves them alone from now on: their readers deleted them,
        and deleting one a slower reader is about to consume would lose it.
        """

    def collective_started(
        self, seq: int, plan: str, *, native: bool
    ) -> asyncio.Future[Any] | None:
        """Collective ``seq`` of the communicator starts under ``plan`` (on any channel).

        A channel that must see every collective (MPI posts its collectives in
        one order on every rank) returns what the collective waits for before
        it runs; ``native``: the plan runs this channel's own collective.
        Most channels return None.
        """
        return None

    def collective_abandoned(self, seq: int) -> None:  # noqa: B027 - a hook most need not override
        """This peer gave up collective ``seq`` (maybe before :meth:`collective_started`)."""

    @abc.abstractmethod
    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        """Deliver ``payload`` to peer ``dst`` under ``key``; returns when buffers may be reused.

        Raises :class:`~fmi_async.errors.ClosedError`,
        :class:`~fmi_async.errors.BrokenChannelError` (connection lost),
        :class:`~fmi_async.errors.BackendUnavailable` (storage kept failing) or
        :class:`~fmi_async.errors.ArgumentError` (a payload beyond the
        configured limits).  It does not time out by itself: callers bound it.
        """

    @abc.abstractmethod
    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        """The next payload from ``src`` under ``key``, waiting at most ``timeout`` seconds.

        ``None`` waits for the channel's own longest wait (its
        ``max_timeout``, else the config's ``timeout``).  Raises
        :class:`~fmi_async.errors.CommTimeout` when nothing came in time,
        :class:`~fmi_async.errors.ClosedError`,
        :class:`~fmi_async.errors.BrokenChannelError` (``src``'s connection
        broke), :class:`~fmi_async.errors.AbortedError` (another peer gave
        up the collective ``key`` belongs to).  A cancelled receive loses no
        message: it is handed to the next receive of the same match.
        """


class DirectChannel(Channel):
    """Peers exchange messages; arrivals go into the receiving peer's mailbox."""

    kind: ClassVar[Literal["direct", "mediated"]] = "direct"

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        mailbox = self.mailbox
        # A message already queued is taken at once: no future, no clock reads.
        payload = mailbox.take_now(src, key)
        if payload is not None:
            self.stats.received(payload)
            return payload
        start = time.perf_counter()
        payload = await mailbox.take(src, key, timeout, self.name)
        self.stats.received(payload, start)
        return payload


class MediatedChannel(Channel):
    """Peers exchange data through shared storage.

    Beyond point-to-point ``send``/``recv``, a mediated channel stores objects
    that many peers read: :meth:`put` once, :meth:`get` by any number of
    peers, :meth:`delete` by their owner.  Everything it stores is named under
    the communicator's name and run id, and lives at most its ``ttl``.
    """

    kind: ClassVar[Literal["direct", "mediated"]] = "mediated"

    @abc.abstractmethod
    def location(self) -> str:
        """Where the data lives, for messages (``redis://host:6379/0``, ``s3://bucket``)."""

    @abc.abstractmethod
    async def put(self, key: Key, payload: Payload) -> None:
        """Store one object under ``key`` that any number of peers may :meth:`get`.

        Raises :class:`~fmi_async.errors.ClosedError`,
        :class:`~fmi_async.errors.BackendError` (refused by the backend),
        :class:`~fmi_async.errors.BackendUnavailable` or
        :class:`~fmi_async.errors.CommTimeout` (the channel's write deadline).
        """

    @abc.abstractmethod
    async def get(self, key: Key, timeout: float | None) -> Payload:
        """The object stored under ``key``, waiting until it exists (it stays stored).

        Raises :class:`~fmi_async.errors.CommTimeout` when it did not appear
        in time (naming a backend failure that overlapped the wait), and what
        :meth:`put` raises.
        """

    @abc.abstractmethod
    async def delete(self, keys: Iterable[Key]) -> None:
        """Delete objects this peer :meth:`put`; missing ones are ignored."""

    @abc.abstractmethod
    async def sweep(
        self, prefix: str, select: Callable[[str], bool], *, dry_run: bool = False
    ) -> list[str]:
        """Delete every stored name under ``prefix`` that ``select`` accepts; return them.

        What ``fmi clean`` does after jobs that crashed; with ``dry_run``,
        only lists.  Raises the backend's errors (after retries).
        """
