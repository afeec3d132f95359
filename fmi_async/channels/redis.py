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
import contextvars
import functools
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import msgpack
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.utils import HIREDIS_AVAILABLE

from ..errors import (
    BackendError,
    BackendUnavailable,
    BrokenChannelError,
    ConfigError,
    FMIError,
    ProtocolError,
)
from ..wire import MAGIC, Buffer, Key, Payload
from .base import ChannelContext
from .mailbox import describe_key
from .options import StorageOptions, option
from .storage import StorageChannel, chunk_bounds, join_range

__all__ = ["RedisChannel", "RedisOptions"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB: Final = 1024 * 1024
REF_MAGIC: Final = b"FMIr"  # a list element that points at chunk keys
UNLINK_BATCH: Final = 1000
RESERVED_CONNECTIONS: Final = 2
SCRIPT_MAX: Final = 8 * 1024  # larger elements: Lua's copy costs more than a pipeline
# Room for a frame's own header on top of inline_max: a header is some tens of
# bytes, and without it a power-of-two array just over the limit paid the
# chunk path's extra round trip.
HEADER_ROOM: Final = 4 * 1024
# A blocking command asks the server to wait until the deadline; its reply
# (nil) may take this long on top to come back before the client gives up.
# A busy event loop reads replies late (one process running many peers that
# fold large arrays): a reply cut off that way counts as "not there in time"
# and its element goes back to the stream, so the caller's next wait finds it.
REPLY_SLACK: Final = 0.5
# Appends a message unless the sender's mark says it did already (see the
# module docstring).  KEYS: the list, the mark; ARGV: element, TTL (s), number.
# RPUSH comes first: when it fails (a string where the list belongs) the
# script stops with nothing written.
PUSH_SCRIPT: Final = """
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if last >= tonumber(ARGV[3]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return 1
"""
# Error replies after which the same command may succeed: a server loading
# its data after a restart, a busy script, a failover in progress.
_TRANSIENT_REPLIES: Final = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")


@contextlib.contextmanager
def _map_errors(channel: RedisChannel, operation: str) -> Iterator[None]:
    """Count one ``operation`` round trip and turn redis/socket errors into fmi errors."""
    channel.stats.requests[operation] += 1
    with redis_errors(channel.location(), operation):
        yield


@contextlib.contextmanager
def redis_errors(where: str, operation: str) -> Iterator[None]:
    """Turn redis and socket errors of ``operation`` on ``where`` into fmi errors
    (the one place for the channel and the job lease's Redis store)."""
    try:
        yield
    except FMIError:
        raise
    except rexc.AuthenticationError as exc:
        raise BackendError(
            f"{operation} on {where}: the server refused the credentials ({exc}); "
            "check backends.Redis username/password or the url"
        ) from exc
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
        raise BrokenChannelError(
            f"{operation} on {where}: connection failed ({exc}); is redis-server running "
            "there and reachable from this function?"
        ) from exc
    except rexc.ResponseError as exc:
        raise BackendError(
            f"{operation} on {where}: the server answered with an error: {exc} (an 'OOM' "
            "error means maxmemory is reached: lower ttl or raise maxmemory)"
        ) from exc
    except rexc.RedisError as exc:
        raise BackendError(f"{operation} on {where} failed: {exc}") from exc


def transient_redis_error(exc: BaseException) -> bool:
    """Whether a command that failed with ``exc`` (as mapped) may succeed when sent again."""
    if isinstance(exc, BackendUnavailable):
        return False  # the deadline came
    if isinstance(exc, BrokenChannelError):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, BackendError)
        and isinstance(cause, rexc.ResponseError)
        and str(cause).startswith(_TRANSIENT_REPLIES)
    )


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


class RedisChannel(StorageChannel):
    """A mediated channel over one Redis database; see the module docstring."""

    name = "redis"
    max_name_bytes = 4096
    keep_consumed = False  # pushes dedupe on the server: no ghost can come back

    Options = RedisOptions
    options: RedisOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        opts = self.options
        self.max_connections = opts.max_connections
        self.chunk_size = opts.chunk_size
        if opts.inline_max > self.chunk_size:
            raise ConfigError(
                f"backends.Redis.inline_max must be at most chunk_size ({self.chunk_size}), "
                f"got {opts.inline_max}"
            )
        self.inline_max = opts.inline_max
        self.socket_timeout = opts.socket_timeout
        self.url = opts.url
        self.host = opts.host
        self.port = opts.port
        self.db = opts.db
        self._blocking = asyncio.Semaphore(self.max_connections - RESERVED_CONNECTIONS)
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._token = secrets.token_hex(4)  # distinguishes two channels of one peer id
        self._counter = itertools.count()  # chunk bases, in-flight keys, message numbers
        self._data_keys: dict[str, list[str]] = {}  # list name -> chunk keys written for it
        self._push: AsyncScript | None = None
        self._putting_back: dict[str, asyncio.Task[None]] = {}  # stream -> its put-back

    def location(self) -> str:
        if self.url is not None:
            return f"redis {self.url.rsplit('@', 1)[-1]}"  # never print a password
        return f"redis {self.host}:{self.port}/{self.db}"

    def _transient(self, exc: BaseException) -> bool:
        return transient_redis_error(exc)

    def _mark_name(self, stream: str) -> str:
        """The sender's dedupe mark of ``stream``: the highest message number it pushed."""
        tail = stream[len(self.prefix) + len("/msg/") :]
        return f"{self.prefix}/mark/{self.peer_id}.{self._token}/{tail}"

    def _leftovers(self) -> set[str]:
        return {self._mark_name(stream) for stream in self._sent}

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            return
        common: dict[str, Any] = {
            "max_connections": self.max_connections,
            "timeout": None,  # waiting for a connection is bounded by our own deadlines
            "socket_timeout": None,  # blocking commands outlive any fixed socket timeout
            "socket_connect_timeout": self.socket_timeout,
            # redis-py must not resend on its own: a resent RPUSH or BLMOVE
            # is not harmless.  The channel retries what is (see above).
            "retry": Retry(NoBackoff(), 0),
        }
        if self.url is not None:
            pool = aioredis.BlockingConnectionPool.from_url(self.url, **common)
        else:
            pool = aioredis.BlockingConnectionPool(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.options.username,
                password=self.options.password,
                **common,
            )
        self._pool = pool
        self._client = aioredis.Redis(connection_pool=pool)
        self._push = self._client.register_script(PUSH_SCRIPT)  # no round trip yet
        try:
            async with self._open_deadline():
                # Not retried: a server that is not there when the job starts
                # is a configuration to fix, reported at once.
                await self._run("ping", lambda: self._redis.ping())
        except BaseException:
            await self._shutdown()
            raise
        await super().open()
        logger.debug("%r opened (hiredis parser: %s)", self, HIREDIS_AVAILABLE)

    async def _shutdown(self) -> None:
        client, pool = self._client, self._pool
        self._client = self._pool = None
        if client is not None:
            await client.aclose()
        if pool is not None:
            await pool.aclose()

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokenChannelError(f"{self!r} has no connection")
        return self._client

    async def _command(self, *args: Any) -> Any:
        """A raw command: BLMOVE takes a fractional timeout, which redis-py's stub types as int."""
        execute: Callable[..., Awaitable[Any]] = self._redis.execute_command
        return await execute(*args)

    async def _run(
        self, operation: str, call: Callable[[], Awaitable[T]], limit: float | None = None
    ) -> T:
        """One attempt of one round trip, bounded by ``limit``, errors mapped.

        ``limit`` defaults to ``socket_timeout`` or what is left of the
        operation's deadline, whichever is shorter.  A command cancelled by
        the limit leaves no half-read connection: redis-py disconnects a
        connection whose read was interrupted.
        """
        if limit is None:
            limit = min(self.socket_timeout, self.attempt_limit())
        try:
            async with asyncio.timeout(limit):
                with _map_errors(self, operation):
                    return await call()
        except TimeoutError as exc:
            if isinstance(exc, FMIError):
                raise
            error: BrokenChannelError
            if asyncio.get_running_loop().time() >= self.op_deadline():
                error = BackendUnavailable(
                    f"{operation} on {self.location()}: no answer within {limit:.3g}s, when the "
                    "operation's deadline came"
                )
                self.note_failure(error)
            else:
                error = BrokenChannelError(
                    f"{operation} on {self.location()}: no answer within {limit:.3g}s; the "
                    "server is overloaded or the network path is broken"
                )
            raise error from None

    async def _call(
        self, operation: str, call: Callable[[], Awaitable[T]], limit: float | None = None
    ) -> T:
        """:meth:`_run`, retried while it fails transiently, until the operation's deadline.

        Only for commands that are harmless to repeat.
        """
        return await self.retrying(operation, lambda: self._run(operation, call, limit))

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
            element = REF_MAGIC + msgpack.packb([base, len(bounds), nbytes])
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

    async def _push_once(self, list_name: str, element: bytes, limit: float) -> None:
        """Append ``element`` to ``list_name`` exactly once, however often it is retried."""
        mark = self._mark_name(list_name)
        number = next(self._counter)
        retried = False

        async def scripted() -> None:
            assert self._push is not None
            push = self._push
            await push(keys=[list_name, mark], args=[element, self.ttl, number])

        async def transaction() -> None:
            nonlocal retried
            if retried:
                # A MULTI of an earlier attempt may have run: its mark says so.
                last = await self._redis.get(mark)
                if last is not None and int(last) >= number:
                    return
            retried = True
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.rpush(list_name, element)
                pipe.expire(list_name, self.ttl)
                pipe.set(mark, number, ex=self.ttl)
                await pipe.execute()

        if self._push is not None and len(element) <= SCRIPT_MAX:
            # A small message: one EVALSHA.  A redis-py pipeline costs an
            # extra task per call, about a fifth of a small message's time on
            # loopback (benchmarks/mediated.py); above SCRIPT_MAX, Lua's copy
            # of the argument costs more than that.
            try:
                await self._call("rpush", scripted)
                return
            except BackendError as exc:
                if not isinstance(exc.__cause__, rexc.ResponseError):
                    raise
                # An error reply means the script wrote nothing (RPUSH, its
                # first write, failed or never ran), so the transaction
                # below writes the message once.
                refused: BackendError | None = exc
        else:
            refused = None
        await self._call("multi", transaction, limit)
        if refused is not None:
            # The transaction worked where the script did not: scripting is
            # refused here (an ACL, a proxy without EVAL); stop trying it.
            logger.debug("%r: Lua script refused (%s); using MULTI/EXEC instead", self, refused)
            self._push = None

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

    @contextlib.asynccontextmanager
    async def _blocking_slot(self, deadline: float) -> AsyncIterator[bool]:
        """A connection for a blocking command; yields False when none came before ``deadline``.

        Then the caller makes one non-blocking attempt on a reserved
        connection instead, so a timeout always means the data really was
        not there.
        """
        if not self._blocking.locked():
            await self._blocking.acquire()  # a free slot: no wait, so no deadline timer
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._blocking.acquire()
            except TimeoutError:
                yield False
                return
        try:
            yield True
        finally:
            self._blocking.release()

    async def _blocking_move(
        self, src: str, dst: str, ends: tuple[str, str], deadline: float, expire: bool
    ) -> bytes | None:
        """One attempt of ``BLMOVE src dst`` until ``deadline`` (LMOVE at or past it).

        ``expire``: EXPIRE ``dst`` in the same pipeline, so a list the move
        creates has its TTL as it appears.
        """
        loop = asyncio.get_running_loop()
        async with self._blocking_slot(deadline) as blocking:
            wait = round(deadline - loop.time(), 3) if blocking else 0.0
            # 0 would mean "forever" to Redis: at the deadline, one LMOVE.
            args = ("BLMOVE", src, dst, *ends, wait) if wait > 0 else ("LMOVE", src, dst, *ends)
            limit = max(wait, 0.0) + min(self.socket_timeout, REPLY_SLACK)

            if not expire:
                reply = await self._run(
                    args[0].lower(), functools.partial(self._command, *args), limit
                )
            else:

                async def move() -> Any:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        pipe.execute_command(*args)
                        pipe.expire(dst, self.ttl)
                        replies: list[Any] = await pipe.execute()
                    return replies[0]

                reply = await self._run(args[0].lower(), move, limit)
        return None if reply is None else bytes(reply)

    async def _take(
        self, stream: str, deadline: float, failures: list[BackendUnavailable]
    ) -> tuple[bytes, str] | None:
        """Move the head of ``stream`` into a fresh in-flight key; ``(element, key)``.

        None when nothing came before ``deadline`` (also when the server
        kept failing until then: noted in ``failures``).  A lost reply is
        recovered from the in-flight key; a failure or cancellation after a
        move may have run puts the element back (see the module docstring).
        """
        taken = f"{self.prefix}/taken/{self.peer_id}.{self._token}/{next(self._counter)}"
        maybe_moved = False

        async def attempt() -> bytes | None:
            nonlocal maybe_moved
            if maybe_moved:
                # The last attempt's reply was lost: did its move run?
                found = await self._run(
                    "lindex", functools.partial(self._command, "LINDEX", taken, 0)
                )
                if found is not None:
                    return bytes(found)
            maybe_moved = True
            element = await self._blocking_move(stream, taken, ("LEFT", "RIGHT"), deadline, True)
            maybe_moved = element is not None
            return element

        try:
            element = await self.retrying("blmove", attempt)
        except BaseException as exc:
            if maybe_moved:
                self._put_back(taken, stream)
            if isinstance(exc, BackendUnavailable):
                failures.append(exc)
                return None  # not there in time
            raise
        return None if element is None else (element, taken)

    def _put_back(self, taken: str, stream: str) -> None:
        """Return what ``taken`` holds to the head of ``stream``, in the background.

        The next receive of ``stream`` waits for it, so order is kept.
        """

        async def attempt() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lmove(taken, stream, "RIGHT", "LEFT")
                pipe.expire(stream, self.ttl)
                pipe.unlink(taken)
                await pipe.execute()

        async def put_back() -> None:
            with self._within(self._write_deadline()):
                await self._call("lmove", attempt)

        task = asyncio.get_running_loop().create_task(put_back(), context=contextvars.Context())
        self._putting_back[stream] = task
        self._background.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if self._putting_back.get(stream) is task:
                del self._putting_back[stream]
            if not task.cancelled() and task.exception() is not None:
                logger.warning(
                    "%r: could not return a message to %s (it stays in %s until its TTL): %s",
                    self,
                    stream,
                    taken,
                    task.exception(),
                )

        task.add_done_callback(done)

    async def _settled(self, stream: str, deadline: float) -> None:
        """Wait for a put-back into ``stream`` still running (a cancelled receive's)."""
        task = self._putting_back.get(stream)
        if task is not None:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(task)

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
        try:
            base, count, nbytes = msgpack.unpackb(element[len(REF_MAGIC) :])
            keys = [f"{base}/{i}" for i in range(int(count))]
        except Exception as exc:
            raise ProtocolError(f"malformed chunk reference in {name!r}: {exc}") from exc
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
        pattern = _glob_escape(prefix) + "*"
        while True:
            cursor, found = await self._call(
                "scan", functools.partial(self._redis.scan, cursor, match=pattern, count=1000)
            )
            for raw in found:
                yield raw.decode() if isinstance(raw, bytes) else str(raw)
            if cursor == 0:
                return


def _glob_escape(text: str) -> str:
    for special in "\\*?[]":
        text = text.replace(special, "\\" + special)
    return text
