"""Storage channels turn backend failures into fmi errors that say what to fix.

Real servers only: the broken situations are made by the backends' own
clients (a key of the wrong type, a deleted bucket or table, a foreign
object under the run prefix) or by pointing at a closed loopback port.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
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
from fmi_async.errors import (
    BackendError,
    BrokenChannelError,
    ClosedError,
    ConfigError,
    ProtocolError,
)
from fmi_async.wire import dumps, loads

MiB = 1024 * 1024


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens here once the socket is closed


def channel(name: str, config: Config, peer: int = 0, n: int = 2, run: str = "") -> Any:
    cls = channel_class(name)
    return cls(
        ChannelContext(peer, n, "errors", run or uuid.uuid4().hex[:10], config, Mailbox(peer))
    )


def redis_raw(config: Config) -> aioredis.Redis:
    opts = config.options("redis")
    return aioredis.Redis(host=opts["host"], port=opts["port"])


def aws_raw(config: Config, service: str) -> Any:
    opts = config.options(service)
    return aioboto3.Session().client(service, endpoint_url=opts["endpoint_url"])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("backend", "options", "match"),
    [
        ("S3", {}, "bucket_name is required"),
        ("S3", {"bucket_name": "b-1", "part_size": 1024}, "part_size must be at least"),
        ("DynamoDB", {}, "table_name is required"),
        ("DynamoDB", {"table_name": "t", "chunk_size": 500_000}, "chunk_size must be"),
        ("Redis", {"max_connections": 2}, "max_connections must be at least 3"),
        ("Redis", {"ttl": 0}, "ttl must be at least 1"),
        ("Redis", {"port": "6379"}, "port must be a number"),
        ("Redis", {"max_timeout": -5}, "max_timeout must be at least"),
    ],
)
def test_bad_options_are_refused_when_the_channel_is_made(
    backend: str, options: dict[str, Any], match: str
) -> None:
    config = Config.from_dict({"backends": {backend: options}})
    with pytest.raises(ConfigError, match=match):
        channel(backend.lower(), config)


async def test_missing_bucket_is_a_config_error(s3_config: Config) -> None:
    config = s3_config.with_backend("s3", bucket_name=f"absent-{uuid.uuid4().hex[:8]}")
    config = config.with_backend("s3", create_bucket=False)
    chan = channel("s3", config)
    with pytest.raises(ConfigError, match=r"does not exist.*create_bucket"):
        await chan.open()
    await chan.close()


async def test_missing_or_misshapen_table_is_a_config_error(dynamodb_config: Config) -> None:
    name = f"absent-{uuid.uuid4().hex[:8]}"
    config = dynamodb_config.with_backend("dynamodb", table_name=name, create_table=False)
    with pytest.raises(ConfigError, match=r"does not exist.*partition key 'pk' \(String\)"):
        await channel("dynamodb", config).open()
    async with aws_raw(dynamodb_config, "dynamodb") as db:
        await db.create_table(
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        )
        try:
            with pytest.raises(ConfigError, match="needs partition key 'pk'"):
                await channel("dynamodb", config).open()
        finally:
            await db.delete_table(TableName=name)


# ---------------------------------------------------------------- unreachable servers


async def test_unreachable_redis_is_a_broken_channel(redis_config: Config) -> None:
    config = redis_config.with_backend("redis", port=closed_port(), socket_timeout=2)
    chan = channel("redis", config)
    with pytest.raises(BrokenChannelError, match="is redis-server running"):
        await chan.open()
    await chan.close()


@pytest.mark.parametrize("service", ["s3", "dynamodb"])
async def test_unreachable_aws_endpoint_is_a_broken_channel(
    s3_config: Config, dynamodb_config: Config, service: str
) -> None:
    base = s3_config if service == "s3" else dynamodb_config
    config = base.with_backend(
        service,
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        max_attempts=1,
        connect_timeout=1,
    )
    chan = channel(service, config)
    with pytest.raises(BrokenChannelError, match=r"cannot reach the service.*endpoint_url"):
        await chan.open()


# ---------------------------------------------------------------- service errors


async def test_redis_error_replies_become_backend_errors(redis_config: Config) -> None:
    chan = channel("redis", redis_config, peer=1)
    await chan.open()
    raw = redis_raw(redis_config)
    try:
        # Something else wrote a plain string where the channel keeps a list.
        await raw.set(chan.message_name(0, 1, ("u", 0)), b"not a list", ex=60)
        with pytest.raises(BackendError, match="WRONGTYPE"):
            await chan.recv(0, ("u", 0), 1)
        await raw.set(chan.object_name(("obj",)), b"not a list", ex=60)
        with pytest.raises(BackendError, match="WRONGTYPE"):
            await chan.get(("obj",), 1)
    finally:
        await raw.aclose()
        await chan.close()


async def test_redis_without_scripts_sends_with_transactions(redis_config: Config) -> None:
    """A server that refuses EVALSHA (here an ACL) still gets every message, in order, with TTL."""
    user, password = f"noscript-{uuid.uuid4().hex[:8]}", "pw"
    raw = redis_raw(redis_config)
    await raw.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
        commands=["+@all", "-@scripting"],
    )  # fmt: skip
    config = redis_config.with_backend("redis", username=user, password=password)
    run = uuid.uuid4().hex[:10]
    a, b = channel("redis", config, 0, run=run), channel("redis", config, 1, run=run)
    await asyncio.gather(a.open(), b.open())
    try:
        for i in range(3):
            await a.send(1, ("u", 0), dumps(i))
        assert a._push is None  # refused once, then pipelined only
        assert 0 < await raw.ttl(a.message_name(0, 1, ("u", 0))) <= a.ttl
        assert [loads(await b.recv(0, ("u", 0), 5)) for _ in range(3)] == [0, 1, 2]
        # A real error reply (a string where the list belongs) is an error, and
        # does not turn scripts off where they work.
        await b.send(0, ("u", 1), dumps("ok"))
        assert b._push is None
        plain = channel("redis", redis_config, 0, run=run)
        await plain.open()
        try:
            await raw.set(plain.message_name(0, 1, ("u", 2)), b"not a list", ex=60)
            with pytest.raises(BackendError, match="WRONGTYPE"):
                await plain.send(1, ("u", 2), dumps(1))
            assert plain._push is not None
        finally:
            await plain.close()
    finally:
        await asyncio.gather(a.close(), b.close())
        await raw.acl_deluser(user)
        await raw.aclose()


async def test_redis_chunks_that_expired_are_reported(redis_config: Config) -> None:
    run = uuid.uuid4().hex[:10]
    config = redis_config.with_backend("redis", inline_max=1024, chunk_size=64 * 1024)
    a, b = channel("redis", config, 0, run=run), channel("redis", config, 1, run=run)
    await asyncio.gather(a.open(), b.open())
    raw = redis_raw(redis_config)
    try:
        await a.send(1, ("u", 0), dumps(np.zeros(100_000)))
        chunks = [k async for k in raw.scan_iter(match=a.prefix + "/data/*")]
        assert len(chunks) > 1
        await raw.delete(chunks[0])
        with pytest.raises(BackendError, match=r"raise backends.Redis.ttl"):
            await b.recv(0, ("u", 0), 2)
    finally:
        await raw.aclose()
        await asyncio.gather(a.close(), b.close())


async def test_deleted_bucket_and_table_become_backend_errors(
    s3_config: Config, dynamodb_config: Config
) -> None:
    bucket = f"doomed-{uuid.uuid4().hex[:8]}"
    table = f"doomed-{uuid.uuid4().hex[:8]}"
    s3 = channel("s3", s3_config.with_backend("s3", bucket_name=bucket))
    db = channel("dynamodb", dynamodb_config.with_backend("dynamodb", table_name=table))
    await asyncio.gather(s3.open(), db.open())
    async with aws_raw(s3_config, "s3") as raw_s3, aws_raw(dynamodb_config, "dynamodb") as raw_db:
        await raw_s3.delete_bucket(Bucket=bucket)
        await raw_db.delete_table(TableName=table)
    with pytest.raises(BackendError, match=r"NoSuchBucket.*create_bucket"):
        await s3.put(("x",), dumps(1))
    with pytest.raises(BackendError, match="ResourceNotFoundException"):
        await db.put(("x",), dumps(1))
    # close() still releases the clients, then reports that its deletes failed.
    for chan in (s3, db):
        with pytest.raises(BackendError):
            await chan.close()
        assert not chan.is_open


async def test_a_foreign_object_under_the_prefix_is_a_protocol_error(
    mediated_backend: tuple[str, Config],
) -> None:
    name, config = mediated_backend
    chan: StorageChannel = channel(name, config)
    await chan.open()
    try:
        # A valid message stored under another key's name: the key check catches it.
        await chan.put(("a",), dumps("for a"))
        await chan.put(("b",), dumps("for b"))
        parts = await chan._load(chan.object_name(("a",)), False)
        assert parts is not None
        await chan._store(chan.object_name(("b",)), parts, sum(len(p) for p in parts))
        with pytest.raises(ProtocolError, match="another program"):
            await chan.get(("b",), 2)
        assert loads(await chan.get(("a",), 2)) == "for a"
    finally:
        await chan.close()


# ---------------------------------------------------------------- waits and cancellation


async def test_cancelled_receive_leaves_the_channel_usable(
    mediated_backend: tuple[str, Config],
) -> None:
    name, config = mediated_backend
    run = uuid.uuid4().hex[:10]
    a, b = channel(name, config, 0, run=run), channel(name, config, 1, run=run)
    await asyncio.gather(a.open(), b.open())
    try:
        waiting = asyncio.create_task(b.recv(0, ("u", 0), 10))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await a.send(1, ("u", 0), dumps("after cancel"))
        assert loads(await b.recv(0, ("u", 0), 5)) == "after cancel"
    finally:
        await asyncio.gather(a.close(), b.close())
    with pytest.raises(ClosedError):
        await b.recv(0, ("u", 0), 1)


async def test_redis_blocking_waits_never_starve_the_writes(redis_config: Config) -> None:
    """With 3 connections, one blocking slot: waiting readers queue, writers still run."""
    run = uuid.uuid4().hex[:10]
    config = redis_config.with_backend("redis", max_connections=3)
    chans = [channel("redis", config, i, n=4, run=run) for i in range(4)]
    await asyncio.gather(*(c.open() for c in chans))
    try:
        readers = [asyncio.create_task(c.get(("k", i), 5)) for i, c in enumerate(chans[1:])]
        await asyncio.sleep(0.1)
        for i in range(3):
            await chans[0].put(("k", i), dumps(i))
        assert [loads(p) for p in await asyncio.gather(*readers)] == [0, 1, 2]
    finally:
        await asyncio.gather(*(c.close() for c in chans))


async def test_redis_inline_limit_counts_data_not_the_frame_header(redis_config: Config) -> None:
    """An array of exactly inline_max bytes stays inline; one past the header room is chunked."""
    from fmi_async.channels.redis.layout import HEADER_ROOM

    run = uuid.uuid4().hex[:10]
    config = redis_config.with_backend("redis", inline_max=64 * 1024, chunk_size=256 * 1024)
    a, b = channel("redis", config, 0, run=run), channel("redis", config, 1, run=run)
    await asyncio.gather(a.open(), b.open())
    raw = redis_raw(redis_config)
    try:
        for tag, nbytes, chunked in ((0, 64 * 1024, False), (1, 64 * 1024 + HEADER_ROOM + 1, True)):
            data = np.arange(nbytes, dtype=np.uint8)
            await a.send(1, ("u", tag), dumps(data))
            keys = [k async for k in raw.scan_iter(match=a.prefix + "/data/*")]
            assert bool(keys) is chunked, (nbytes, keys)
            got = loads(await b.recv(0, ("u", tag), 5))
            assert got.dtype == np.uint8 and np.array_equal(got, data)
    finally:
        await raw.aclose()
        await asyncio.gather(a.close(), b.close())
