"""The Redis channel's connection: its pool, one round trip, blocking moves.

:class:`RedisConnection` holds the connection pool of a
:class:`~fmi_async.channels.redis.channel.RedisChannel` and runs every
command: once under a limit with errors mapped (:meth:`~RedisConnection._run`),
or retried while it fails transiently until the operation's deadline
(:meth:`~RedisConnection._call`, for commands harmless to repeat).  A
blocking command holds its connection while it waits, so at most
``max_connections - RESERVED_CONNECTIONS`` of them run at once; the
reserved connections stay free for the writes that will wake them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.utils import HIREDIS_AVAILABLE

from ...errors import BackendUnavailable, BrokenChannelError, ConfigError, FMIError
from ..base import ChannelContext
from ..storage import StorageChannel
from .errors import redis_errors, transient_redis_error
from .layout import PUSH_SCRIPT

if TYPE_CHECKING:
    from .channel import RedisOptions

__all__ = ["RESERVED_CONNECTIONS", "RedisConnection", "tls_arguments"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESERVED_CONNECTIONS: Final = 2

# A blocking command asks the server to wait until the deadline; its reply
# (nil) may take this long on top to come back before the client gives up.
# A busy event loop reads replies late (one process running many peers that
# fold large arrays): a reply cut off that way counts as "not there in time"
# and its element goes back to the stream, so the caller's next wait finds it.
REPLY_SLACK: Final = 0.5


@contextlib.contextmanager
def _map_errors(channel: RedisConnection, operation: str) -> Iterator[None]:
    """Count one ``operation`` round trip and turn redis/socket errors into fmi errors."""
    channel.stats.requests[operation] += 1
    with redis_errors(channel.location(), operation):
        yield


def tls_arguments(options: RedisOptions) -> dict[str, Any]:
    """redis-py's TLS arguments for ``options``; empty when the channel talks plain TCP.

    TLS is on with a ``rediss://`` URL or ``tls: true``; the server's
    certificate is then always verified (against ``tls_ca``, else the
    system's CAs), and its name checked unless ``tls_check_hostname`` is
    false.  Raises :class:`~fmi_async.errors.ConfigError` for certificate
    options without TLS, a key without a certificate, or a file that is not
    there.
    """
    url = options.url
    on = url.startswith("rediss://") if url is not None else options.tls
    files = {"tls_ca": options.tls_ca, "tls_cert": options.tls_cert, "tls_key": options.tls_key}
    given = [name for name, path in files.items() if path is not None]
    if not on:
        if given or (url is not None and options.tls):
            what = ", ".join(given) or "tls"
            raise ConfigError(
                f"backends.Redis: {what} given, but the channel talks plain TCP; use a "
                "rediss:// URL (or tls: true with host/port)"
            )
        return {}
    if options.tls_key is not None and options.tls_cert is None:
        raise ConfigError("backends.Redis: tls_key needs tls_cert (the client certificate)")
    for name in given:
        path = files[name]
        assert path is not None
        if not os.path.isfile(path):
            raise ConfigError(f"backends.Redis.{name}: no such file: {path}")
    return {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": options.tls_ca,
        "ssl_certfile": options.tls_cert,
        "ssl_keyfile": options.tls_key,
        "ssl_check_hostname": options.tls_check_hostname,
    }


class RedisConnection(StorageChannel):
    """A storage channel's connection pool to one Redis database and its round trips."""

    options: RedisOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        opts = self.options
        self.max_connections = opts.max_connections
        self.socket_timeout = opts.socket_timeout
        self.url = opts.url
        self.host = opts.host
        self.port = opts.port
        self.db = opts.db
        self._tls = tls_arguments(opts)  # checked here: a wrong option fails the constructor
        self._blocking = asyncio.Semaphore(self.max_connections - RESERVED_CONNECTIONS)
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._token = secrets.token_hex(4)  # distinguishes two channels of one peer id
        self._counter = itertools.count()  # chunk bases, in-flight keys, message numbers
        self._push: AsyncScript | None = None

    def location(self) -> str:
        if self.url is not None:
            return f"redis {self.url.rsplit('@', 1)[-1]}"  # never print a password
        return f"redis {self.host}:{self.port}/{self.db}"

    def _transient(self, exc: BaseException) -> bool:
        return transient_redis_error(exc)

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
        tls = self._tls
        if self.url is not None:
            pool = aioredis.BlockingConnectionPool.from_url(self.url, **common, **tls)
        else:
            if tls:
                common["connection_class"] = aioredis.SSLConnection
            pool = aioredis.BlockingConnectionPool(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.options.username,
                password=self.options.password,
                **common,
                **tls,
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
