"""What the S3 and DynamoDB channels share: the client and the error boundary.

Clients come from :mod:`aioboto3` with credentials from the usual AWS chain
(environment, shared config files, container or instance role); the config
file never holds secrets.  Backend options read here:

``region`` (or FMI's ``s3_region``)
    AWS region; default from the environment (``AWS_DEFAULT_REGION``).
``endpoint_url``
    another endpoint than AWS's (a moto server, MinIO, LocalStack, a VPC endpoint).
``profile``
    a named profile of the shared AWS config files.
``max_pool_connections``, ``connect_timeout``, ``read_timeout``, ``max_attempts``
    the HTTP pool size, per-request deadlines (seconds) and how often
    botocore itself resends a failed request ("standard" retry mode; the
    channels default to 0, since they retry themselves, see below).
``retry_mode``
    ``fmi`` (the default: the channel retries, as below), or botocore's
    ``standard`` or ``adaptive`` mode (botocore resends twice first, then
    the channel).  Chosen by measurement (``benchmarks/transport_aws.py``,
    10 % of DynamoDB requests throttled): botocore's waits after a throttle
    are drawn up to 1 s, 2 s, 4 s..., and its adaptive mode also slows
    every later request; the channel's 20 ms doubling to 1 s lost next to
    nothing (see docs/storage-channels.md for the table).
``verify``
    HTTPS certificate check of ``endpoint_url``: a CA bundle's path, or
    false to skip it (test endpoints only); default the system's CAs.

:func:`map_aws_errors` is the one place where botocore and transport errors
become fmi errors; :func:`aws_request` is the one place a request is sent:
under its operation's deadline, retried by the channel's
:class:`~fmi_async.channels.backoff.RetryPolicy` while it fails transiently
(:func:`transient_aws_error`: connection errors, truncated bodies, HTTP 5xx,
throttling).  botocore's own retries would resend a request past the
caller's deadline and without the channel knowing; the channel's retries stop
at the deadline, and every request it retries is idempotent (reads, deletes,
whole-object rewrites, conditional message writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import ClientError as HTTPTransportError
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from ..errors import BackendError, BackendUnavailable, BrokenChannelError, ConfigError, FMIError
from .backoff import RetryPolicy
from .base import ChannelStats

if TYPE_CHECKING:
    from .options import AWSOptions
    from .storage import StorageChannel

__all__ = [
    "aws_client",
    "busy_aws_error",
    "aws_open_request",
    "aws_request",
    "error_code",
    "map_aws_errors",
    "throttled_aws_error",
    "transient_aws_error",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "ThrottlingException",
    }
)


# Service errors that say "try again": the request did not take effect, or
# taking effect twice is harmless for the (idempotent) requests we retry.
_TRANSIENT_CODES = _THROTTLE_CODES | {
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "TransactionConflictException",
}


def error_code(exc: ClientError) -> str:
    """The service's error code (``NoSuchKey``, ``ResourceNotFoundException``...)."""
    error: dict[str, Any] = exc.response.get("Error", {})
    return str(error.get("Code", ""))


# One aioboto3 session per event loop and profile.  A session caches the
# service models and resolved credentials, which makes each further client
# take milliseconds instead of a tenth of a second; it is not shared across
# loops because refreshable credentials hold asyncio locks bound to one loop.
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str | None, Any]] = (
    weakref.WeakKeyDictionary()
)


def _session(aioboto3: Any, profile: str | None) -> Any:
    per_loop = _SESSIONS.setdefault(asyncio.get_running_loop(), {})
    if profile not in per_loop:
        per_loop[profile] = aioboto3.Session(profile_name=profile)
    return per_loop[profile]


def aws_client(service: str, options: AWSOptions, backend: str, *, retries: int = 4) -> Any:
    """An async context manager yielding an aiobotocore client for ``service``.

    ``retries`` is how often botocore itself resends a failed request unless
    the options set ``max_attempts`` (botocore's name for the same count);
    the storage channels pass 0 and retry with :func:`aws_request`.  (aiohttp
    may still resend an idempotent request, a PUT say, once when a reused
    keep-alive connection turns out closed.)  Call it with the event loop
    running (from ``open``).
    Raises :class:`~fmi_async.errors.ConfigError` for a missing aioboto3.
    """
    try:
        import aioboto3
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            f"the {backend} channel needs aioboto3: pip install 'fmi-async[aws]'"
        ) from exc
    region = options.region if options.region is not None else options.s3_region
    mode = "standard" if options.retry_mode == "fmi" else options.retry_mode
    if options.max_attempts is not None:
        attempts = options.max_attempts
    elif options.retry_mode == "fmi":
        attempts = retries
    else:
        attempts = _BOTO_ATTEMPTS  # botocore's mode retries, as it would by default
    # A plain botocore Config: aiobotocore converts it to its own subclass.
    config = BotoConfig(
        max_pool_connections=options.max_pool_connections,
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        # botocore counts the first attempt in total_max_attempts only.
        retries={"mode": mode, "total_max_attempts": 1 + attempts},
    )
    extra: dict[str, Any] = {}
    if options.verify is not None:
        extra["verify"] = options.verify
    return _session(aioboto3, options.profile).client(
        service, region_name=region, endpoint_url=options.endpoint_url, config=config, **extra
    )


_BOTO_ATTEMPTS = 2
"""Resends botocore makes in its "standard" or "adaptive" retry mode (its default)."""


def transient_aws_error(exc: BaseException) -> bool:
    """Whether a request that failed with ``exc`` (as :func:`map_aws_errors` raised it)
    may succeed when sent again: a broken connection or truncated reply, an
    HTTP 5xx, throttling.  Never a request cut off by its deadline."""
    if isinstance(exc, BackendUnavailable):
        return False  # the deadline came
    if isinstance(exc, BrokenChannelError):
        return True
    cause = exc.__cause__
    if isinstance(exc, BackendError) and isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500 or error_code(cause) in _TRANSIENT_CODES
    return False


def busy_aws_error(exc: BaseException) -> bool:
    """Whether the service answered ``exc`` and asks to be tried again: throttling or
    an HTTP 5xx (not a connection that failed: that is :func:`transient_aws_error`'s)."""
    return isinstance(exc, BackendError) and transient_aws_error(exc)


def throttled_aws_error(exc: BaseException) -> bool:
    """Whether ``exc`` (as :func:`map_aws_errors` raised it) is the service throttling."""
    cause = exc.__cause__
    return (
        isinstance(exc, BackendError)
        and isinstance(cause, ClientError)
        and error_code(cause) in _THROTTLE_CODES
    )


async def aws_open_request(
    channel: StorageChannel, operation: str, where: str, call: Callable[[], Awaitable[T]]
) -> T:
    """One request while ``channel`` opens (describe or create its table, say).

    Counted and mapped like every request.  Throttling and 5xx answers
    (:func:`busy_aws_error`) are retried with the channel's retry backoff
    until the open's deadline (the config's timeout): a busy service is no
    reason to fail a job.  Anything else is raised at once: an endpoint that
    cannot be reached or a missing table is a configuration to fix, reported
    when the job starts.
    """
    loop = asyncio.get_running_loop()
    policy = RetryPolicy(channel.retry.backoff, busy_aws_error, channel.retry.on_retry)

    async def attempt() -> T:
        with map_aws_errors(channel.stats, operation, where):
            return await call()

    return await policy.run(
        attempt, loop.time() + channel.config.timeout, f"{operation} on {where}"
    )


async def aws_request(
    channel: StorageChannel, operation: str, where: str, call: Callable[[], Awaitable[T]]
) -> T:
    """``await call()`` (one AWS request, and reading its body) the channel's way.

    Counted in ``channel.stats``, errors mapped by :func:`map_aws_errors`,
    each attempt bounded by what is left of the operation's deadline, and
    retried by ``channel.retry`` while it fails transiently.  ``call`` may
    catch the service errors it expects (a missing object while polling)
    and return instead.  Raises what :func:`map_aws_errors` raises,
    and :class:`~fmi_async.errors.BackendUnavailable` when the deadline came
    before an answer, or passed while the request kept failing.
    """

    async def attempt() -> T:
        limit = channel.attempt_limit()
        try:
            async with asyncio.timeout(limit):
                with map_aws_errors(channel.stats, operation, where):
                    return await call()
        except TimeoutError as exc:
            if isinstance(exc, FMIError):
                raise
            error = BackendUnavailable(
                f"{operation} on {where}: no answer within {limit:.3g}s, when the "
                "operation's deadline came"
            )
            channel.note_failure(error)
            raise error from None

    return await channel.retrying(operation, attempt)


@contextlib.contextmanager
def map_aws_errors(stats: ChannelStats, operation: str, where: str) -> Iterator[None]:
    """Count one ``operation`` request and turn its failures into fmi errors.

    ``where`` names the bucket or table for the message.  Callers that expect
    a particular service error (a missing object while polling) catch
    ``ClientError`` inside this block, before it is converted.
    """
    stats.requests[operation] += 1
    try:
        yield
    except FMIError:
        raise
    except ClientError as exc:
        code = error_code(exc)
        detail = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _CREDENTIAL_CODES:
            hint = (
                "check the AWS credentials (environment, profile or role) and that their "
                f"policy allows {operation} on {where}"
            )
        elif code in _THROTTLE_CODES:
            hint = (
                "the service throttled requests beyond botocore's retries; raise the "
                "table's capacity or max_attempts, or use fewer concurrent peers"
            )
        elif code in ("NoSuchBucket", "ResourceNotFoundException"):
            hint = f"{where} does not exist; create it or enable create_bucket/create_table"
        else:
            hint = "see the AWS error code above"
        raise BackendError(f"{operation} on {where} failed: {code}: {detail}; {hint}") from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise ConfigError(
            f"{operation} on {where}: no usable AWS credentials ({exc}); set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or run with a role"
        ) from exc
    except NoRegionError as exc:
        raise ConfigError(
            f"{operation} on {where}: no AWS region; set the backend's region option "
            "or AWS_DEFAULT_REGION"
        ) from exc
    except (BotoConnectionError, HTTPClientError, HTTPTransportError, OSError) as exc:
        raise BrokenChannelError(
            f"{operation} on {where}: cannot reach the service ({exc}); check endpoint_url, "
            "the network and the region"
        ) from exc
    except (IncompleteReadError, ResponseStreamingError) as exc:
        raise BrokenChannelError(
            f"{operation} on {where}: the reply was cut off ({exc}); the connection broke"
        ) from exc
    except BotoCoreError as exc:
        raise BackendError(f"{operation} on {where} failed: {exc}") from exc
