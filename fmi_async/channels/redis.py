"""Redis channel: blocking list operations, so no reader ever polls (redis.asyncio).

Point-to-point: each ``(source, destination, key)`` stream is a Redis list.
``send`` appends (RPUSH) and the receiver waits on the server with BLPOP,
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
512 MB) and the list element is only a reference to them.  Chunks, list
element and TTLs are written in one MULTI/EXEC round trip, so a reader
never sees a reference before its data; a receiver reads and deletes the
chunks in one more round trip.  A message of at most ``SCRIPT_MAX`` bytes
is one EVALSHA of a two-line Lua script (RPUSH, EXPIRE), which spares
redis-py's pipeline machinery; a larger inline message is a plain RPUSH +
EXPIRE pipeline (also used where the server refuses scripts).

Every key gets the ``ttl`` option (seconds, default 3600) as expiry, so a
peer that dies before ``close`` leaves nothing that lasts.

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
``socket_timeout`` (seconds a non-blocking command may take, default 30).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from typing import Any, Final, TypeVar

import msgpack
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.commands.core import AsyncScript
from redis.utils import HIREDIS_AVAILABLE

from ..config import Config
from ..errors import (
    BackendError,
    BrokenChannelError,
    ConfigError,
    FMIError,
    ProtocolError,
)
from ..wire import MAGIC, Buffer, Key, Payload
from .base import Mailbox, describe_key
from .storage import MediatedChannel, chunk_bounds, join_range, option_number

__all__ = ["RedisChannel"]

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
# Appends a message and sets its list's TTL in one command (KEYS[1] the list,
# ARGV the element and the TTL in seconds).
PUSH_SCRIPT: Final = """
redis.call('RPUSH', KEYS[1], ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""


@contextlib.contextmanager
def _map_errors(channel: RedisChannel, operation: str) -> Iterator[None]:
    """Count one ``operation`` round trip and turn redis/socket errors into fmi errors."""
    channel.stats.requests[operation] += 1
    where = channel.location()
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


class RedisChannel(MediatedChannel):
    """A mediated channel over one Redis database; see the module docstring."""

    name = "redis"
    max_name_bytes = 4096

    def __init__(
        self,
        peer_id: int,
        num_peers: int,
        comm_name: str,
        run_id: str,
        config: Config,
        mailbox: Mailbox,
    ) -> None:
        super().__init__(peer_id, num_peers, comm_name, run_id, config, mailbox)
        opts = self.options
        self.max_connections = int(
            option_number(opts, "max_connections", "Redis", 32, minimum=RESERVED_CONNECTIONS + 1)
        )
        self.chunk_size = int(
            option_number(opts, "chunk_size", "Redis", 64 * MiB, minimum=1, maximum=512 * MiB)
        )
        self.inline_max = int(
            option_number(opts, "inline_max", "Redis", MiB, minimum=0, maximum=self.chunk_size)
        )
        self.socket_timeout = option_number(opts, "socket_timeout", "Redis", 30.0, minimum=0.01)
        url = opts.get("url")
        if url is not None and not isinstance(url, str):
            raise ConfigError("backends.Redis.url must be a redis:// or rediss:// URL string")
        self.url = url
        host = opts.get("host", "localhost")
        if not isinstance(host, str):
            raise ConfigError(f"backends.Redis.host must be a string, got {host!r}")
        self.host = host
        self.port = int(option_number(opts, "port", "Redis", 6379, minimum=1, maximum=65535))
        self.db = int(option_number(opts, "db", "Redis", 0, minimum=0))
        self._blocking = asyncio.Semaphore(self.max_connections - RESERVED_CONNECTIONS)
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._token = secrets.token_hex(4)  # distinguishes two channels of one peer id
        self._counter = itertools.count()
        self._data_keys: dict[str, list[str]] = {}  # list name -> chunk keys written for it
        self._push: AsyncScript | None = None

    def location(self) -> str:
        if self.url is not None:
            return f"redis {self.url.rsplit('@', 1)[-1]}"  # never print a password
        return f"redis {self.host}:{self.port}/{self.db}"

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            return
        common: dict[str, Any] = {
            "max_connections": self.max_connections,
            "timeout": None,  # waiting for a connection is bounded by our own deadlines
            "socket_timeout": None,  # blocking commands outlive any fixed socket timeout
            "socket_connect_timeout": self.socket_timeout,
        }
        if self.url is not None:
            pool = aioredis.BlockingConnectionPool.from_url(self.url, **common)
        else:
            pool = aioredis.BlockingConnectionPool(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.options.get("username"),
                password=self.options.get("password"),
                **common,
            )
        self._pool = pool
        self._client = aioredis.Redis(connection_pool=pool)
        self._push = self._client.register_script(PUSH_SCRIPT)  # no round trip yet
        try:
            async with self._open_deadline():
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

    async def _run(self, operation: str, call: Callable[[], Awaitable[T]], seconds: float = 0) -> T:
        """One round trip, bounded by ``seconds`` (default ``socket_timeout``), errors mapped.

        A command cancelled by the deadline leaves no half-read connection:
        redis-py disconnects a connection whose read was interrupted.
        """
        limit = seconds or self.socket_timeout
        try:
            async with asyncio.timeout(limit):
                with _map_errors(self, operation):
                    return await call()
        except TimeoutError as exc:
            if isinstance(exc, FMIError):
                raise
            raise BrokenChannelError(
                f"{operation} on {self.location()}: no answer within {limit:.3g}s; the "
                "server is overloaded or the network path is broken"
            ) from None

    # ---------------------------------------------------------------- writes

    async def _write(
        self, list_name: str, frames: Sequence[Buffer], nbytes: int, *, replace: bool
    ) -> None:
        """Append one element (inline, or a reference to chunk keys) to ``list_name``."""
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
        refused: BackendError | None = None
        if not chunks and not replace and len(element) <= SCRIPT_MAX and self._push is not None:
            # A small message: RPUSH and EXPIRE in one EVALSHA.  A redis-py
            # pipeline costs an extra task per call, about a fifth of a small
            # message's time on loopback (benchmarks/mediated.py); above
            # SCRIPT_MAX, Lua's copy of the argument costs more than that.
            push = self._push
            try:
                await self._run("rpush", lambda: push(keys=[list_name], args=[element, self.ttl]))
                return
            except BackendError as exc:
                if not isinstance(exc.__cause__, rexc.ResponseError):
                    raise
                # An error reply means the script wrote nothing (its first call
                # is the RPUSH), so the pipeline below writes the message once.
                refused = exc

        # Chunks and their reference, or a replaced object, go in MULTI/EXEC so
        # no reader sees half of the write.  An inline message needs no
        # transaction: a reader popping between RPUSH and EXPIRE only makes the
        # EXPIRE a no-op.  Either way one round trip.
        atomic = bool(chunks) or replace

        async def write() -> None:
            async with self._redis.pipeline(transaction=atomic) as pipe:
                for chunk_key, data in chunks:
                    pipe.set(chunk_key, data, ex=self.ttl)
                if replace:
                    pipe.delete(list_name)
                pipe.rpush(list_name, element)
                pipe.expire(list_name, self.ttl)
                await pipe.execute()

        await self._run("multi" if atomic else "rpush", write, limit)
        if refused is not None:
            # The pipeline worked where the script did not: scripting is
            # refused here (an ACL, a proxy without EVAL); stop trying it.
            logger.debug("%r: Lua script refused (%s); pipelining instead", self, refused)
            self._push = None

    async def _store(self, name: str, frames: Sequence[Buffer], nbytes: int) -> None:
        await self._write(name, frames, nbytes, replace=True)

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        self._check_peer(dst, "destination")
        start = time.perf_counter()
        name = self.message_name(self.peer_id, dst, key)
        frames, nbytes = self._encode(key, payload)
        self._sent.add(name)
        # The list's order is the delivery order: concurrent sends of one
        # stream must reach the server in call order, not pool order.
        deadline = asyncio.get_running_loop().time() + self.config.timeout
        try:
            async with self._exclusive(self._send_locks, (dst, key), deadline):
                await self._write(name, frames, nbytes, replace=False)
        except TimeoutError as exc:
            if isinstance(exc, FMIError):
                raise
            raise self._timeout(
                f"earlier sends to peer {dst} ({describe_key(key)})",
                self.config.timeout,
                "the Redis server is slow or unreachable",
            ) from None
        self._count_send(payload)
        self.stats.seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- reads

    async def _pop(self, command: str, name: str, deadline: float) -> bytes | None:
        """Wait on the server for the head of ``name`` until ``deadline``; None if none came.

        ``BLPOP`` consumes; ``BLMOVE`` rotates (reads without consuming).
        When all blocking slots are busy until the deadline, one last
        non-blocking attempt runs on a reserved connection, so a timeout
        always means the data really was not there.
        """
        loop = asyncio.get_running_loop()
        blocking = command == "BLPOP"
        if not self._blocking.locked():
            await self._blocking.acquire()  # a free slot: no wait, so no deadline timer
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._blocking.acquire()
            except TimeoutError:
                return await self._pop_now(blocking, name)
        try:
            wait = round(deadline - loop.time(), 3)
            if wait <= 0:  # 0 would mean "forever" to Redis
                return await self._pop_now(blocking, name)
            args = (name, wait) if blocking else (name, name, "LEFT", "RIGHT", wait)
            reply = await self._run(
                command.lower(),
                functools.partial(self._command, command, *args),
                wait + self.socket_timeout,
            )
        finally:
            self._blocking.release()
        if reply is None:
            return None
        return bytes(reply[1] if blocking else reply)

    async def _pop_now(self, consume: bool, name: str) -> bytes | None:
        if consume:
            reply = await self._run("lpop", functools.partial(self._command, "LPOP", name))
        else:
            reply = await self._run("lindex", functools.partial(self._command, "LINDEX", name, 0))
        return None if reply is None else bytes(reply)

    async def _resolve(self, element: bytes, name: str, consume: bool) -> list[Buffer] | None:
        """The stored bytes behind a list element; None if its chunks vanished meanwhile."""
        if element.startswith(MAGIC):
            return [element]
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

        async def fetch() -> list[Any]:
            async with self._redis.pipeline(transaction=consume) as pipe:
                pipe.mget(keys)
                if consume:
                    pipe.unlink(*keys)
                replies: list[Any] = await pipe.execute()
                return list(replies[0])

        values = await self._run("mget", fetch, self.socket_timeout + nbytes / (50 * MiB))
        if any(v is None for v in values):
            if consume:
                raise BackendError(
                    f"the chunks of a message in {name!r} on {self.location()} are gone; "
                    "they expired (raise backends.Redis.ttl) or were evicted (maxmemory policy)"
                )
            return None
        return list(values)

    async def _load(self, name: str, consume: bool) -> list[Buffer] | None:
        element = await self._pop_now(consume, name)
        return None if element is None else await self._resolve(element, name, consume)

    async def recv(self, src: int, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        self._check_peer(src, "source")
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        name = self.message_name(src, self.peer_id, key)
        element: bytes | None = None
        with contextlib.suppress(TimeoutError):
            async with self._exclusive(self._recv_locks, (src, key), deadline):
                element = await self._pop("BLPOP", name, deadline)
        if element is None:
            raise self._timeout(
                f"a message from peer {src} ({describe_key(key)})",
                wait,
                f"check that peer {src} sent it to peer {self.peer_id} with the same "
                "communicator name, run id and Redis database",
            )
        parts = await self._resolve(element, name, consume=True)
        assert parts is not None  # consume=True raises instead of returning None
        payload = self._decode(parts, name, key)
        self.stats.messages_received += 1
        self.stats.bytes_received += payload.nbytes
        self.stats.seconds += time.perf_counter() - start
        return payload

    async def get(self, key: Key, timeout: float | None) -> Payload:
        self._check_open()
        start = time.perf_counter()
        deadline, wait = self._deadline(timeout)
        name = self.object_name(key)
        loop = asyncio.get_running_loop()
        parts: list[Buffer] | None = None
        while parts is None:
            element = await self._pop("BLMOVE", name, deadline)
            if element is not None:
                parts = await self._resolve(element, name, consume=False)
            if parts is None and loop.time() >= deadline:
                raise self._get_timeout(key, wait)
        payload = self._decode(parts, name, key)
        self.stats.messages_received += 1
        self.stats.bytes_received += payload.nbytes
        self.stats.seconds += time.perf_counter() - start
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

        await self._run("unlink", unlink)

    async def list_run(self) -> list[str]:
        """Every key of this run and communicator (SCAN over the run prefix)."""
        self._check_open()
        return [k async for k in self._scan()]

    async def _scan(self) -> AsyncIterator[str]:
        cursor: int = 0
        pattern = _glob_escape(self.prefix) + "/*"
        while True:
            cursor, found = await self._run(
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
