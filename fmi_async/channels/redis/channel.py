"""Redis channel: blocking list operations, so no reader ever polls (redis.asyncio).

Point-to-point: each ``(source, destination, key)`` stream is a Redis list.
``send`` appends (RPUSH) and the receiver waits on the server with BLMOVE,
which returns the moment a message arrives; the list's order is the send
order, which is the matching MPI promises.

Shared objects: ``put`` stores a one-element list; ``get`` waits with
``BLMOVE name name LEFT RIGHT``, which pops the element and pushes it back
in one atomic step.  The list is unchanged, every blocked reader is served
as soon as the object exists, and the writer does not need to know who the
readers are (no per-reader notifications).

Large values: list elements stay small.  A message of more than
``inline_max`` bytes of data (its frame header, up to ``HEADER_ROOM``, does
not count, so a 1 MiB array stays inline at the default) is stored as
string keys of at most ``chunk_size`` bytes (Redis caps a value at
512 MB) and the list element is only a reference to them, pushed after
the chunks are written, so a reader never sees a reference before its data.

Connection loss and restarts.  Every command runs under the deadline of its
operation and is retried with the jittered backoff of the channel's
:class:`~fmi_async.channels.backoff.RetryPolicy` when the connection broke
or the server is restarting (``LOADING``) or busy; redis-py's own retries
are off, since it would resend commands that are not idempotent.  A reply
lost with its connection leaves the client not knowing whether the command
ran, so every command that may be sent twice is made harmless to repeat:

* **A push is keyed by a message number.**  Each send takes a number from a
  counter of the channel, and the push (one EVALSHA of ``PUSH_SCRIPT``, or a
  MULTI/EXEC where scripts are refused) appends the element only if the
  sender's *mark* for that stream holds a lower number, and raises the mark
  in the same atomic step.  A retried push whose first attempt ran finds
  the mark and is a no-op: the message is delivered once, even when its
  reader has consumed it in between (a retried plain RPUSH would deliver
  it twice).  Marks carry the channel's random token, live for ``ttl``, and
  are deleted by the sender's ``close``.
* **A pop is a move into an in-flight list.**  ``recv`` runs ``BLMOVE stream
  taken LEFT RIGHT`` (and, in the same pipeline, an EXPIRE of ``taken``),
  where ``taken`` is a key unique to this receive.  If the reply is lost,
  the retry first looks into ``taken``: the message is either still in the
  stream or there, never gone.  A receive that fails or is cancelled after
  the move puts the element back at the head of its stream (``LMOVE taken
  stream RIGHT LEFT``, in MULTI/EXEC, before the next receive of that
  stream), so a cancelled ``recv`` never drops a message.  In-flight keys
  and the chunks of consumed messages are deleted in batches in the
  background (one UNLINK for all that accumulated); this, and the EXPIRE,
  is the price of recoverable pops over a bare BLPOP.
* Reads (``get``'s rotation, MGET of chunks), ``put`` (MULTI/EXEC of the
  whole object) and deletes are idempotent as they are.

When the deadline passes with the server still unreachable, the operation
raises :class:`~fmi_async.errors.BrokenChannelError` naming the server, the
command and the number of failures.  A server restarted *without*
persistence has lost what it held; receives then end in
:class:`~fmi_async.errors.CommTimeout` (the messages are gone, not late).

Every key gets the ``ttl`` option (seconds; default four times the config's
``timeout``, at least 60) as expiry, so a peer that dies before ``close``
leaves nothing that lasts much longer than a deadline.

Connections: one pool per channel, bounded by ``max_connections``.  A
blocking command holds its connection while it waits, so at most
``max_connections - 2`` blocking commands run at once; two connections stay
free for the writes that will wake them.  hiredis parses replies when it is
installed.

Options (``backends.Redis``): ``host``, ``port`` (FMI's), ``db``, ``url``
(``redis://`` or ``rediss://``, instead of host/port/db), ``username``,
``password``, ``max_connections`` (default 32), ``chunk_size`` (default
64 MiB), ``inline_max`` (default 1 MiB), ``ttl``, ``max_timeout`` (FMI's,
milliseconds a receive waits when the caller gives no timeout),
``socket_timeout`` (seconds a non-blocking command may take, default 30),
``retry_initial``/``retry_max`` (seconds between retries, 0.02 growing to 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import cast

from ...errors import BackendError, BackendUnavailable, ConfigError, FMIError, ProtocolError
from ...wire import MAGIC, Buffer, Key, Payload
from ..base import ChannelContext
from ..mailbox import describe_key
from ..options import StorageOptions, option
from ..storage import chunk_bounds, join_range
from .connection import RESERVED_CONNECTIONS
from .layout import (
    HEADER_ROOM,
    REF_MAGIC,
    UNLINK_BATCH,
    MiB,
    glob_escape,
    pack_reference,
    unpack_reference,
)
from .once import RedisOnce

__all__ = ["RedisChannel", "RedisOptions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisOptions(StorageOptions):
    """``backends.Redis``: the server and how this channel uses it."""

    host: str = option("localhost", doc="server host")
    port: int = option(6379, ge=1, le=65535, doc="server port")
    db: int = option(0, ge=0, doc="database number")
    url: str | None = option(None, doc="redis:// or rediss:// URL; wins over host/port/db")
    username: str | None = option(None, doc="ACL user name")
    password: str | None = option(None, doc="password (prefer the URL or environment)")
    max_connections: int = option(
        32, ge=RESERVED_CONNECTIONS + 1, doc="connection pool size of this peer"
    )
    chunk_size: int = option(64 * MiB, ge=1, le=512 * MiB, doc="bytes per stored chunk")
    inline_max: int = option(MiB, ge=0, doc="data bytes sent inline in one push")
    socket_timeout: float = option(30.0, ge=0.01, doc="seconds one reply may take")
    tls: bool = option(False, doc="talk TLS to host/port (a rediss:// URL implies it)")
    tls_ca: str | None = option(None, doc="CA certificate file (PEM) the server's is checked with")
    tls_cert: str | None = option(None, doc="client certificate file (PEM), when the server asks")
    tls_key: str | None = option(None, doc="private key file (PEM) of tls_cert")
    tls_check_hostname: bool = option(
        True, doc="the server's certificate must name the host connected to"
    )


class RedisChannel(RedisOnce):
    """A mediated channel over one Redis database; see the module docstring."""

    name = "redis"
    max_name_bytes = 4096
    keep_consumed = False  # pushes dedupe on the server: no ghost can come back

    Options = RedisOptions
    options: RedisOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        opts = self.options
        self.chunk_size = opts.chunk_size
        if opts.inline_max > self.chunk_size:
            raise ConfigError(
                f"backends.Redis.inline_max must be at most chunk_size ({self.chunk_size}), "
                f"got {opts.inline_max}"
            )
        self.inline_max = opts.inline_max
        self._data_keys: dict[str, list[str]] = {}  # list name -> chunk keys written for it

    # ---------------------------------------------------------------- writes

    async def _write(
        self, list_name: str, frames: Sequence[Buffer], nbytes: int, *, replace: bool
    ) -> None:
        """Append one element (inline, or a reference to chunk keys) to ``list_name``.

        ``replace``: make it the list's only element (an object of ``put``,
        rewritten whole, so a retry is harmless); otherwise push it as a
        message, numbered so that a retry is a no-op.
        """
        chunks: list[tuple[str, bytes]] = []
        if nbytes <= self.inline_max + HEADER_ROOM:
            element = join_range(frames, 0, nbytes)
        else:
            base = f"{self.prefix}/data/{self.peer_id}.{self._token}/{next(self._counter)}"
            bounds = chunk_bounds(nbytes, self.chunk_size)
            chunks = [
                (f"{base}/{i}", join_range(frames, lo, hi)) for i, (lo, hi) in enumerate(bounds)
            ]
            element = pack_reference(base, len(bounds), nbytes)
            self._data_keys.setdefault(list_name, []).extend(k for k, _ in chunks)
        limit = self.socket_timeout + nbytes / (50 * MiB)

        if replace:
            # Chunks, list and TTLs in one MULTI/EXEC: no reader sees half of it.
            async def store() -> None:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for chunk_key, data in chunks:
                        pipe.set(chunk_key, data, ex=self.ttl)
                    pipe.delete(list_name)
                    pipe.rpush(list_name, element)
                    pipe.expire(list_name, self.ttl)
                    await pipe.execute()

            await self._call("multi", store, limit)
            return

        if chunks:
            # The chunks first (rewriting them is harmless: nobody can read
            # them before their reference is pushed), then the reference.
            async def store_chunks() -> None:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for chunk_key, data in chunks:
                        pipe.set(chunk_key, data, ex=self.ttl)
                    await pipe.execute()

            await self._call("set", store_chunks, limit)
        await self._push_once(list_name, element, limit)

    async def _store(
        self, name: str, frames: Sequence[Buffer], nbytes: int, *, exclusive: bool = False
    ) -> None:
        await self._write(name, frames, nbytes, replace=not exclusive)

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        self._check_peer(dst, "destination")
        start = time.perf_counter()
        name = self.message_name(self.peer_id, dst, key)
        frames, nbytes = self._encode(key, payload)
        self._sent.add(name)
        # The list's order is the delivery order: concurrent sends of one
        # stream must reach the server in call order, not pool order.
        deadline = self._write_deadline()
        try:
            async with self._exclusive(self._send_locks, (dst, key), deadline):
                with self._within(deadline):
                    await self._write(name, frames, nbytes, replace=False)
        except TimeoutError as exc:
            if isinstance(exc, FMIError):
                raise
            raise self._timeout(
                f"earlier sends to peer {dst} ({describe_key(key)})",
                self.config.timeout,
                "the Redis server is slow or unreachable",
            ) from None
        self.stats.sent(payload)
        self.stats.seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- reads

    async def _resolve(
        self, element: bytes, name: str, consume: bool
    ) -> tuple[list[Buffer], list[str]] | None:
        """The stored bytes behind a list element, and its chunk keys; None if they vanished."""
        if element.startswith(MAGIC):
            return [element], []
        if not element.startswith(REF_MAGIC):
            raise ProtocolError(
                f"list {name!r} on {self.location()} holds an element that is not an fmi "
                f"message; is another program writing under the prefix {self.prefix!r}?"
            )
        keys, nbytes = unpack_reference(element, name)
        # A plain read, so it may be retried; the chunks of a consumed
        # message are deleted afterwards, with its in-flight key.
        values = await self._call(
            "mget",
            functools.partial(self._redis.mget, keys),
            self.socket_timeout + nbytes / (50 * MiB),
        )
        if any(v is None for v in values):
            if consume:
                raise BackendError(
                    f"the chunks of a message in {name!r} on {self.location()} are gone; "
                    "they expired (raise backends.Redis.ttl) or were evicted (maxmemory policy)"
                )
            return None
        return cast(list[Buffer], list(values)), keys

    async def _load(self, name: str, consume: bool) -> list[Buffer] | None:
        if consume:  # not on the data path (recv moves instead), and not retried
            reply = await self._run("lpop", functools.partial(self._command, "LPOP", name))
        else:
            reply = await self._call("lindex", functools.partial(self._command, "LINDEX", name, 0))
        if reply is None:
            return None
        resolved = await self._resolve(bytes(reply), name, consume)
        return None if resolved is None else resolved[0]

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        self._check_peer(src, "source")
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        name = self.message_name(src, self.peer_id, key)
        taken: tuple[bytes, str] | None = None
        resolved: tuple[list[Buffer], list[str]] | None = None
        failures: list[BackendUnavailable] = []
        with contextlib.suppress(TimeoutError):
            async with self._exclusive(self._recv_locks, (src, key), deadline):
                await self._settled(name, deadline)
                with self._within(deadline):
                    taken = await self._take(name, deadline, failures)
                    if taken is not None:
                        element, in_flight = taken
                        try:
                            resolved = await self._resolve(element, name, consume=True)
                        except BaseException:
                            self._put_back(in_flight, name)
                            raise
        if taken is None:
            raise self._timeout(
                f"a message from peer {src} ({describe_key(key)})",
                wait,
                f"check that peer {src} sent it to peer {self.peer_id} with the same "
                "communicator name, run id and Redis database",
                failures,
            )
        assert resolved is not None  # consume=True raises instead of returning None
        parts, chunk_keys = resolved
        self._delete_later([in_flight, *chunk_keys])
        payload = self._decode(parts, name, key)
        self.stats.received(payload, start)
        return payload

    async def get(self, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        name = self.object_name(key)
        loop = asyncio.get_running_loop()
        resolved: tuple[list[Buffer], list[str]] | None = None
        failures: list[BackendUnavailable] = []
        with self._within(deadline):
            while resolved is None:
                # A rotation of the one-element list: harmless to repeat.
                try:
                    element = await self.retrying(
                        "blmove",
                        functools.partial(
                            self._blocking_move, name, name, ("LEFT", "RIGHT"), deadline, False
                        ),
                    )
                except BackendUnavailable as exc:
                    failures.append(exc)
                    element = None  # not there in time
                if element is not None:
                    resolved = await self._resolve(element, name, consume=False)
                if resolved is None and loop.time() >= deadline:
                    raise self._get_timeout(key, wait, failures)
        payload = self._decode(resolved[0], name, key)
        self.stats.received(payload, start)
        return payload

    # ---------------------------------------------------------------- cleanup

    async def _remove(self, names: Collection[str]) -> None:
        keys = sorted({*names, *(k for n in names for k in self._data_keys.pop(n, ()))})
        if not keys:
            return

        async def unlink() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in range(0, len(keys), UNLINK_BATCH):
                    pipe.unlink(*keys[i : i + UNLINK_BATCH])
                await pipe.execute()

        await self._call("unlink", unlink)

    async def list_names(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (SCAN with a MATCH pattern)."""
        self._check_open()
        return [k async for k in self._scan(prefix)]

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        cursor: int = 0
        pattern = glob_escape(prefix) + "*"
        while True:
            cursor, found = await self._call(
                "scan", functools.partial(self._redis.scan, cursor, match=pattern, count=1000)
            )
            for raw in found:
                yield raw.decode() if isinstance(raw, bytes) else str(raw)
            if cursor == 0:
                return
