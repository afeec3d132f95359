"""Redis errors as fmi errors: one mapping for the Redis channel and the job lease's Redis store.

:func:`redis_errors` turns what redis-py and the socket raise into
:class:`~fmi_async.errors.BackendError` and
:class:`~fmi_async.errors.BrokenChannelError`; :func:`transient_redis_error`
says which of those may succeed when the command is sent again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Final

import redis.exceptions as rexc

from ...errors import BackendError, BackendUnavailable, BrokenChannelError, FMIError

__all__ = ["redis_errors", "transient_redis_error"]

logger = logging.getLogger(__name__)

# Error replies after which the same command may succeed: a server loading
# its data after a restart, a busy script, a failover in progress.
_TRANSIENT_REPLIES: Final = ("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")


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
