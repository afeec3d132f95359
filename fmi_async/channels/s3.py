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
``fmi/`` prefix expires them (:func:`lifecycle_rule`).  A bucket this channel
creates (``create_bucket``) gets one, expiring after ``lifecycle_days`` (1,
the shortest S3 allows: rules count whole days, so the ``ttl`` option does
not apply to S3).  An existing bucket is never changed: when it has no
rule covering ``fmi/``, ``open`` logs a warning once; add the rule (see
docs/storage-channels.md) or remove leftovers with ``fmi clean``.

Retries and ghosts.  Every request is retried within its operation's
deadline when it fails on the way (:func:`~fmi_async.channels.aws.aws_request`).
A message is written with ``If-None-Match: *`` and the writer's token in its
metadata: a retried PUT whose first attempt had landed is refused (412),
and the channel takes that as success once it sees its own token on the
object.  Its reader keeps the message ``delete_delay`` seconds before
deleting it, so the retry cannot come after the delete and store a copy
nobody reads.

IAM: the role needs ``s3:GetObject``, ``s3:PutObject``, ``s3:DeleteObject``
and ``s3:ListBucket`` on the bucket; without ``ListBucket`` a missing object
reads as "access denied" instead of "not there yet", and polling fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from ..errors import BackendError, ConfigError, ProtocolError
from ..wire.buffers import Buffer
from .aws import (
    aws_client,
    aws_open_request,
    aws_request,
    busy_aws_error,
    error_code,
    map_aws_errors,
    transient_aws_error,
)
from .backoff import RetryPolicy
from .base import ChannelContext
from .options import AWSOptions, option
from .s3_bucket import check_lifecycle, ensure_bucket, lifecycle_rule
from .storage import StorageChannel
from .storage_chunks import bounded_gather, chunk_bounds, join_range

# ensure_bucket and lifecycle_rule live in s3_bucket; imported from here too.
__all__ = ["S3Channel", "S3Options", "ensure_bucket", "lifecycle_rule"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's minimum size of every part but the last
MAX_PARTS = 10_000
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per call
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_CHANGED = frozenset({"PreconditionFailed", "412"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
WRITER_KEY = "fmi-writer"  # user metadata: the token of the channel that wrote a message


@dataclass(frozen=True)
class S3Options(AWSOptions):
    """``backends.S3``: the bucket and how objects are written to it."""

    bucket_name: str = option("", doc="the bucket every peer of the job shares (required)")
    create_bucket: bool = option(False, doc="create the bucket when it is missing")
    lifecycle_days: int = option(1, ge=1, doc="days until the bucket's rule expires objects")
    part_size: int = option(8 * MiB, ge=MIN_PART, le=5 * 1024**3, doc="multipart part bytes")
    multipart_threshold: int = option(
        16 * MiB, ge=MIN_PART, doc="bytes from which to upload in parts"
    )


class S3Channel(StorageChannel):
    """A mediated channel over one S3 bucket; see the module docstring for options."""

    name = "s3"
    list_page_size = 1000  # ListObjectsV2's maximum page

    Options = S3Options
    options: S3Options

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        opts = self.options
        if not opts.bucket_name:
            raise ConfigError(
                "backends.S3.bucket_name is required: the bucket every peer of the job shares"
            )
        self.bucket = opts.bucket_name
        self.create_bucket = opts.create_bucket
        self.lifecycle_days = opts.lifecycle_days
        self.part_size = opts.part_size
        self.multipart_threshold = opts.multipart_threshold
        self.max_concurrency = opts.max_concurrency
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._token = secrets.token_hex(8)

    def location(self) -> str:
        return f"s3://{self.bucket}"

    def _transient(self, exc: BaseException) -> bool:
        return transient_aws_error(exc)

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        """One request while opening: counted and mapped, not retried (fail fast)."""
        with map_aws_errors(self.stats, operation, f"bucket {self.bucket!r}"):
            yield

    async def _request(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        return await aws_request(self, operation, f"bucket {self.bucket!r}", call)

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            return
        try:
            async with self._open_deadline():
                self._client = await self._stack.enter_async_context(
                    aws_client("s3", self.options, "S3", retries=0)
                )
                if not self.create_bucket or not await self._ensure_bucket():
                    await self._check_bucket()
                    await self._check_lifecycle()
        except BaseException:
            await self._stack.aclose()
            raise
        await super().open()
        logger.debug("%r opened", self)

    def _opening(self) -> dict[str, Any]:
        """``retry`` and ``deadline`` for the bucket checks while opening: throttling
        (``SlowDown``) and 5xx answers are asked again until the open's deadline, the
        rest fails fast."""
        loop = asyncio.get_running_loop()
        retry = RetryPolicy(self.retry.backoff, busy_aws_error, self.retry.on_retry)
        return {"retry": retry, "deadline": loop.time() + self.config.timeout}

    async def _check_bucket(self) -> None:
        async def head() -> None:
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

        await aws_open_request(self, "HeadBucket", f"bucket {self.bucket!r}", head)

    async def _check_lifecycle(self) -> None:
        """Warn (once per bucket) when no enabled rule expires what crashed runs leave."""
        await check_lifecycle(self._client, self.bucket, self._call, **self._opening())

    async def _ensure_bucket(self) -> bool:
        """Create the bucket with its lifecycle rule; False when it existed (left as it is)."""
        return await ensure_bucket(
            self._client, self.bucket, self.lifecycle_days, self._call, **self._opening()
        )

    async def _shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None

    # ---------------------------------------------------------------- storage primitives

    async def _store(
        self, name: str, frames: Sequence[Buffer], nbytes: int, *, exclusive: bool = False
    ) -> None:
        metadata = {WRITER_KEY: self._token}
        condition: dict[str, Any] = {"IfNoneMatch": "*"} if exclusive else {}
        if nbytes <= self.multipart_threshold:
            body = join_range(frames, 0, nbytes)

            async def put() -> bool:
                try:
                    await self._client.put_object(
                        Bucket=self.bucket, Key=name, Body=body, Metadata=metadata, **condition
                    )
                except ClientError as exc:
                    if exclusive and error_code(exc) in _CHANGED:
                        return False
                    raise
                return True

            if not await self._request("PutObject", put):
                await self._check_duplicate(name, "PutObject")
            return
        # S3 allows 10,000 parts: grow the part size for very large objects.
        part_size = max(self.part_size, -(-nbytes // MAX_PARTS))

        async def create() -> str:
            created = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=name, Metadata=metadata
            )
            return str(created["UploadId"])

        upload_id = await self._request("CreateMultipartUpload", create)

        async def upload(number: int, start: int, end: int) -> dict[str, Any]:
            body = join_range(frames, start, end)  # built inside the bounded task

            async def part() -> Any:
                return await self._client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
                )

            reply = await self._request("UploadPart", part)
            return {"PartNumber": number, "ETag": reply["ETag"]}

        bounds = chunk_bounds(nbytes, part_size)
        try:
            parts = await bounded_gather(
                [functools.partial(upload, n, lo, hi) for n, (lo, hi) in enumerate(bounds, 1)],
                self.max_concurrency,
            )

            async def complete() -> bool:
                try:
                    await self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        **condition,
                    )
                except ClientError as exc:
                    # A retry of a completion that did land finds the upload
                    # gone (NoSuchUpload) or, for a message, the object (412).
                    if error_code(exc) in _CHANGED | {"NoSuchUpload"}:
                        return False
                    raise
                return True

            if not await self._request("CompleteMultipartUpload", complete):
                await self._check_duplicate(name, "CompleteMultipartUpload")
        except BaseException:
            with contextlib.suppress(Exception):
                with self._call("AbortMultipartUpload"):
                    await self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=name, UploadId=upload_id
                    )
            raise

    async def _check_duplicate(self, name: str, operation: str) -> None:
        """A write was refused because ``name`` exists: fine if this channel wrote it.

        Raises :class:`~fmi_async.errors.BackendError` when another writer's
        object is there.
        """

        async def head() -> dict[str, str] | None:
            try:
                reply = await self._client.head_object(Bucket=self.bucket, Key=name)
            except ClientError as exc:
                if error_code(exc) in _MISSING:
                    return None
                raise
            metadata: dict[str, str] = reply.get("Metadata") or {}
            return metadata

        metadata = await self._request("HeadObject", head)
        if metadata is None or metadata.get(WRITER_KEY) == self._token:
            # Ours: an earlier attempt of this write landed (its reply was
            # lost), and maybe its reader has consumed it since.
            logger.debug("%r: %s of %s was a retry of a write that landed", self, operation, name)
            return
        raise BackendError(
            f"{operation} on bucket {self.bucket!r}: {name!r} already holds an object written "
            "by another writer; is a second job running with the same communicator name and "
            "run id, or does another program write under fmi/?"
        )

    async def _get_range(self, name: str, start: int, end: int, etag: str | None) -> Any:
        """One ranged GET; None when the object is missing or changed under us."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "Range": f"bytes={start}-{end - 1}",
        }
        if etag is not None:
            kwargs["IfMatch"] = etag

        async def get() -> Any:
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

        return await self._request("GetObject", get)

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
            async def call() -> Any:
                return await self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )

            reply = await self._request("DeleteObjects", call)
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise BackendError(
                    f"DeleteObjects on bucket {self.bucket!r} failed for {len(errors)} of "
                    f"{len(batch)} objects, e.g. {first.get('Key')!r}: {first.get('Code')} "
                    f"{first.get('Message')}; check s3:DeleteObject permission"
                )

        await bounded_gather([functools.partial(delete, b) for b in batches], self.max_concurrency)

    async def list_names(self, prefix: str) -> list[str]:
        """Every object under ``prefix``, with ListObjectsV2 (page by page)."""
        self._check_open()
        names: list[str] = []
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": prefix,
            "MaxKeys": self.list_page_size,
        }
        while True:

            async def page() -> Any:
                return await self._client.list_objects_v2(**kwargs)

            reply = await self._request("ListObjectsV2", page)
            names.extend(item["Key"] for item in reply.get("Contents", ()))
            if not reply.get("IsTruncated"):
                break
            kwargs["ContinuationToken"] = reply["NextContinuationToken"]
        return names

    async def sweep(
        self, prefix: str, select: Callable[[str], bool], *, dry_run: bool = False
    ) -> list[str]:
        """As :meth:`StorageChannel.sweep`, and abort the incomplete multipart
        uploads under ``prefix`` that ``select`` accepts (listed as
        ``"<name> (incomplete upload)"``)."""
        names = await super().sweep(prefix, select, dry_run=dry_run)
        uploads: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        with self._within(self._write_deadline()):
            while True:
                reply = await self._request(
                    "ListMultipartUploads",
                    functools.partial(self._client.list_multipart_uploads, **kwargs),
                )
                uploads.extend(
                    (u["Key"], u["UploadId"]) for u in reply.get("Uploads", ()) if select(u["Key"])
                )
                if not reply.get("IsTruncated"):
                    break
                kwargs["KeyMarker"] = reply["NextKeyMarker"]
                kwargs["UploadIdMarker"] = reply["NextUploadIdMarker"]
            for key, upload_id in uploads if not dry_run else ():
                await self._request(
                    "AbortMultipartUpload",
                    functools.partial(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                    ),
                )
        return names + [f"{key} (incomplete upload)" for key, _ in uploads]
