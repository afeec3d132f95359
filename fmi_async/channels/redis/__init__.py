"""The Redis channel (redis.asyncio): everything Redis-specific, by job.

* :mod:`~fmi_async.channels.redis.channel` -- :class:`RedisChannel` and its
  options :class:`RedisOptions` (``backends.Redis``): sends, receives,
  objects and cleanup; its docstring tells the whole design;
* :mod:`~fmi_async.channels.redis.once` -- pushes and pops made harmless
  to repeat (message numbers and marks, in-flight lists, put-backs);
* :mod:`~fmi_async.channels.redis.connection` -- the connection pool, one
  round trip under a limit, retries, blocking moves, TLS arguments (also used
  by the job lease's Redis store);
* :mod:`~fmi_async.channels.redis.layout` -- list elements, chunk
  references and the push script;
* :mod:`~fmi_async.channels.redis.errors` -- redis and socket errors as fmi
  errors (also used by the job lease's Redis store).
"""

from __future__ import annotations

import logging

from .channel import RedisChannel, RedisOptions
from .connection import tls_arguments
from .errors import redis_errors, transient_redis_error

__all__ = [
    "RedisChannel",
    "RedisOptions",
    "redis_errors",
    "tls_arguments",
    "transient_redis_error",
]

logger = logging.getLogger(__name__)
