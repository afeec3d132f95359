"""The S3 bucket the channel writes to: creating it, and the lifecycle rule that cleans it.

S3 has no per-object TTL: a bucket lifecycle rule expires what the peers of
crashed runs left under ``fmi/`` (:func:`lifecycle_rule`).  The channel
creates a missing bucket with that rule when ``create_bucket`` is set
(:func:`ensure_bucket`, also used by the job lease's S3 store), and warns
once per bucket when no enabled rule covers the prefix
(:func:`check_lifecycle`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from .aws import error_code
from .backoff import RetryPolicy

T = TypeVar("T")

__all__ = ["check_lifecycle", "ensure_bucket", "expires", "lifecycle_rule"]

logger = logging.getLogger(__name__)


LIFECYCLE_CHECKED: set[str] = set()  # buckets whose rules were looked at, once per process


async def ensure_bucket(
    client: Any,
    bucket: str,
    lifecycle_days: int,
    call: Callable[[str], contextlib.AbstractContextManager[None]],
    *,
    retry: RetryPolicy | None = None,
    deadline: float = 0.0,
) -> bool:
    """Create ``bucket`` with the lifecycle rule of :func:`lifecycle_rule`; False when
    it existed (its lifecycle is then left as it is).  ``call(operation)`` maps
    each request's errors (the channel's and the job lease's own helpers);
    with ``retry``, each request is asked again as it says, until
    ``deadline`` (loop time).

    Asks first: in us-east-1, CreateBucket of a bucket one owns answers 200,
    and its lifecycle rules must not be replaced.
    """

    async def head() -> bool:
        try:
            await client.head_bucket(Bucket=bucket)
            return True
        except ClientError as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            return False

    if await _request(call, retry, deadline, "HeadBucket", head):
        return False
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}

    async def create() -> bool:
        try:
            await client.create_bucket(**kwargs)
            logger.info("created S3 bucket %r", bucket)
            return True
        except ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            return False

    if not await _request(call, retry, deadline, "CreateBucket", create):
        return False

    async def rule() -> None:
        await client.put_bucket_lifecycle_configuration(
            Bucket=bucket,
            LifecycleConfiguration={"Rules": [lifecycle_rule(lifecycle_days)]},
        )

    await _request(call, retry, deadline, "PutBucketLifecycleConfiguration", rule)
    return True


async def _request(
    call: Callable[[str], contextlib.AbstractContextManager[None]],
    retry: RetryPolicy | None,
    deadline: float,
    operation: str,
    request: Callable[[], Awaitable[T]],
) -> T:
    """``request()`` under ``call(operation)``, asked again as ``retry`` says (if given)."""

    async def attempt() -> T:
        with call(operation):
            return await request()

    if retry is None:
        return await attempt()
    return await retry.run(attempt, deadline, operation)


def lifecycle_rule(days: int = 1, prefix: str = "fmi/") -> dict[str, Any]:
    """A bucket lifecycle rule that expires what crashed runs left under ``prefix``.

    Pass it as ``{"Rules": [lifecycle_rule()]}`` to
    ``put_bucket_lifecycle_configuration``, or the equivalent in the console
    or infrastructure code.  It also aborts multipart uploads a crashed peer
    left incomplete.
    """
    return {
        "ID": "fmi-async-expire",
        "Filter": {"Prefix": prefix},
        "Status": "Enabled",
        "Expiration": {"Days": days},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
    }


async def check_lifecycle(
    client: Any,
    bucket: str,
    call: Callable[[str], contextlib.AbstractContextManager[None]],
    *,
    retry: RetryPolicy | None = None,
    deadline: float = 0.0,
) -> None:
    """Warn (once per bucket and process) when no enabled rule expires what crashed runs leave.

    ``call(operation)``, ``retry`` and ``deadline`` as for :func:`ensure_bucket`.
    """
    if bucket in LIFECYCLE_CHECKED:
        return

    async def read() -> list[dict[str, Any]] | None:
        try:
            reply = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
            found: list[dict[str, Any]] = reply.get("Rules", [])
            return found
        except ClientError as exc:
            if error_code(exc) != "NoSuchLifecycleConfiguration":
                logger.debug("cannot read the lifecycle of bucket %r: %s", bucket, exc)
                return None
            return []

    rules = await _request(call, retry, deadline, "GetBucketLifecycleConfiguration", read)
    if rules is None:
        return
    LIFECYCLE_CHECKED.add(bucket)
    if any(expires(rule, "fmi/") for rule in rules):
        return
    logger.warning(
        "S3 bucket %r has no enabled lifecycle rule expiring the fmi/ prefix: objects of "
        "peers that die before close() stay until removed (fmi clean); add the rule of "
        "fmi_async.channels.s3.lifecycle_rule()",
        bucket,
    )


def expires(rule: dict[str, Any], prefix: str) -> bool:
    """Whether lifecycle ``rule`` is enabled, expires objects, and covers ``prefix``."""
    if rule.get("Status") != "Enabled" or not rule.get("Expiration", {}).get("Days"):
        return False
    rule_filter = rule.get("Filter", {})
    covered = rule_filter.get("Prefix", rule.get("Prefix", ""))
    if "And" in rule_filter or "Tag" in rule_filter:
        return False  # narrowed by tags: our objects carry none
    return isinstance(covered, str) and prefix.startswith(covered)
