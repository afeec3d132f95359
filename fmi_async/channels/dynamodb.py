"""DynamoDB channel: messages and shared objects as items of one table (aioboto3).

An item holds at most 400 KB, so a stored object is cut into chunks of
``chunk_size`` bytes, one item each, all under the object's name as
partition key and numbered by the sort key.  Chunk 0 is written last and
carries the chunk count: a reader that finds chunk 0 finds the whole object.
Every item of one write carries the same version token, so a reader that
races an overwrite sees a mismatch and reads again instead of mixing
versions.  Reads are strongly consistent (``ConsistentRead``), because
eventually consistent reads could miss an item that was just written.

Expected table schema (create it like this, or set ``create_table: true``)::

    partition key  pk          String   the stored name, fmi/<comm>/<run>/...
    sort key       sk          Number   chunk index, 0 holds the count
    attributes     data        Binary   the chunk's bytes
                   n           Number   number of chunks (item 0 only)
                   v           String   version token of the write
                   expires_at  Number   epoch seconds; enable TTL on this attribute
    billing        PAY_PER_REQUEST (on-demand) suits bursty jobs

The schema is checked when the channel opens; a mismatch is a
:class:`~fmi_async.errors.ConfigError` that spells out the expected schema.
Time to Live on ``expires_at`` is what removes the items of a peer that died
before ``close``; a table without it is accepted with a warning.  DynamoDB
deletes expired items lazily (AWS says within days), so a reader treats an
item past its ``expires_at`` as gone.

Retries and ghosts.  Every request is retried within its operation's
deadline when it fails on the way (:func:`~fmi_async.channels.aws.aws_request`).
Item 0 of a message is written with ``attribute_not_exists(pk)``: a retried
write whose first attempt had landed fails the condition, and the channel
takes that as success when the item there carries its own version token.
Its reader keeps the items ``delete_delay`` seconds before deleting them, so
the retry cannot come after the delete and store a copy nobody reads.

Options (``backends.DynamoDB``): ``table_name`` (required), ``region``,
``endpoint_url``, ``create_table``, ``ttl`` (seconds; default four times the
config's ``timeout``, at least 60), ``delete_delay``,
``chunk_size`` (bytes per item, default 384 KiB, at most 400,000),
``max_concurrency`` (parallel batch requests per object, default 8),
``timeout``/``max_timeout`` (milliseconds, as FMI's S3 keys), backoff keys, and
the client options of :mod:`fmi_async.channels.aws`.

``stats.requests`` also counts estimated ``write_units`` and ``read_units``
(1 KB per write unit, 4 KB per strongly consistent read unit) for the cost
model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from botocore.exceptions import ClientError

from ..errors import BackendError, ConfigError
from ..wire.buffers import Buffer
from .aws import aws_client, aws_open_request, aws_request, error_code, transient_aws_error
from .backoff import poll_until
from .base import ChannelContext
from .options import AWSOptions, option
from .storage import StorageChannel, bounded_gather, chunk_bounds, join_range

__all__ = ["DynamoDBChannel", "DynamoDBOptions", "TABLE_SCHEMA", "TTL_ATTRIBUTE"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TTL_ATTRIBUTE: Final = "expires_at"
WRITE_BATCH: Final = 25  # BatchWriteItem takes at most 25 requests
GET_BATCH: Final = 32  # BatchGetItem allows 100 keys and 16 MB: 32 chunks of 384 KiB fit
ITEM_LIMIT: Final = 400 * 1024
TABLE_SCHEMA: Final[dict[str, Any]] = {
    "KeySchema": [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ],
    "AttributeDefinitions": [
        {"AttributeName": "pk", "AttributeType": "S"},
        {"AttributeName": "sk", "AttributeType": "N"},
    ],
}
_SCHEMA_TEXT: Final = (
    "partition key 'pk' (String), sort key 'sk' (Number), Time to Live on 'expires_at'"
)


@dataclass(frozen=True)
class DynamoDBOptions(AWSOptions):
    """``backends.DynamoDB``: the table and how items are cut."""

    table_name: str = option("", doc="the table every peer shares (required)")
    create_table: bool = option(False, doc="create the table when it is missing")
    chunk_size: int = option(384 * 1024, ge=1, le=400_000, doc="data bytes per item")


class DynamoDBChannel(StorageChannel):
    """A mediated channel over one DynamoDB table; see the module docstring."""

    name = "dynamodb"
    max_name_bytes = 1024  # leaves room for the chunk in a 400 KB item

    Options = DynamoDBOptions
    options: DynamoDBOptions

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        opts = self.options
        if not opts.table_name:
            raise ConfigError(
                "backends.DynamoDB.table_name is required: the table every peer shares "
                f"({_SCHEMA_TEXT})"
            )
        self.table = opts.table_name
        self.create_table = opts.create_table
        self.chunk_size = opts.chunk_size
        self.max_concurrency = opts.max_concurrency
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._chunk_counts: dict[str, int] = {}  # name -> items, for deletes

    def location(self) -> str:
        return f"dynamodb table {self.table!r}"

    def _transient(self, exc: BaseException) -> bool:
        return transient_aws_error(exc)

    async def _setup(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """One request while opening: throttling retried, the rest fails fast."""
        return await aws_open_request(self, operation, f"table {self.table!r}", call)

    async def _request(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        return await aws_request(self, operation, f"table {self.table!r}", call)

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._state != "new":
            return
        try:
            async with self._open_deadline():
                self._client = await self._stack.enter_async_context(
                    aws_client("dynamodb", self.options, "DynamoDB", retries=0)
                )
                await self._prepare_table()
        except BaseException:
            await self._stack.aclose()
            raise
        await super().open()
        logger.debug("%r opened", self)

    async def _describe(self) -> dict[str, Any] | None:
        async def call() -> dict[str, Any] | None:
            try:
                reply = await self._client.describe_table(TableName=self.table)
            except ClientError as exc:
                if error_code(exc) == "ResourceNotFoundException":
                    return None
                raise
            table: dict[str, Any] = reply["Table"]
            return table

        return await self._setup("DescribeTable", call)

    async def _prepare_table(self) -> None:
        created = False
        table = await self._describe()
        if table is None:
            if not self.create_table:
                raise ConfigError(
                    f"DynamoDB table {self.table!r} does not exist; create it with "
                    f"{_SCHEMA_TEXT}, or set backends.DynamoDB.create_table to true"
                )
            created = await self._create()
        loop = asyncio.get_running_loop()

        async def active() -> dict[str, Any] | None:
            found = await self._describe()
            return found if found is not None and found["TableStatus"] == "ACTIVE" else None

        table = await poll_until(active, loop.time() + self.config.timeout, self.backoff)
        if table is None:
            raise ConfigError(f"DynamoDB table {self.table!r} did not become ACTIVE in time")
        self._check_schema(table)
        ttl = await self._setup(
            "DescribeTimeToLive", lambda: self._client.describe_time_to_live(TableName=self.table)
        )
        desc = ttl.get("TimeToLiveDescription", {})
        enabled = desc.get("TimeToLiveStatus") in ("ENABLED", "ENABLING")
        if enabled and desc.get("AttributeName") == TTL_ATTRIBUTE:
            return
        if created or (self.create_table and not enabled):

            async def update() -> None:
                try:
                    await self._client.update_time_to_live(
                        TableName=self.table,
                        TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
                    )
                except ClientError as exc:  # another peer enabled it first
                    if error_code(exc) != "ValidationException":
                        raise

            await self._setup("UpdateTimeToLive", update)
            return
        logger.warning(
            "DynamoDB table %r has no Time to Live on %r: items of peers that die before "
            "close() will stay; enable TTL on that attribute",
            self.table,
            TTL_ATTRIBUTE,
        )

    async def _create(self) -> bool:
        """Create the table; False when another peer created it first."""

        async def create() -> bool:
            try:
                await self._client.create_table(
                    TableName=self.table, BillingMode="PAY_PER_REQUEST", **TABLE_SCHEMA
                )
            except ClientError as exc:
                if error_code(exc) == "ResourceInUseException":
                    return False
                raise
            return True

        created = await self._setup("CreateTable", create)
        if created:
            logger.info("created DynamoDB table %r", self.table)
        return created

    def _check_schema(self, table: dict[str, Any]) -> None:
        keys = {k["AttributeName"]: k["KeyType"] for k in table.get("KeySchema", ())}
        types = {
            a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", ())
        }
        if (
            keys != {"pk": "HASH", "sk": "RANGE"}
            or types.get("pk") != "S"
            or types.get("sk") != "N"
        ):
            raise ConfigError(
                f"DynamoDB table {self.table!r} has keys {keys} with types {types}; fmi-async "
                f"needs {_SCHEMA_TEXT}: use another table_name or recreate the table"
            )

    async def _shutdown(self) -> None:
        await self._stack.aclose()
        self._client = None

    # ---------------------------------------------------------------- batches

    async def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """One BatchWriteItem, resubmitting unprocessed items with backoff until the deadline."""
        pending = requests

        async def attempt() -> bool | None:
            nonlocal pending

            async def call() -> Any:
                return await self._client.batch_write_item(RequestItems={self.table: pending})

            reply = await self._request("BatchWriteItem", call)
            pending = reply.get("UnprocessedItems", {}).get(self.table, [])
            return True if not pending else None

        if await poll_until(attempt, self.op_deadline(), self.backoff) is None:
            raise BackendError(
                f"BatchWriteItem on table {self.table!r}: {len(pending)} items still unprocessed "
                "at the operation's deadline; raise the table's write capacity"
            )

    async def _batch_get(self, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One BatchGetItem (consistent), resubmitting unprocessed keys until the deadline."""
        pending = keys
        found: list[dict[str, Any]] = []

        async def attempt() -> bool | None:
            nonlocal pending

            async def call() -> Any:
                return await self._client.batch_get_item(
                    RequestItems={self.table: {"Keys": pending, "ConsistentRead": True}}
                )

            reply = await self._request("BatchGetItem", call)
            found.extend(reply.get("Responses", {}).get(self.table, []))
            pending = reply.get("UnprocessedKeys", {}).get(self.table, {}).get("Keys", [])
            return True if not pending else None

        if await poll_until(attempt, self.op_deadline(), self.backoff) is None:
            raise BackendError(
                f"BatchGetItem on table {self.table!r}: {len(pending)} keys still unprocessed "
                "at the operation's deadline; raise the table's read capacity"
            )
        return found

    async def _write_chunks(
        self, item: Callable[[int], dict[str, Any]], sort_keys: list[int]
    ) -> None:
        # Items are built inside the bounded task: at most max_concurrency
        # batches of chunks exist at once.
        await self._batch_write([{"PutRequest": {"Item": item(sk)}} for sk in sort_keys])

    def _units(self, kind: str, nbytes: int, per_unit: int) -> None:
        self.stats.requests[kind] += -(-nbytes // per_unit)

    # ---------------------------------------------------------------- storage primitives

    async def _store(
        self, name: str, frames: Sequence[Buffer], nbytes: int, *, exclusive: bool = False
    ) -> None:
        expires = str(int(time.time()) + self.ttl)
        version = secrets.token_hex(8)
        bounds = chunk_bounds(nbytes, self.chunk_size)

        def item(sk: int) -> dict[str, Any]:
            lo, hi = bounds[sk]
            self._units("write_units", hi - lo + len(name) + 64, 1024)
            entry: dict[str, Any] = {
                "pk": {"S": name},
                "sk": {"N": str(sk)},
                "data": {"B": join_range(frames, lo, hi)},
                "v": {"S": version},
                TTL_ATTRIBUTE: {"N": expires},
            }
            if sk == 0:
                entry["n"] = {"N": str(len(bounds))}
            return entry

        self._chunk_counts[name] = max(len(bounds), self._chunk_counts.get(name, 0))
        tail = list(range(1, len(bounds)))
        groups = [tail[i : i + WRITE_BATCH] for i in range(0, len(tail), WRITE_BATCH)]
        await bounded_gather(
            [functools.partial(self._write_chunks, item, g) for g in groups],
            self.max_concurrency,
        )
        # Chunk 0 last: its presence means every other chunk is in place.
        head = item(0)
        condition: dict[str, Any] = {}
        if exclusive:
            condition = {
                "ConditionExpression": "attribute_not_exists(pk)",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }

        async def put() -> dict[str, Any] | None:
            try:
                await self._client.put_item(TableName=self.table, Item=head, **condition)
            except ClientError as exc:
                if exclusive and error_code(exc) == "ConditionalCheckFailedException":
                    found: dict[str, Any] = exc.response.get("Item") or {}
                    return found
                raise
            return None

        existing = await self._request("PutItem", put)
        if existing is not None:
            self._check_duplicate(name, existing, version)

    def _check_duplicate(self, name: str, existing: dict[str, Any], version: str) -> None:
        """Item 0 of a message was there already: fine if it is this write's (same version).

        Raises :class:`~fmi_async.errors.BackendError` for another writer's item.
        """
        if not existing or existing.get("v", {}).get("S") == version:
            # An earlier attempt of this write landed and its reply was lost.
            logger.debug("%r: PutItem of %s was a retry of a write that landed", self, name)
            return
        raise BackendError(
            f"PutItem on table {self.table!r}: {name!r} already holds an item written by "
            "another writer; is a second job running with the same communicator name and "
            "run id, or does another program write under fmi/?"
        )

    async def _load(self, name: str, consume: bool) -> list[Buffer] | None:
        async def get() -> Any:
            return await self._client.get_item(
                TableName=self.table,
                Key={"pk": {"S": name}, "sk": {"N": "0"}},
                ConsistentRead=True,
            )

        reply = await self._request("GetItem", get)
        head = reply.get("Item")
        if head is None or _expired(head):
            return None
        count = int(head["n"]["N"])
        version = head["v"]["S"]
        chunks: dict[int, bytes] = {0: head["data"]["B"]}
        tail = [{"pk": {"S": name}, "sk": {"N": str(sk)}} for sk in range(1, count)]
        groups = [tail[i : i + GET_BATCH] for i in range(0, len(tail), GET_BATCH)]
        for found in await bounded_gather(
            [functools.partial(self._batch_get, g) for g in groups], self.max_concurrency
        ):
            for entry in found:
                if entry["v"]["S"] == version:
                    chunks[int(entry["sk"]["N"])] = entry["data"]["B"]
        self._units("read_units", sum(len(c) + len(name) + 64 for c in chunks.values()), 4096)
        if len(chunks) != count:
            logger.debug("%r: %s is being rewritten; reading again", self, name)
            return None
        if consume:
            self._chunk_counts[name] = count
        return [chunks[sk] for sk in range(count)]

    async def _sort_keys(self, name: str) -> list[int]:
        """Every chunk number stored under ``name`` (for names this peer did not write)."""
        keys: list[int] = []
        start: dict[str, Any] | None = None
        while True:
            kwargs: dict[str, Any] = {
                "TableName": self.table,
                "KeyConditionExpression": "pk = :pk",
                "ExpressionAttributeValues": {":pk": {"S": name}},
                "ProjectionExpression": "sk",
                "ConsistentRead": True,
            }
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            reply = await self._request("Query", functools.partial(self._client.query, **kwargs))
            keys.extend(int(item["sk"]["N"]) for item in reply.get("Items", ()))
            start = reply.get("LastEvaluatedKey")
            if start is None:
                return keys

    async def _remove(self, names: Collection[str]) -> None:
        targets: list[tuple[str, int]] = []
        for name in sorted(set(names)):
            count = self._chunk_counts.pop(name, None)
            sks = list(range(count)) if count is not None else await self._sort_keys(name)
            targets.extend((name, sk) for sk in sks)
        requests = [
            {"DeleteRequest": {"Key": {"pk": {"S": name}, "sk": {"N": str(sk)}}}}
            for name, sk in targets
        ]
        groups = [requests[i : i + WRITE_BATCH] for i in range(0, len(requests), WRITE_BATCH)]
        await bounded_gather(
            [functools.partial(self._batch_write, g) for g in groups], self.max_concurrency
        )

    async def list_names(self, prefix: str) -> list[str]:
        """Names under ``prefix`` still in the table (expired or not).

        A Scan reads the whole table (DynamoDB cannot list by key prefix
        across partitions): meant for tests and after-crash cleanup, not for
        the data path.
        """
        self._check_open()
        names: set[str] = set()
        start: dict[str, Any] | None = None
        while True:
            kwargs: dict[str, Any] = {
                "TableName": self.table,
                "FilterExpression": "begins_with(pk, :prefix)",
                "ExpressionAttributeValues": {":prefix": {"S": prefix}},
                "ProjectionExpression": "pk",
                "ConsistentRead": True,
            }
            if start is not None:
                kwargs["ExclusiveStartKey"] = start
            reply = await self._request("Scan", functools.partial(self._client.scan, **kwargs))
            names.update(item["pk"]["S"] for item in reply.get("Items", ()))
            start = reply.get("LastEvaluatedKey")
            if start is None:
                return sorted(names)


def _expired(item: dict[str, Any]) -> bool:
    """Past its ``expires_at``: gone for readers, whether or not TTL has removed it yet."""
    expires = item.get(TTL_ATTRIBUTE, {}).get("N")
    return expires is not None and int(expires) < time.time()
