"""Storage channels (Redis, S3, DynamoDB): one test body run on each, real servers only.

The servers come from ``tests/storage_servers.py``: a redis-server process and
a moto server speaking the AWS HTTP protocol, both on loopback.  What the
channels left behind is inspected with the backends' own clients, not with
the channel under test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aioboto3
import numpy as np
import pytest
import redis.asyncio as aioredis

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.registry import channel_class
from fmi_async.channels.storage import StorageChannel
from fmi_async.config import Config
from fmi_async.errors import ArgumentError, ClosedError, CommTimeout
from fmi_async.wire import dumps, loads
from tests.helpers import same

MiB = 1024 * 1024
Backend = tuple[str, Config]


def make(
    backend: Backend, n: int, comm: str = "FMI_WORLD", run: str | None = None, **options: Any
) -> list[StorageChannel]:
    name, config = backend
    if options:
        config = config.with_backend(name, **options)
    run = run or uuid.uuid4().hex[:12]
    cls = channel_class(name)
    chans = [cls(ChannelContext(i, n, comm, run, config, Mailbox(i))) for i in range(n)]
    assert all(isinstance(c, StorageChannel) and c.kind == "mediated" for c in chans)
    return chans  # type: ignore[return-value]


@asynccontextmanager
async def opened(chans: list[StorageChannel]) -> AsyncIterator[list[StorageChannel]]:
    await asyncio.gather(*(c.open() for c in chans))
    try:
        yield chans
    finally:
        await asyncio.gather(*(c.close() for c in chans))


@asynccontextmanager
async def group(backend: Backend, n: int, **kw: Any) -> AsyncIterator[list[StorageChannel]]:
    async with opened(make(backend, n, **kw)) as chans:
        yield chans


# ---------------------------------------------------------------- inspecting the backends


async def stored(backend: Backend, prefix: str) -> dict[str, dict[str, Any]]:
    """Every stored key/object/item under ``prefix``, with its expiry information."""
    name, config = backend
    opts = config.options(name)
    found: dict[str, dict[str, Any]] = {}
    if name == "redis":
        client = aioredis.Redis(host=opts["host"], port=opts["port"])
        try:
            async for key in client.scan_iter(match=prefix + "*", count=1000):
                found[key.decode()] = {"pttl": await client.pttl(key)}
        finally:
            await client.aclose()
    elif name == "s3":
        async with aioboto3.Session().client("s3", endpoint_url=opts["endpoint_url"]) as s3:
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=opts["bucket_name"], Prefix=prefix
            )
            async for page in pages:
                for obj in page.get("Contents", ()):
                    found[obj["Key"]] = {"size": obj["Size"]}
    else:
        async with aioboto3.Session().client("dynamodb", endpoint_url=opts["endpoint_url"]) as db:
            pages = db.get_paginator("scan").paginate(
                TableName=opts["table_name"],
                FilterExpression="begins_with(pk, :p)",
                ExpressionAttributeValues={":p": {"S": prefix}},
            )
            async for page in pages:
                for item in page.get("Items", ()):
                    found[f"{item['pk']['S']}#{item['sk']['N']}"] = {
                        "expires_at": int(item["expires_at"]["N"]) if "expires_at" in item else None
                    }
    return found


# ---------------------------------------------------------------- point to point


async def test_send_recv_matches_source_and_key_in_order(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 3) as (a, b, c):
        await a.send(1, ("u", 1), dumps("first"))
        await a.send(1, ("u", 2), dumps({"tag": 2}))
        await a.send(1, ("u", 1), dumps("second"))
        await c.send(1, ("u", 1), dumps("from c"))
        # A later key first: an early message for another key does not block.
        assert loads(await b.recv(0, ("u", 2), 5)) == {"tag": 2}
        assert loads(await b.recv(2, ("u", 1), 5)) == "from c"
        assert loads(await b.recv(0, ("u", 1), 5)) == "first"
        assert loads(await b.recv(0, ("u", 1), 5)) == "second"
        # Keys that differ only by type never match.
        await a.send(1, ("u", "1"), dumps("string key"))
        with pytest.raises(CommTimeout):
            await b.recv(0, ("u", 1), 0.2)
        assert loads(await b.recv(0, ("u", "1"), 5)) == "string key"
        assert b.stats.messages_received == 5 and a.stats.messages_sent == 4
        assert sum(a.stats.requests.values()) > 0


async def test_recv_waits_for_a_later_send_and_keeps_post_order(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 2) as (a, b):
        first = asyncio.create_task(b.recv(0, ("c", 7, 1), 10))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(b.recv(0, ("c", 7, 1), 10))
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done()
        for i in range(2):
            await a.send(1, ("c", 7, 1), dumps(np.arange(i, i + 5)))
        one, two = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert same(loads(one), np.arange(0, 5)) and same(loads(two), np.arange(1, 6))


async def test_many_messages_to_one_peer_arrive_in_order(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 2) as (a, b):
        await asyncio.gather(*(a.send(1, ("u", 0), dumps(i)) for i in range(20)))
        got = [loads(await b.recv(0, ("u", 0), 5)) for _ in range(20)]
        assert got == list(range(20))


# ---------------------------------------------------------------- put / get


async def test_put_once_get_by_many_readers(mediated_backend: Backend) -> None:
    value = {"array": np.linspace(0, 1, 1000), "blob": b"x" * 10_000, "n": 42}
    async with group(mediated_backend, 5) as chans:
        early = [asyncio.create_task(c.get(("c", 1, "bcast"), 10)) for c in chans[1:3]]
        await asyncio.sleep(0.1)
        await chans[0].put(("c", 1, "bcast"), dumps(value))
        late = [c.get(("c", 1, "bcast"), 10) for c in chans[3:]]
        results = await asyncio.wait_for(asyncio.gather(*early, *late), 15)
        for payload in results:
            got = loads(payload)
            assert same(got["array"], value["array"]) and got["blob"] == value["blob"]
        # Non-destructive: readers may read again.
        again = await asyncio.gather(*(c.get(("c", 1, "bcast"), 5) for c in chans))
        assert all(loads(p)["n"] == 42 for p in again)


async def test_put_replaces_and_delete_removes(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 2) as (a, b):
        await a.put(("k",), dumps("old"))
        await a.put(("k",), dumps("new"))
        assert loads(await b.get(("k",), 5)) == "new"
        await a.delete([("k",)])
        with pytest.raises(CommTimeout):
            await b.get(("k",), 0.3)


async def test_chunked_objects_with_small_limits(mediated_backend: Backend) -> None:
    small = {
        "redis": {"chunk_size": MiB, "inline_max": 64 * 1024},
        "s3": {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB},
        "dynamodb": {"chunk_size": 200_000},
    }[mediated_backend[0]]
    data = np.random.default_rng(1).integers(0, 255, size=11 * MiB + 3, dtype=np.uint8)
    async with group(mediated_backend, 3, **small) as (a, b, c):
        await a.put(("big",), dumps(data))
        one, two = await asyncio.gather(b.get(("big",), 20), c.get(("big",), 20))
        assert same(loads(one), data) and same(loads(two), data)
        await b.send(2, ("u", 0), dumps(data[::-1].copy()))
        assert same(loads(await c.recv(1, ("u", 0), 20)), data[::-1])


async def test_64_mib_array_is_byte_exact(mediated_backend: Backend) -> None:
    array = np.random.default_rng(0).integers(0, 2**63, size=8 * MiB, dtype=np.uint64)
    assert array.nbytes == 64 * MiB
    async with group(mediated_backend, 2) as (a, b):
        sent = asyncio.create_task(a.send(1, ("u", 0), dumps(array)))
        got = loads(await b.recv(0, ("u", 0), 60))
        await sent
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()
        assert b.stats.bytes_received > 64 * MiB


# ---------------------------------------------------------------- deadlines


async def test_missing_object_times_out_within_the_deadline(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 2) as (_, b):
        for call in (b.get(("c", 9, "never"), 0.5), b.recv(0, ("u", 99), 0.5)):
            start = time.monotonic()
            with pytest.raises(CommTimeout) as info:
                await call
            elapsed = time.monotonic() - start
            assert 0.45 <= elapsed < 2.0, elapsed
            text = str(info.value)
            assert mediated_backend[0] in text and "check" in text
        assert "tag 99" in text and "peer 0" in text


async def test_default_wait_is_fmi_max_timeout(mediated_backend: Backend) -> None:
    (chan,) = make(mediated_backend, 1, max_timeout=300)
    async with opened([chan]):
        assert chan.max_wait == pytest.approx(0.3)
        start = time.monotonic()
        with pytest.raises(CommTimeout):
            await chan.get(("nothing",), None)
        assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- isolation


async def test_runs_and_communicators_never_see_each_other(mediated_backend: Backend) -> None:
    run1, run2 = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    sets = {
        ("A", run1): make(mediated_backend, 2, comm="A", run=run1),
        ("A", run2): make(mediated_backend, 2, comm="A", run=run2),
        ("B", run1): make(mediated_backend, 2, comm="B", run=run1),
        ("A/x", run1): make(mediated_backend, 2, comm="A/x", run=run1),
    }
    everything = [c for chans in sets.values() for c in chans]
    async with opened(everything):

        async def exchange(label: tuple[str, str], chans: list[StorageChannel]) -> None:
            a, b = chans
            await a.put(("obj",), dumps(label))
            await a.send(1, ("u", 0), dumps(label))
            assert loads(await b.get(("obj",), 10)) == label
            assert loads(await b.recv(0, ("u", 0), 10)) == label

        await asyncio.gather(*(exchange(label, chans) for label, chans in sets.items()))
        # Exactly one message was sent per set and it was consumed: nothing more.
        for chans in sets.values():
            with pytest.raises(CommTimeout):
                await chans[1].recv(0, ("u", 0), 0.2)
        assert sets[("A", run1)][0].prefix != sets[("A/x", run1)][0].prefix


# ---------------------------------------------------------------- cleanup


async def test_close_deletes_everything_the_run_stored(mediated_backend: Backend) -> None:
    small: dict[str, Any] = {"redis": {"inline_max": 1024}}.get(mediated_backend[0], {})
    chans = make(mediated_backend, 3, **small)
    prefix = chans[0].prefix + "/"
    async with opened(chans) as (a, b, c):
        await a.put(("shared",), dumps(np.zeros(5000)))
        await b.send(2, ("u", 0), dumps(np.ones(5000)))  # consumed below
        await b.send(0, ("u", 1), dumps(np.ones(5000)))  # never received
        assert same(loads(await c.recv(1, ("u", 0), 5)), np.ones(5000))
        assert loads(await c.get(("shared",), 5)).shape == (5000,)
        before = await stored(mediated_backend, prefix)
        assert before
        # list_run sees every peer's names of this run (and only those).
        if mediated_backend[0] == "s3":
            c.list_page_size = 1  # type: ignore[attr-defined]  # walk several pages
        listed = set(await c.list_run())
        if mediated_backend[0] == "s3":
            assert c.stats.requests["ListObjectsV2"] >= len(listed) >= 2
        assert listed and all(n.startswith(prefix) for n in listed)
        assert listed == {k.rsplit("#", 1)[0] for k in before}
    assert await stored(mediated_backend, prefix) == {}
    (fresh,) = make(mediated_backend, 1, run=chans[0].run_id)
    async with opened([fresh]):
        assert await fresh.list_run() == []
    # close is idempotent, and a closed channel refuses work.
    await a.close()
    with pytest.raises(ClosedError):
        await a.put(("again",), dumps(1))


async def test_killed_peer_leaves_only_keys_that_expire(mediated_backend: Backend) -> None:
    name, config = mediated_backend
    chans = (
        make(mediated_backend, 2, inline_max=1024) if name == "redis" else make(mediated_backend, 2)
    )
    prefix = chans[0].prefix + "/"
    ttl = chans[0].ttl
    async with opened(chans[1:]):
        await chans[0].open()
        await chans[0].put(("left",), dumps(np.arange(10_000)))
        await chans[0].send(1, ("u", 0), dumps("unread"))
        # The peer "dies": its clients go away without close() deleting anything.
        await chans[0]._shutdown()
        leftovers = await stored(mediated_backend, prefix)
        assert leftovers
        now = time.time()
        if name == "redis":
            assert all(0 < v["pttl"] <= ttl * 1000 for v in leftovers.values()), leftovers
        elif name == "dynamodb":
            for info in leftovers.values():
                assert info["expires_at"] is not None and now < info["expires_at"] <= now + ttl + 5
            await assert_dynamodb_ttl_enabled(config)
        else:
            await assert_s3_lifecycle_covers(config, list(leftovers))
        await purge(mediated_backend, list(leftovers))


async def assert_dynamodb_ttl_enabled(config: Config) -> None:
    opts = config.options("dynamodb")
    async with aioboto3.Session().client("dynamodb", endpoint_url=opts["endpoint_url"]) as db:
        ttl = await db.describe_time_to_live(TableName=opts["table_name"])
    desc = ttl["TimeToLiveDescription"]
    assert desc["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
    assert desc["AttributeName"] == "expires_at"


async def assert_s3_lifecycle_covers(config: Config, keys: list[str]) -> None:
    """S3 has no per-object TTL: an enabled lifecycle rule on the prefix expires them."""
    opts = config.options("s3")
    async with aioboto3.Session().client("s3", endpoint_url=opts["endpoint_url"]) as s3:
        rules = (await s3.get_bucket_lifecycle_configuration(Bucket=opts["bucket_name"]))["Rules"]
    expiring = [
        r["Filter"]["Prefix"] for r in rules if r["Status"] == "Enabled" and r["Expiration"]["Days"]
    ]
    assert all(any(key.startswith(p) for p in expiring) for key in keys), (rules, keys)


async def purge(backend: Backend, names: list[str]) -> None:
    name, config = backend
    opts = config.options(name)
    if name == "redis":
        client = aioredis.Redis(host=opts["host"], port=opts["port"])
        await client.delete(*names)
        await client.aclose()
    elif name == "s3":
        async with aioboto3.Session().client("s3", endpoint_url=opts["endpoint_url"]) as s3:
            await s3.delete_objects(
                Bucket=opts["bucket_name"], Delete={"Objects": [{"Key": k} for k in names]}
            )
    else:
        async with aioboto3.Session().client("dynamodb", endpoint_url=opts["endpoint_url"]) as db:
            for entry in names:
                pk, sk = entry.rsplit("#", 1)
                await db.delete_item(
                    TableName=opts["table_name"], Key={"pk": {"S": pk}, "sk": {"N": sk}}
                )


# ---------------------------------------------------------------- arguments


async def test_bad_peers_and_keys_are_refused_before_storage(mediated_backend: Backend) -> None:
    async with group(mediated_backend, 2) as (a, _):
        with pytest.raises(ArgumentError):
            await a.send(2, ("u", 0), dumps(1))
        with pytest.raises(ArgumentError):
            await a.recv(-1, ("u", 0), 1)
        with pytest.raises(ArgumentError):
            await a.put((), dumps(1))
        with pytest.raises(ArgumentError):
            await a.put(("x" * 5000,), dumps(1))
        assert a.stats.messages_sent == 0
