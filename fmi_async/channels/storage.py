"""What the storage-backed ("mediated") channels share.

Redis, S3 and DynamoDB channels differ in how they store bytes and how a
reader learns that an object exists; they agree on everything else, which
lives here:

* **Names.**  Every stored name starts with ``fmi/<comm_name>/<run_id>/``, so
  two runs or two communicators on one bucket, table or database never read
  each other's data.  Key parts are percent-quoted and prefixed by type, so
  ``("u", 3)`` and ``("u", "3")`` never share a name, and no part can contain
  the ``/`` separator (:mod:`fmi_async.channels.storage_names`).
* **Encoding.**  A stored object is exactly one stream frame of
  :mod:`fmi_async.wire` (prefix, key, header, buffers), so the limits checked
  on the wire are checked on storage too, and the stored key is verified on
  the way back.  :func:`~fmi_async.channels.storage_chunks.join_range` cuts
  it into pieces for backends with an object or item size limit without
  joining the whole message first.
* **Matching.**  ``send``/``recv`` match by ``(source, key)`` like MPI: the
  sender numbers the messages it sends per ``(destination, key)`` and stores
  each under its own name; the receiver asks for the next number it has not
  consumed, so repeated sends with one key arrive in order.
* **Lifetime.**  A peer remembers every name it stored and its :meth:`close`
  deletes them (in batches).  A receiver deletes a message once it has read
  it (S3 and DynamoDB after ``delete_delay``, see below).  A peer that dies
  before closing leaves objects that expire: a TTL on every Redis key and
  DynamoDB item (``ttl``, by default a few times the config's ``timeout``),
  a bucket lifecycle rule on S3.
* **Transient faults.**  Every backend request runs under the deadline of
  the operation it serves (the caller's timeout for ``recv``/``get``, the
  config's ``timeout`` for writes) and is retried, with the jittered
  backoff of a :class:`~fmi_async.channels.backoff.RetryPolicy`, when it
  failed on the way (a reset connection, a restarting server, an HTTP
  5xx).  Only idempotent requests are retried: reads, deletes, objects of
  ``put`` (rewritten whole), and messages written so that a second copy is
  a no-op (a conditional write keyed by the message's name and number).
  The deadlines and retries are :mod:`fmi_async.channels.storage_runtime`'s.
* **Ghosts.**  A retried message write whose first attempt did land must not
  bring the message back after its reader consumed it.  S3 and DynamoDB
  write messages conditionally (``If-None-Match: *``, ``attribute_not_exists``),
  and the reader keeps a consumed message for ``delete_delay`` seconds (by
  default the config's ``timeout``, the longest a writer retries) before
  deleting it: any retry of the write meets the message still in place and
  is refused as a duplicate.  Redis dedupes on the server instead (see
  :mod:`fmi_async.channels.redis`).

``close`` deletes objects other peers may not have read yet; the communicator
must reach a barrier before closing its channels (as MPI_Finalize does).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import ClassVar

from ..errors import ArgumentError, BackendUnavailable, ClosedError, CommTimeout, ProtocolError
from ..wire import Buffer, FrameReader, Key, Payload, encode_frame
from .backoff import poll_until
from .base import ChannelContext
from .mailbox import describe_key
from .storage_chunks import bounded_gather, chunk_bounds, join_range
from .storage_names import default_ttl, encode_key, key_component, storage_prefix
from .storage_runtime import LockEntry, StorageRuntime

# The naming and chunking helpers are imported from here by the backends and
# the cleanup tools; they are defined in storage_names and storage_chunks.
__all__ = [
    "StorageChannel",
    "bounded_gather",
    "chunk_bounds",
    "default_ttl",
    "join_range",
    "key_component",
    "storage_prefix",
]

logger = logging.getLogger(__name__)

STREAM_NAME_CACHE = 1024  # stream names a channel remembers (see message_name)


class StorageChannel(StorageRuntime):
    """What the storage channels share: a mediated channel over three primitives.

    Beyond :class:`~fmi_async.channels.base.Channel`'s point-to-point
    ``send``/``recv``, a mediated channel stores objects that many peers read:
    :meth:`put` once, :meth:`get` by any number of peers, :meth:`delete`.

    Subclasses implement three primitives (:meth:`_store`, :meth:`_load`,
    :meth:`_remove`); this class turns them into polling ``recv``/``get``
    bounded by a :class:`~fmi_async.channels.backoff.Backoff`.  A backend that
    can block on the server (Redis) overrides the operations instead.

    Options every mediated backend reads: ``ttl`` (seconds stored objects
    live when nobody deletes them; default :func:`default_ttl` of the
    config's ``timeout``), ``max_timeout`` (FMI's key: milliseconds a receive
    waits when the caller gives no timeout; default the config's
    ``timeout``), ``delete_delay`` (seconds a consumed message is kept
    before its reader deletes it, S3 and DynamoDB), the backoff keys of
    :meth:`Backoff.from_options` and the retry keys of
    :meth:`RetryPolicy.from_options`.  Deadlines, retries, per-stream order
    and background deletes come from
    :class:`~fmi_async.channels.storage_runtime.StorageRuntime`.
    """

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        self._owned: set[str] = set()  # objects this peer put
        self._sent: set[str] = set()  # messages this peer sent (their readers delete them)
        # Set by all_delivered(); after an error, close deletes sent messages too.
        self._keep_sent = False
        self._send_seq: dict[tuple[int, Key], int] = {}
        self._recv_seq: dict[tuple[int, Key], int] = {}
        self._recv_locks: dict[tuple[int, Key], LockEntry] = {}
        self._send_locks: dict[tuple[int, Key], LockEntry] = {}
        self._stream_names: dict[tuple[int, int, Key], str] = {}
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} peer={self.peer_id}/{self.num_peers} "
            f"{self.location()} prefix={self.prefix!r} owned={len(self._owned)} {self._state}>"
        )

    def all_delivered(self) -> None:
        self._keep_sent = True

    # ---------------------------------------------------------------- backend hooks

    @abc.abstractmethod
    @abc.abstractmethod
    async def _store(
        self, name: str, frames: Sequence[Buffer], nbytes: int, *, exclusive: bool = False
    ) -> None:
        """Store the concatenation of ``frames`` under ``name``, visible all at once.

        ``exclusive`` (messages): write only if ``name`` does not exist, and
        take "it exists, written by this channel" as success, so a retried
        write never stores a second copy.
        """

    @abc.abstractmethod
    async def _load(self, name: str, consume: bool) -> list[Buffer] | None:
        """One attempt to read ``name``: its pieces in order, or None if it does not exist yet.

        ``consume`` is true when a receive will delete ``name`` right after
        (a backend may note what it needs for that delete).
        """

    @abc.abstractmethod
    async def _shutdown(self) -> None:
        """Release clients and connections (after the final deletes)."""

    async def list_names(self, prefix: str) -> list[str]:
        """Every stored name that starts with ``prefix`` (any run, any peer).

        For tests and cleanup (``fmi clean``), never the data path.  Raises
        :class:`~fmi_async.errors.ClosedError` when the channel is not open
        and the backend's errors as for any request.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its objects")

    async def list_run(self) -> list[str]:
        """Every stored name of this run and communicator (all peers): for tests and cleanup.

        Raises as :meth:`list_names`.
        """
        self._check_open()
        return await self.list_names(self.prefix + "/")

    async def sweep(
        self, prefix: str, select: Callable[[str], bool], *, dry_run: bool = False
    ) -> list[str]:
        """Delete every stored name under ``prefix`` that ``select`` accepts; return them.

        What ``fmi clean`` does per backend (S3 also aborts incomplete
        multipart uploads there).  With ``dry_run``, only lists.  Raises as
        :meth:`list_names` and :meth:`purge`.
        """
        names = sorted(n for n in await self.list_names(prefix) if select(n))
        if names and not dry_run:
            await self.purge(names)
        return names

    async def purge(self, names: Collection[str]) -> None:
        """Delete ``names`` (any run's, as :meth:`list_names` found them); missing ones are fine.

        Raises :class:`~fmi_async.errors.ClosedError` when the channel is not
        open, and the backend's errors (after retries within the config's
        ``timeout``).
        """
        self._check_open()
        with self._within(self._write_deadline()):
            await self._remove(names)

    # ---------------------------------------------------------------- names

    def object_name(self, key: Key) -> str:
        """Where :meth:`put` stores ``key``."""
        return self._checked(f"{self.prefix}/obj/{encode_key(key)}")

    def message_name(self, src: int, dst: int, key: Key, seq: int | None = None) -> str:
        """Where message number ``seq`` from ``src`` to ``dst`` under ``key`` lives.

        Without ``seq``: the name of the whole ``(src, dst, key)`` stream (a
        Redis list).
        """
        if seq is None:
            # A stream's name is built on every send and receive; user streams
            # repeat, so remember a bounded number of them.
            cached = self._stream_names.get((src, dst, key))
            if cached is not None:
                return cached
        name = f"{self.prefix}/msg/{src}/{dst}/{encode_key(key)}"
        if seq is not None:
            return self._checked(f"{name}/{seq}")
        if len(self._stream_names) >= STREAM_NAME_CACHE:
            self._stream_names.clear()
        self._stream_names[(src, dst, key)] = self._checked(name)
        return name

    max_name_bytes: ClassVar[int] = 1024

    def _checked(self, name: str) -> str:
        if len(name.encode()) > self.max_name_bytes:
            raise ArgumentError(
                f"storage name of {len(name.encode())} bytes exceeds the {self.max_name_bytes} "
                f"{self.name} allows; use a shorter communicator name, run id or message key"
            )
        return name

    # ---------------------------------------------------------------- helpers

    def _encode(self, key: Key, payload: Payload) -> tuple[list[Buffer], int]:
        frames = encode_frame(key, payload, self.config.limits)
        return frames, sum(memoryview(f).nbytes for f in frames)

    def _decode(self, parts: Iterable[Buffer], name: str, key: Key) -> Payload:
        reader = FrameReader(self.config.limits)
        frames: list[tuple[Key, Payload]] = []
        for part in parts:
            frames.extend(reader.feed(part))
        reader.eof()
        if len(frames) != 1 or frames[0][0] != tuple(key):
            found = [k for k, _ in frames]
            raise ProtocolError(
                f"stored object {name!r} on {self.location()} holds messages {found}, expected one "
                f"for key {key!r}; is another program writing under the prefix {self.prefix!r}?"
            )
        return frames[0][1]

    def _check_peer(self, peer: int, role: str) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.num_peers:
            raise ArgumentError(f"{role} {peer!r} is not a peer of a group of {self.num_peers}")

    def _check_open(self) -> None:
        # Also refuse while close() deletes: a poll that outlives close() must
        # stop instead of using a client that is being released.
        super()._check_open()
        if self._closing:
            raise ClosedError(f"channel {self.name} of peer {self.peer_id} is closing")

    async def _attempt(
        self, name: str, consume: bool, failures: list[BackendUnavailable]
    ) -> list[Buffer] | None:
        """One poll.  A backend that failed until the deadline means "not there in
        time" (noted in ``failures`` for the timeout's message)."""
        self._check_open()
        try:
            return await self._load(name, consume)
        except BackendUnavailable as exc:
            failures.append(exc)
            return None

    # ---------------------------------------------------------------- channel API

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        self._check_peer(dst, "destination")
        match = (dst, key)
        seq = self._send_seq.get(match, 0)
        self._send_seq[match] = seq + 1
        name = self.message_name(self.peer_id, dst, key, seq)
        start = time.perf_counter()
        frames, nbytes = self._encode(key, payload)
        self._sent.add(name)
        with self._within(self._write_deadline()):
            await self._store(name, frames, nbytes, exclusive=True)
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        self._check_peer(src, "source")
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        match = (src, key)
        seq = self._recv_seq.get(match, 0)
        name = self.message_name(src, self.peer_id, key, seq)
        failures: list[BackendUnavailable] = []
        try:
            async with self._exclusive(self._recv_locks, match, deadline):
                seq = self._recv_seq.get(match, 0)
                name = self.message_name(src, self.peer_id, key, seq)
                with self._within(deadline):
                    parts = await poll_until(
                        lambda: self._attempt(name, True, failures), deadline, self.backoff
                    )
                if parts is not None:
                    self._recv_seq[match] = seq + 1
        except TimeoutError as exc:
            if isinstance(exc, CommTimeout):
                raise
            parts = None
        if parts is None:
            raise self._timeout(
                f"message #{seq} from peer {src} ({describe_key(key)})",
                wait,
                f"check that peer {src} sent it to peer {self.peer_id} with the same "
                "communicator name, run id and backend",
                failures,
            )
        self._delete_later([name])
        payload = self._decode(parts, name, key)
        self.stats.received(payload, start)
        return payload

    async def put(self, key: Key, payload: Payload) -> None:
        """Store one object under ``key`` that any number of peers may :meth:`get`."""
        self._check_open()
        start = time.perf_counter()
        name = self.object_name(key)
        frames, nbytes = self._encode(key, payload)
        self._owned.add(name)
        with self._within(self._write_deadline()):
            await self._store(name, frames, nbytes)
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    async def get(self, key: Key, timeout: float | None) -> Payload:
        """The object stored under ``key``, waiting until it exists (non-destructive)."""
        self._check_open()
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        name = self.object_name(key)
        failures: list[BackendUnavailable] = []
        with self._within(deadline):
            parts = await poll_until(
                lambda: self._attempt(name, False, failures), deadline, self.backoff
            )
        if parts is None:
            raise self._get_timeout(key, wait, failures)
        payload = self._decode(parts, name, key)
        self.stats.received(payload, start)
        return payload

    def _leftovers(self) -> set[str]:
        """Further names close() deletes in any case (a backend's bookkeeping keys)."""
        return set()

    def _get_timeout(
        self, key: Key, wait: float, failures: Sequence[BaseException] = ()
    ) -> CommTimeout:
        return self._timeout(
            f"object {describe_key(key)}",
            wait,
            "check that the peer meant to put it did so under the same key, communicator "
            "name, run id and backend, and that it did not fail first",
            failures,
        )

    async def delete(self, keys: Iterable[Key]) -> None:
        """Delete the objects :meth:`put` stored under ``keys`` (missing ones are ignored)."""
        self._check_open()
        names = [self.object_name(k) for k in keys]
        if names:
            with self._within(self._write_deadline()):
                await self._remove(names)
            self._owned.difference_update(names)

    async def close(self) -> None:
        """Delete everything this peer stored in this run, then release the backend.

        Idempotent.  If the deletes fail, the error is raised after the
        clients are released; what remains expires by TTL.
        """
        if self._state != "open":
            await super().close()
            return
        if self._closing:
            return
        self._closing = True
        try:
            async with asyncio.timeout(self.config.timeout):
                if self._reaper is not None:
                    self._reaper.cancel()
                    await asyncio.gather(self._reaper, return_exceptions=True)
                if self._background:
                    await asyncio.gather(*self._background, return_exceptions=True)
                names = self._owned if self._keep_sent else self._owned | self._sent
                names = names | self._leftovers() | {name for _, name in self._consumed}
                if names:
                    with self._within(self._write_deadline()):
                        await self._remove(sorted(names))
                    self._owned.clear()
                    self._sent.clear()
                    self._consumed.clear()
        except TimeoutError as exc:
            if isinstance(exc, CommTimeout):
                raise
            raise CommTimeout(
                f"peer {self.peer_id} could not delete its {len(self._owned) + len(self._sent)} "
                "stored objects "
                f"on {self.location()} within {self.config.timeout:g}s; they expire by TTL "
                "(or the bucket's lifecycle rule)"
            ) from None
        finally:
            try:
                await self._shutdown()
            finally:
                await super().close()
                logger.debug("%r closed", self)
