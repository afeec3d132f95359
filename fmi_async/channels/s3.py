"""S3 channel: put once, get by many, through a bucket (aioboto3).

S3 has no way to wait for an object, so a reader polls: a GET that finds
no object is retried after a wait that grows by the channel's
:class:`~fmi_async.channels.backoff.Backoff` (FMI's ``timeout``, the polling
interval in milliseconds, is its first wait; FMI's ``max_timeout`` bounds the
wait when the caller gives none).  A GET that finds the object returns its
first range at once, so a small message costs one request.

Large objects use S3's parallelism: written with a multipart upload of
``part_size`` parts, several at a time, and read with concurrent ranged GETs
pinned to one ETag (so a reader never mixes two versions).

Options (``backends.S3``): ``bucket_name`` (required), ``s3_region``,
``timeout``/``max_timeout`` (FMI's, milliseconds), ``endpoint_url``,
``create_bucket`` (create it if missing: tests and development),
``lifecycle_days`` (expiry set on a bucket this channel creates, default 1),
``multipart_threshold`` (bytes, default 16 MiB), ``part_size`` (default 8 MiB,
at least 5 MiB as S3 requires), ``max_concurrency`` (parallel requests per
object, default 8), and the client options of :mod:`fmi_async.channels.aws`.

Expiry.  S3 has no per-object TTL.  A peer that dies before ``close`` leaves
its objects under ``fmi/<comm>/<run>/``; a bucket lifecycle rule on the
``fmi/`` prefix expires them (:func:`lifecycle_rule`; a bucket created with
``create_bucket`` gets one).  Lifecycle rules count whole days, so the
``ttl`` option does not apply to S3.

IAM: the role needs ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject``
and ``s3:ListBucket`` on the bucket; without ``ListBucket`` a missing object
reads as "access denied" instead of "not there yet", and polling fails.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from botocore.exceptions import ClientError

from ..config import Config
from ..errors import BackendError, ConfigError, ProtocolError
from ..wire import Buffer
from .aws import aws_client, error_code, map_aws_errors
from .base import Mailbox
from .storage import (
    MediatedChannel,
    bounded_gather,
    chunk_bounds,
    join_range,
    option_number,
)

__all__ = ["S3Channel", "lifecycle_rule"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
MAX_PARTS = 10_000
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_CHANGED = frozenset({"PreconditionFailed", "412"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


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


class S3Channel(MediatedChannel):
    """A mediated channel over one S3 bucket; see the module docstring for options."""

    name = "s3"
    list_page_size = 1000  # ListObjectsV2's maximum page

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
        bucket = self.options.get("bucket_name")
        if not isinstance(bucket, str) or not bucket:
            raise ConfigError(
                "backends.S3.bucket_name is required: the bucket every peer of the job shares"
            )
        self.bucket = bucket
        opts = self.options
        self.create_bucket = bool(opts.get("create_bucket", False))
        self.lifecycle_days = int(option_number(opts, "lifecycle_days", "S3", 1, minimum=1))
        self.part_size = int(
            option_number(opts, "part_size", "S3", 8 * MiB, minimum=MIN_PART, maximum=5 * 1024**3)
        )
        self.multipart_threshold = int(
            option_number(opts, "multipart_threshold", "S3", 16 * MiB, minimum=MIN_PART)
        )
        self.max_concurrency = int(option_number(opts, "max_concurrency", "S3", 8, minimum=1))
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def location(self) -> str:
        return f"s3://{self.bucket}"

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        with map_aws_errors(self.stats, operation, f"bucket {self.bucket!r}"):
            yield

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            return
        try:
            async with self._open_deadline():
                self._client = await self._stack.enter_async_context(
                    aws_client("s3", self.options, "S3")
                )
                if self.create_bucket:
                    await self._ensure_bucket()
                else:
                    await self._check_bucket()
        except BaseException:
            await self._stack.aclose()
            raise
        await super().open()
        logger.debug("%r opened", self)

    async def _check_bucket(self) -> None:
        with self._call("HeadBucket"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                code = error_code(exc)
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise ConfigError(
                        f"S3 bucket {self.bucket!r} does not exist; create it (with the "
                        "lifecycle rule of fmi_async.channels.s3.lifecycle_rule) or set "
                        "backends.S3.create_bucket to true"
                    ) from exc
                if code in ("403", "AccessDenied", "Forbidden"):
                    raise ConfigError(
                        f"S3 bucket {self.bucket!r} is not accessible with these credentials; "
                        "grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject"
                    ) from exc
                raise

    async def _ensure_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._call("CreateBucket"):
            try:
                await self._client.create_bucket(**kwargs)
                logger.info("created S3 bucket %r", self.bucket)
            except ClientError as exc:
                if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        with self._call("PutBucketLifecycleConfiguration"):
            await self._client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket,
                LifecycleConfiguration={"Rules": [lifecycle_rule(self.lifecycle_days)]},
            )

    async def _shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None

    # ---------------------------------------------------------------- storage primitives

    async def _store(self, name: str, frames: Sequence[Buffer], nbytes: int) -> None:
        if nbytes <= self.multipart_threshold:
            with self._call("PutObject"):
                await self._client.put_object(
                    Bucket=self.bucket, Key=name, Body=join_range(frames, 0, nbytes)
                )
            return
        # S3 allows 10,000 parts: grow the part size for very large objects.
        part_size = max(self.part_size, -(-nbytes // MAX_PARTS))
        with self._call("CreateMultipartUpload"):
            created = await self._client.create_multipart_upload(Bucket=self.bucket, Key=name)
        upload_id = created["UploadId"]

        async def upload(number: int, start: int, end: int) -> dict[str, Any]:
            body = join_range(frames, start, end)  # built inside the bounded task
            with self._call("UploadPart"):
                reply = await self._client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
                )
            return {"PartNumber": number, "ETag": reply["ETag"]}

        bounds = chunk_bounds(nbytes, part_size)
        try:
            parts = await bounded_gather(
                [functools.partial(upload, n, lo, hi) for n, (lo, hi) in enumerate(bounds, 1)],
                self.max_concurrency,
            )
            with self._call("CompleteMultipartUpload"):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            with contextlib.suppress(Exception):
                with self._call("AbortMultipartUpload"):
                    await self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=name, UploadId=upload_id
                    )
            raise

    async def _get_range(self, name: str, start: int, end: int, etag: str | None) -> Any:
        """One ranged GET; None when the object is missing or changed under us."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "Range": f"bytes={start}-{end - 1}",
        }
        if etag is not None:
            kwargs["IfMatch"] = etag
        with self._call("GetObject"):
            try:
                reply = await self._client.get_object(**kwargs)
            except ClientError as exc:
                if error_code(exc) in _MISSING | _CHANGED:
                    return None
                if error_code(exc) == "InvalidRange" and start == 0:
                    # No byte 0: the object is empty.  We never store an empty
                    # object, so this is one not written completely yet (an
                    # S3-compatible server that lists a key before its body is
                    # in); poll again, as for a missing one.
                    return None
                raise
            async with reply["Body"] as body:
                reply["Data"] = await body.read()
        return reply

    async def _load(self, name: str, consume: bool) -> list[Buffer] | None:
        first = await self._get_range(name, 0, self.part_size, None)
        if first is None:
            return None
        data: bytes = first["Data"]
        total = len(data)
        match = _CONTENT_RANGE.fullmatch(first.get("ContentRange") or "")
        if match is not None:
            total = int(match.group(3))
        if total == len(data):
            return [data]
        if len(data) != self.part_size:
            raise ProtocolError(
                f"S3 returned {len(data)} bytes for the first range of {name!r}, "
                f"expected {self.part_size} of {total}"
            )
        etag = first["ETag"]
        rest = await bounded_gather(
            [
                functools.partial(self._get_range, name, lo + len(data), hi + len(data), etag)
                for lo, hi in chunk_bounds(total - len(data), self.part_size)
            ],
            self.max_concurrency,
        )
        if any(r is None for r in rest):
            logger.debug("%r: %s changed while it was read; reading again", self, name)
            return None
        return [data, *(r["Data"] for r in rest)]

    async def _remove(self, names: Collection[str]) -> None:
        ordered = sorted(set(names))
        batches = [ordered[i : i + DELETE_BATCH] for i in range(0, len(ordered), DELETE_BATCH)]

        async def delete(batch: list[str]) -> None:
            with self._call("DeleteObjects"):
                reply = await self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise BackendError(
                    f"DeleteObjects on bucket {self.bucket!r} failed for {len(errors)} of "
                    f"{len(batch)} objects, e.g. {first.get('Key')!r}: {first.get('Code')} "
                    f"{first.get('Message')}; check s3:DeleteObject permission"
                )

        await bounded_gather([functools.partial(delete, b) for b in batches], self.max_concurrency)

    async def list_run(self) -> list[str]:
        """Every object of this run and communicator, with ListObjectsV2 under the run prefix."""
        self._check_open()
        names: list[str] = []
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + "/",
            "MaxKeys": self.list_page_size,
        }
        while True:
            with self._call("ListObjectsV2"):
                page = await self._client.list_objects_v2(**kwargs)
            names.extend(item["Key"] for item in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        return names
