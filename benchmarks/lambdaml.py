"""LambdaML's storage-only reduction, for the k-means comparison (benchmarks/kmeans.py).

LambdaML (Jiang et al., SIGMOD 2021) trains models in serverless functions
that never talk to each other: every exchange goes through a store.  Its
k-means reduces each epoch's update with ``reduce_epoch``:

1. every worker writes its vector to a temporary "bucket" under the key
   ``<worker>_<epoch>``;
2. worker 0 lists the bucket again and again until it has read all the
   workers' vectors of this epoch, adding each to a running sum as it comes
   (and deleting what it read), then writes the sum to a "merged" bucket as
   ``merged_<epoch>`` and deletes the merged objects of earlier epochs;
3. every other worker polls for ``merged_<epoch>``, sleeping between reads
   (LambdaML's ``load_or_wait`` sleeps 0.1 s).

A bucket is an S3 bucket, a Redis hash (LambdaML's Redis storage keeps a
bucket's objects as the fields of one hash) or a DynamoDB table (listing is a
Scan, which returns the values too).  This module is that pattern over the
plain asynchronous clients (``redis.asyncio``, aioboto3), written from its
description, with every request counted by kind so that benchmarks/kmeans.py
can price it with this project's cost model.  Nothing here uses fmi_async's
channels.  Every wait is bounded by ``deadline`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TMP, MERGED = "tmp", "merged"
POLL = 0.1  # seconds between a waiting worker's reads (LambdaML's load_or_wait)
DEADLINE = 120.0  # seconds any one wait may last


class Store:
    """A bucket-of-objects store: ``put``, ``get`` (None if absent), ``list`` (keys
    and, where the listing returns them, values), ``delete``.  ``requests``
    counts the requests issued, by the names the cost model prices."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes_sent = 0

    async def open(self) -> None:
        """Connect (and issue one cheap request, so the first epoch is warm)."""

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        raise NotImplementedError

    async def get(self, bucket: str, key: str) -> bytes | None:
        raise NotImplementedError

    async def list(self, bucket: str) -> dict[str, bytes | None]:
        raise NotImplementedError

    async def delete(self, bucket: str, keys: Sequence[str]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Close the connections."""


class RedisStore(Store):
    """Buckets as Redis hashes ``<prefix>:<bucket>``: HSET, HGET, HKEYS, HDEL."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__()
        import redis.asyncio as aioredis

        self.client = aioredis.Redis(host=host, port=port)
        self.prefix = prefix

    def _name(self, bucket: str) -> str:
        return f"{self.prefix}:{bucket}"

    async def open(self) -> None:
        await self.client.ping()

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        self.requests["HSET"] += 1
        self.bytes_sent += len(data)
        await self.client.hset(self._name(bucket), key, data)

    async def get(self, bucket: str, key: str) -> bytes | None:
        self.requests["HGET"] += 1
        data: Any = await self.client.hget(self._name(bucket), key)
        return None if data is None else bytes(data)

    async def list(self, bucket: str) -> dict[str, bytes | None]:
        self.requests["HKEYS"] += 1
        keys: Any = await self.client.hkeys(self._name(bucket))
        return {bytes(k).decode(): None for k in keys}

    async def delete(self, bucket: str, keys: Sequence[str]) -> None:
        if keys:
            self.requests["HDEL"] += 1
            await self.client.hdel(self._name(bucket), *keys)

    async def close(self) -> None:
        await self.client.aclose()


class S3Store(Store):
    """Buckets as S3 buckets ``<prefix>-<bucket>`` (made by :func:`create_buckets`)."""

    def __init__(self, endpoint: str, region: str, prefix: str) -> None:
        super().__init__()
        self.endpoint, self.region, self.prefix = endpoint, region, prefix
        self.stack = AsyncExitStack()
        self.s3: Any = None

    def _name(self, bucket: str) -> str:
        return f"{self.prefix}-{bucket}"

    async def open(self) -> None:
        import aioboto3

        session = aioboto3.Session()
        self.s3 = await self.stack.enter_async_context(
            session.client("s3", endpoint_url=self.endpoint, region_name=self.region)
        )
        await self.s3.head_bucket(Bucket=self._name(TMP))

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        self.requests["PutObject"] += 1
        self.bytes_sent += len(data)
        await self.s3.put_object(Bucket=self._name(bucket), Key=key, Body=data)

    async def get(self, bucket: str, key: str) -> bytes | None:
        self.requests["GetObject"] += 1
        try:
            reply = await self.s3.get_object(Bucket=self._name(bucket), Key=key)
        except self.s3.exceptions.NoSuchKey:
            return None
        async with reply["Body"] as body:
            data: bytes = await body.read()
        return data

    async def list(self, bucket: str) -> dict[str, bytes | None]:
        self.requests["ListObjectsV2"] += 1
        reply = await self.s3.list_objects_v2(Bucket=self._name(bucket))
        return {obj["Key"]: None for obj in reply.get("Contents", [])}

    async def delete(self, bucket: str, keys: Sequence[str]) -> None:
        if keys:
            self.requests["DeleteObjects"] += 1
            objects = [{"Key": k} for k in keys]
            await self.s3.delete_objects(Bucket=self._name(bucket), Delete={"Objects": objects})

    async def close(self) -> None:
        await self.stack.aclose()


class DynamoStore(Store):
    """Buckets as DynamoDB tables ``<prefix>-<bucket>`` (hash key ``key``, binary
    ``value``); a listing is a Scan.  Capacity units are counted as DynamoDB
    bills them on demand: a write 1 unit per started KB, a strongly consistent
    read or a Scan 1 unit per started 4 KB read (a Scan at least 1)."""

    def __init__(self, endpoint: str, region: str, prefix: str) -> None:
        super().__init__()
        self.endpoint, self.region, self.prefix = endpoint, region, prefix
        self.stack = AsyncExitStack()
        self.db: Any = None

    def _name(self, bucket: str) -> str:
        return f"{self.prefix}-{bucket}"

    async def open(self) -> None:
        import aioboto3

        session = aioboto3.Session()
        self.db = await self.stack.enter_async_context(
            session.client("dynamodb", endpoint_url=self.endpoint, region_name=self.region)
        )
        await self.db.describe_table(TableName=self._name(TMP))

    def _units(self, kind: str, nbytes: int, unit: int) -> None:
        self.requests[kind] += max(1, math.ceil(nbytes / unit))

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        self.requests["PutItem"] += 1
        self.bytes_sent += len(data)
        self._units("write_units", len(key) + len("value") + len(data), 1024)
        item = {"key": {"S": key}, "value": {"B": data}}
        await self.db.put_item(TableName=self._name(bucket), Item=item)

    async def get(self, bucket: str, key: str) -> bytes | None:
        self.requests["GetItem"] += 1
        reply = await self.db.get_item(
            TableName=self._name(bucket), Key={"key": {"S": key}}, ConsistentRead=True
        )
        item = reply.get("Item")
        data: bytes | None = None if item is None else item["value"]["B"]
        self._units("read_units", 0 if data is None else len(key) + len(data), 4096)
        return data

    async def list(self, bucket: str) -> dict[str, bytes | None]:
        self.requests["Scan"] += 1
        out: dict[str, bytes | None] = {}
        scanned, start = 0, None
        for _ in range(1000):  # pages of a Scan (1 MB each)
            args: dict[str, Any] = {"TableName": self._name(bucket), "ConsistentRead": True}
            if start is not None:
                args["ExclusiveStartKey"] = start
            reply = await self.db.scan(**args)
            for item in reply.get("Items", []):
                key, value = item["key"]["S"], item["value"]["B"]
                out[key] = value
                scanned += len(key) + len(value)
            start = reply.get("LastEvaluatedKey")
            if start is None:
                break
        self._units("read_units", scanned, 4096)
        return out

    async def delete(self, bucket: str, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 25):
            self.requests["BatchWriteItem"] += 1
            self.requests["write_units"] += len(keys[i : i + 25])
            deletes = [{"DeleteRequest": {"Key": {"key": {"S": k}}}} for k in keys[i : i + 25]]
            await self.db.batch_write_item(RequestItems={self._name(bucket): deletes})

    async def close(self) -> None:
        await self.stack.aclose()


async def create_buckets(backend: str, endpoint: str, region: str, prefix: str) -> None:
    """Make the two buckets of a run (S3 buckets or DynamoDB tables; Redis needs none)."""
    if backend == "redis":
        return
    import aioboto3

    session = aioboto3.Session()
    if backend == "s3":
        async with session.client("s3", endpoint_url=endpoint, region_name=region) as s3:
            for bucket in (TMP, MERGED):
                await s3.create_bucket(Bucket=f"{prefix}-{bucket}")
        return
    async with session.client("dynamodb", endpoint_url=endpoint, region_name=region) as db:
        for bucket in (TMP, MERGED):
            await db.create_table(
                TableName=f"{prefix}-{bucket}",
                KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )


def make_store(backend: str, where: str, region: str, prefix: str) -> Store:
    """A store of ``backend``: ``where`` is host:port for Redis, the endpoint URL else."""
    if backend == "redis":
        host, port = where.rsplit(":", 1)
        return RedisStore(host, int(port), prefix)
    if backend == "s3":
        return S3Store(where, region, prefix)
    if backend == "dynamodb":
        return DynamoStore(where, region, prefix)
    raise ValueError(f"unknown store {backend!r}: redis, s3 or dynamodb")


class StorageReducer:
    """One worker's side of LambdaML's ``reduce_epoch`` over a :class:`Store`.

    ``await reducer(vector)`` is one epoch's reduction: the element-wise sum of
    every worker's vector (the same dtype and shape on all), returned to all.
    """

    def __init__(
        self, store: Store, rank: int, size: int, poll: float = POLL, deadline: float = DEADLINE
    ) -> None:
        self.store, self.rank, self.size = store, rank, size
        self.poll, self.deadline = poll, deadline
        self.epoch = 0

    async def __call__(self, vector: np.ndarray) -> np.ndarray:
        epoch, self.epoch = self.epoch, self.epoch + 1
        await self.store.put(TMP, f"{self.rank}_{epoch}", vector.tobytes())
        if self.rank == 0:
            return await self._merge(vector, epoch)
        data = await self._wait_for(MERGED, f"merged_{epoch}")
        return np.frombuffer(data, dtype=vector.dtype).reshape(vector.shape).copy()

    async def _merge(self, vector: np.ndarray, epoch: int) -> np.ndarray:
        """Worker 0: list, read and add until every worker's vector of ``epoch`` is
        in; write the sum back; delete the merged sums of earlier epochs."""
        merged = np.zeros_like(vector)
        seen: set[str] = set()
        limit = time.monotonic() + self.deadline
        while len(seen) < self.size:
            if time.monotonic() > limit:
                raise TimeoutError(f"epoch {epoch}: {len(seen)} of {self.size} updates arrived")
            listing = await self.store.list(TMP)
            fresh = [k for k in listing if k.endswith(f"_{epoch}") and k not in seen]
            for key in fresh:
                data = listing[key]
                if data is None:
                    data = await self.store.get(TMP, key)
                    if data is None:
                        continue  # listed, not readable yet: the next round reads it
                merged += np.frombuffer(data, dtype=vector.dtype).reshape(vector.shape)
                seen.add(key)
            await self.store.delete(TMP, [k for k in fresh if k in seen])
        await self.store.put(MERGED, f"merged_{epoch}", merged.tobytes())
        old = [k for k in await self.store.list(MERGED) if int(k.rsplit("_", 1)[1]) < epoch]
        await self.store.delete(MERGED, old)
        return merged

    async def _wait_for(self, bucket: str, key: str) -> bytes:
        """Read ``key`` every ``poll`` seconds until it exists."""
        limit = time.monotonic() + self.deadline
        while True:
            data = await self.store.get(bucket, key)
            if data is not None:
                return data
            if time.monotonic() > limit:
                raise TimeoutError(f"{key} did not appear in {self.deadline:g} s")
            await asyncio.sleep(self.poll)

    async def barrier(self, name: str) -> None:
        """Every worker writes ``<name>-<rank>``; all wait until all are there.
        Used before the timed epochs (its requests are not counted)."""
        await self.store.put(TMP, f"{name}-{self.rank}", b"")
        await self._wait_count(f"{name}-", self.size)

    async def _wait_count(self, prefix: str, count: int) -> None:
        limit = time.monotonic() + self.deadline
        while sum(k.startswith(prefix) for k in await self.store.list(TMP)) < count:
            if time.monotonic() > limit:
                raise TimeoutError(f"{prefix}*: fewer than {count} workers arrived")
            await asyncio.sleep(self.poll)

    async def cleanup(self) -> None:
        """After the last epoch (LambdaML clears both buckets): every other worker,
        holding the last sum, says it has left; worker 0 waits for them all, then
        deletes everything left in both buckets."""
        if self.rank:
            await self.store.put(TMP, f"left-{self.rank}", b"")
            return
        await self._wait_count("left-", self.size - 1)
        for bucket in (TMP, MERGED):
            await self.store.delete(bucket, list(await self.store.list(bucket)))
