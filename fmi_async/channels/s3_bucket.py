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
from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError

from .aws import error_code

__all__ = ["check_lifecycle", "ensure_bucket", "expires", "lifecycle_rule"]

logger = logging.getLogger(__name__)


LIFECYCLE_CHECKED: set[str] = set()  # buckets whose rules were looked at, once per process


async def ensure_bucket(
    client: Any,
    bucket: str,
    lifecycle_days: int,
    call: Callable[[str], contextlib.AbstractContextManager[None]],
) -> bool:
    """Create ``bucket`` with the lifecycle rule of :func:`lifecycle_rule`; False when
    it existed (its lifecycle is then left as it is).  ``call(operation)`` maps
    each request's errors (the channel's and the job lease's own helpers).

    Asks first: in us-east-1, CreateBucket of a bucket one owns answers 200,
    and its lifecycle rules must not be replaced.
    """
    with call("HeadBucket"):
        try:
            await client.head_bucket(Bucket=bucket)
            return False
        except ClientError as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    region = client.meta.region_name
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with call("CreateBucket"):
        try:
            await client.create_bucket(**kwargs)
            logger.info("created S3 bucket %r", bucket)
        except ClientError as exc:
            if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            return False
    with call("PutBucketLifecycleConfiguration"):
        await client.put_bucket_lifecycle_configuration(
            Bucket=bucket,
            LifecycleConfiguration={"Rules": [lifecycle_rule(lifecycle_days)]},
        )
    return True


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
    client: Any, bucket: str, call: Callable[[str], contextlib.AbstractContextManager[None]]
) -> None:
    """Warn (once per bucket and process) when no enabled rule expires what crashed runs leave.

    ``call(operation)`` maps the request's errors, as for :func:`ensure_bucket`.
    """
    if bucket in LIFECYCLE_CHECKED:
        return
    rules: list[dict[str, Any]] = []
    with call("GetBucketLifecycleConfiguration"):
        try:
            reply = await client.get_bucket_lifecycle_configuration(Bucket=bucket)
            rules = reply.get("Rules", [])
        except ClientError as exc:
            if error_code(exc) != "NoSuchLifecycleConfiguration":
                logger.debug("cannot read the lifecycle of bucket %r: %s", bucket, exc)
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
