"""Where storage-backed job leases live: one record per job, written conditionally.

Each store keeps one :class:`~fmi_async.jobs.lease.LeaseRecord` (its JSON bytes)
under ``fmi/<comm>/<run>/lease``, beside (never inside) the epoch-qualified
prefixes ``fmi/<comm>/<run>.<epoch>/`` the channels write under, and offers
the :class:`~fmi_async.jobs.lease.RecordStore` operations: read with a version
token, create only if absent, replace or delete only at a known version.

* **Redis**: GET; ``SET NX PX`` to create; a Lua script compares the stored
  value with the one read and sets (or deletes) in one step.  The key
  expires by itself shortly after the record does.
* **S3**: GetObject with its ETag; PutObject with ``If-None-Match: *`` to
  create, with ``If-Match: <etag>`` to replace; DeleteObject with
  ``If-Match``.  A bucket without a lifecycle rule keeps the object of a
  job that crashed (tiny, and replaced by the next job of the same name).
* **DynamoDB**: one item (``sk`` 0) of the channel's table; PutItem with
  ``attribute_not_exists(pk)`` to create, with ``#v = :v`` (a random version
  attribute) to replace; DeleteItem with the same condition.  ``expires_at``
  lets the table's Time to Live remove what a crashed job left.

Each store uses its own small client, built from the backend's options as the
channel builds its own (the lease is acquired before any channel opens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..channels.base import ChannelStats
from ..channels.storage import storage_prefix
from ..errors import BackendError, BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from ..channels.dynamodb import DynamoDBOptions
    from ..channels.options import AWSOptions
    from ..channels.redis import RedisOptions
    from ..channels.s3 import S3Options

__all__ = ["RedisStore", "S3Store", "DynamoDBStore", "record_name"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXPIRY_SLACK: Final = 2.0
"""Seconds a stored record outlives its logical expiry before the backend removes it."""


def record_name(comm_name: str, run_id: str) -> str:
    """Where the lease of ``(comm_name, run_id)`` is stored."""
    return f"{storage_prefix(comm_name, run_id)}/lease"


# ---------------------------------------------------------------- Redis

# KEYS[1] the record; ARGV[1] the value read, ARGV[2] the new value ("" deletes),
# ARGV[3] its expiry in milliseconds.  An absent key never equals ARGV[1].
_CAS_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


def _expiry_ms(expires: float) -> int:
    return max(1, int((expires - time.time() + EXPIRY_SLACK) * 1000))


class RedisStore:
    """The lease record as one Redis string (``backends.Redis`` options)."""

    backend = "redis"

    def __init__(self, options: RedisOptions, key: str) -> None:
        self.url = options.url
        self.host = options.host
        self.port = options.port
        self.db = options.db
        self.socket_timeout = options.socket_timeout
        self.username = options.username
        self.password = options.password
        self.key = key
        from ..channels.redis import tls_arguments

        self.tls = tls_arguments(options)  # rediss:// and the certificate options
        self._client: Any = None
        self._cas: Any = None

    @property
    def where(self) -> str:
        if self.url is not None:
            return f"redis {self.url.rsplit('@', 1)[-1]}"  # never print a password
        return f"redis {self.host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        return f"<RedisStore {self.where} key={self.key!r}>"

    async def open(self) -> None:
        import redis.asyncio as aioredis

        if self._client is not None:
            return
        common: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
            "max_connections": 4,
        }
        if self.url is not None:
            self._client = aioredis.Redis.from_url(self.url, **common, **self.tls)
        else:
            if self.tls:
                common["ssl"] = True
            self._client = aioredis.Redis(
                host=self.host,
                port=self.port,
                db=self.db,
                username=self.username,
                password=self.password,
                **common,
                **self.tls,
            )
        self._cas = self._client.register_script(_CAS_SCRIPT)

    async def _run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        from ..channels.redis import redis_errors

        with redis_errors(self.where, operation):
            return await call()

    async def read(self) -> tuple[bytes | None, Any]:
        data = await self._run("get", lambda: self._client.get(self.key))
        return (None, None) if data is None else (bytes(data), bytes(data))

    async def create(self, data: bytes, expires: float) -> Any | None:
        done = await self._run(
            "set", lambda: self._client.set(self.key, data, nx=True, px=_expiry_ms(expires))
        )
        return data if done else None

    async def replace(self, data: bytes, token: Any, expires: float) -> Any | None:
        done = await self._run(
            "evalsha",
            lambda: self._cas(keys=[self.key], args=[token, data, _expiry_ms(expires)]),
        )
        return data if done else None

    async def delete(self, token: Any) -> bool:
        done = await self._run("evalsha", lambda: self._cas(keys=[self.key], args=[token, b"", 0]))
        return bool(done)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


# ---------------------------------------------------------------- AWS


class _AWSStore:
    """What the S3 and DynamoDB stores share: the client and the error boundary."""

    backend = ""
    service = ""
    label = ""  # the backend's name in config keys

    def __init__(self, options: AWSOptions, key: str) -> None:
        self.options = options
        self.key = key
        self.stats = ChannelStats()
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    where = ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.where} key={self.key!r}>"

    async def open(self) -> None:
        from ..channels.aws import aws_client

        if self._client is None:
            self._client = await self._stack.enter_async_context(
                # The lease retries itself, within its deadline (botocore's own
                # retries wait up to seconds after a throttle).
                aws_client(self.service, self.options, self.label, retries=0)
            )

    @contextlib.contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        from ..channels.aws import map_aws_errors, transient_aws_error

        try:
            with map_aws_errors(self.stats, operation, self.where):
                yield
        except BackendError as exc:
            if not transient_aws_error(exc):
                raise
            # Throttled or a 5xx: asked again within the lease's deadline, like a reset.
            raise BackendUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


@contextlib.contextmanager
def _refused(codes: frozenset[str], refused: list[bool]) -> Iterator[None]:
    """Swallow a refused condition (a ``ClientError`` with one of ``codes``), noting it."""
    from botocore.exceptions import ClientError

    from ..channels.aws import error_code

    try:
        yield
    except ClientError as exc:
        if error_code(exc) not in codes:
            raise
        refused.append(True)


_S3_CHANGED: Final = frozenset(
    {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
)
_S3_NO_BUCKET: Final = frozenset({"NoSuchBucket"})


class S3Store(_AWSStore):
    """The lease record as one S3 object (``backends.S3`` options), versions by ETag."""

    backend = "s3"
    service = "s3"
    label = "S3"

    def __init__(self, options: S3Options, key: str) -> None:
        super().__init__(options, key)
        bucket = options.bucket_name
        if not bucket:
            raise ConfigError(
                "backends.S3.bucket_name is required: the bucket every peer of the job shares"
            )
        self.bucket = bucket
        self.create_bucket = options.create_bucket
        self.lifecycle_days = options.lifecycle_days
        self.where = f"s3://{bucket}"

    async def _with_bucket(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; when the bucket is missing and ``create_bucket`` is set, create it once."""
        from botocore.exceptions import ClientError

        from ..channels.aws import error_code

        try:
            return await call()
        except ClientError as exc:
            if error_code(exc) not in _S3_NO_BUCKET or not self.create_bucket:
                raise
        await self._ensure_bucket()
        return await call()

    async def _ensure_bucket(self) -> None:
        from ..channels.s3 import ensure_bucket

        await ensure_bucket(self._client, self.bucket, self.lifecycle_days, self._call)

    async def read(self) -> tuple[bytes | None, Any]:
        missing: list[bool] = []

        async def get() -> tuple[bytes | None, Any]:
            with _refused(frozenset({"NoSuchKey", "404"}), missing):
                reply = await self._client.get_object(Bucket=self.bucket, Key=self.key)
                async with reply["Body"] as body:
                    data = await body.read()
                return bytes(data), reply["ETag"]
            return None, None

        with self._call("GetObject"):
            return await self._with_bucket(get)

    async def create(self, data: bytes, expires: float) -> Any | None:
        return await self._put(data, {"IfNoneMatch": "*"})

    async def replace(self, data: bytes, token: Any, expires: float) -> Any | None:
        return await self._put(data, {"IfMatch": token})

    async def _put(self, data: bytes, condition: dict[str, Any]) -> Any | None:
        refused: list[bool] = []

        async def put() -> Any | None:
            with _refused(_S3_CHANGED, refused):
                reply = await self._client.put_object(
                    Bucket=self.bucket,
                    Key=self.key,
                    Body=data,
                    ContentType="application/json",
                    **condition,
                )
                return reply["ETag"]
            return None

        with self._call("PutObject"):
            return await self._with_bucket(put)

    async def delete(self, token: Any) -> bool:
        refused: list[bool] = []
        with self._call("DeleteObject"):
            with _refused(_S3_CHANGED, refused):
                await self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        return not refused


_DDB_CHANGED: Final = frozenset({"ConditionalCheckFailedException"})


class DynamoDBStore(_AWSStore):
    """The lease record as one DynamoDB item (``backends.DynamoDB`` options)."""

    backend = "dynamodb"
    service = "dynamodb"
    label = "DynamoDB"

    def __init__(self, options: DynamoDBOptions, key: str, timeout: float = 60.0) -> None:
        super().__init__(options, key)
        table = options.table_name
        if not table:
            raise ConfigError(
                "backends.DynamoDB.table_name is required: the table every peer shares"
            )
        self.table = table
        self.create_table = options.create_table
        self.timeout = timeout
        self.where = f"dynamodb table {table!r}"
        self._item_key = {"pk": {"S": key}, "sk": {"N": "0"}}

    async def _with_table(self, call: Callable[[], Awaitable[T]]) -> T:
        from botocore.exceptions import ClientError

        from ..channels.aws import error_code

        try:
            return await call()
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException" or not self.create_table:
                raise
        await self._ensure_table()
        return await call()

    async def _ensure_table(self) -> None:
        """Create the channel's table (the channel checks its schema and TTL when it opens)."""
        from botocore.exceptions import ClientError

        from ..channels.aws import error_code
        from ..channels.dynamodb import TABLE_SCHEMA

        with self._call("CreateTable"):
            try:
                await self._client.create_table(
                    TableName=self.table, BillingMode="PAY_PER_REQUEST", **TABLE_SCHEMA
                )
                logger.info("created DynamoDB table %r for a job lease", self.table)
            except ClientError as exc:
                if error_code(exc) != "ResourceInUseException":
                    raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while loop.time() < deadline:
            with self._call("DescribeTable"):
                reply = await self._client.describe_table(TableName=self.table)
            if reply["Table"]["TableStatus"] == "ACTIVE":
                return
            await asyncio.sleep(0.1)
        raise BackendError(f"DynamoDB table {self.table!r} did not become ACTIVE in time")

    async def read(self) -> tuple[bytes | None, Any]:
        async def get() -> tuple[bytes | None, Any]:
            reply = await self._client.get_item(
                TableName=self.table, Key=self._item_key, ConsistentRead=True
            )
            item = reply.get("Item")
            if item is None:
                return None, None
            return bytes(item["rec"]["B"]), item["v"]["S"]

        with self._call("GetItem"):
            return await self._with_table(get)

    async def create(self, data: bytes, expires: float) -> Any | None:
        return await self._put(data, expires, "attribute_not_exists(pk)", None)

    async def replace(self, data: bytes, token: Any, expires: float) -> Any | None:
        return await self._put(data, expires, "#v = :v", token)

    async def _put(
        self, data: bytes, expires: float, condition: str, token: str | None
    ) -> Any | None:
        version = secrets.token_hex(8)
        item = {
            **self._item_key,
            "rec": {"B": data},
            "v": {"S": version},
            "expires_at": {"N": str(int(expires + EXPIRY_SLACK) + 1)},
        }
        kwargs: dict[str, Any] = {"ConditionExpression": condition}
        if token is not None:
            kwargs["ExpressionAttributeNames"] = {"#v": "v"}
            kwargs["ExpressionAttributeValues"] = {":v": {"S": token}}
        refused: list[bool] = []

        async def put() -> Any | None:
            with _refused(_DDB_CHANGED, refused):
                await self._client.put_item(TableName=self.table, Item=item, **kwargs)
                return version
            return None

        with self._call("PutItem"):
            return await self._with_table(put)

    async def delete(self, token: Any) -> bool:
        refused: list[bool] = []
        with self._call("DeleteItem"):
            with _refused(_DDB_CHANGED, refused):
                await self._client.delete_item(
                    TableName=self.table,
                    Key=self._item_key,
                    ConditionExpression="#v = :v",
                    ExpressionAttributeNames={"#v": "v"},
                    ExpressionAttributeValues={":v": {"S": token}},
                )
        return not refused
