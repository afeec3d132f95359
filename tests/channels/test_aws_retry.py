"""AWS channels under throttling, their retry modes, and HTTPS endpoints.

Throttling is injected at the HTTP level: :class:`tests.throttleproxy.ThrottleProxy`
stands in front of the session's moto server and answers a share of the
DynamoDB requests with HTTP 400 ``ProvisionedThroughputExceededException``,
as DynamoDB does.  HTTPS runs against a second moto server that serves TLS
with a certificate made at test time (tests/tls_certs.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.channels.aws import aws_client
from fmi_async.channels.base import ChannelContext
from fmi_async.channels.dynamodb import DynamoDBChannel
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.s3 import S3Channel
from fmi_async.config import Config
from fmi_async.errors import BackendUnavailable, BrokenChannelError, ConfigError, FMIError
from fmi_async.wire import dumps, loads
from tests.helpers import storage_group
from tests.storage_servers import REGION
from tests.throttleproxy import ThrottleProxy
from tests.tls_certs import Certs, make_certs

P = 3


def dynamodb_config(endpoint: str, table: str, timeout: float = 30, **extra: Any) -> Config:
    options = {
        "enabled": True,
        "table_name": table,
        "region": REGION,
        "endpoint_url": endpoint,
        "create_table": True,
        "backoff_initial": 0.005,
        "backoff_max": 0.03,
        "ttl": 600,
        **extra,
    }
    return Config.from_dict({"backends": {"DynamoDB": options}, "timeout": timeout})


def channel(config: Config) -> DynamoDBChannel:
    ctx = ChannelContext(0, 1, "W", uuid.uuid4().hex[:12], config, Mailbox(0))
    return DynamoDBChannel(ctx)


def upstream(moto_server: str) -> tuple[str, int]:
    host, port = moto_server.removeprefix("http://").split(":")
    return host, int(port)


# ---------------------------------------------------------------- throttling


async def test_a_job_under_throttling_is_right_and_retries(moto_server: str) -> None:
    """A third of the DynamoDB requests throttled, from the table checks on: the job
    runs to the right results; the channels and the job lease asked again."""
    table = f"throttled-{uuid.uuid4().hex[:8]}"
    async with ThrottleProxy(*upstream(moto_server), 0.3, seed=3) as proxy:
        group = storage_group(dynamodb_config(proxy.url, table))
        async with group(P) as comms:
            for i in range(1):
                totals = await asyncio.gather(*(c.allreduce(np.full(4, c.rank + i)) for c in comms))
                assert all(np.array_equal(t, np.full(4, 3 + 3 * i)) for t in totals)
                data = await asyncio.gather(
                    *(c.bcast(b"x" * 500 if c.rank == 0 else None, root=0) for c in comms)
                )
                assert data == [b"x" * 500] * P
            retried = sum(sum(c._channels["dynamodb"].retried.values()) for c in comms)
        assert proxy.throttled > 10 and retried > 0, (proxy, retried)
        assert {"GetItem", "PutItem"} <= set(proxy.by_operation), proxy.by_operation


async def test_throttled_table_checks_while_opening_are_asked_again(moto_server: str) -> None:
    """The table checks of open are throttled (the first four): the channel opens."""
    table = f"throttled-{uuid.uuid4().hex[:8]}"
    checks = frozenset({"DescribeTable", "DescribeTimeToLive", "CreateTable"})
    async with ThrottleProxy(*upstream(moto_server), 1.0, operations=checks, limit=4) as proxy:
        chan = channel(dynamodb_config(proxy.url, table))
        await asyncio.wait_for(chan.open(), 30)
        try:
            await chan.put(("k", 0), dumps("opened"))
            assert loads(await chan.get(("k", 0), 5.0)) == "opened"
        finally:
            await chan.close()
        assert proxy.throttled == 4 and sum(chan.retried.values()) >= 4, (proxy, chan.retried)


async def test_throttled_until_the_deadline_names_throttling(moto_server: str) -> None:
    table = f"throttled-{uuid.uuid4().hex[:8]}"
    async with ThrottleProxy(
        *upstream(moto_server), 1.0, operations=frozenset({"PutItem"})
    ) as proxy:
        chan = channel(dynamodb_config(proxy.url, table, timeout=1.5))
        await asyncio.wait_for(chan.open(), 20)
        try:
            with pytest.raises(BackendUnavailable) as info:  # the deadline ended it
                await chan.put(("k", 0), dumps("never stored"))
            text = str(info.value)
            assert "ProvisionedThroughputExceededException" in text and "PutItem" in text, text
            assert proxy.throttled >= 3  # asked again, with backoff, until the deadline
        finally:
            await chan.close()


async def test_throttled_bucket_checks_while_opening_are_asked_again(moto_server: str) -> None:
    """S3 answers the first three requests of open with 503 SlowDown: the channel opens,
    creates the bucket and its lifecycle rule."""
    bucket = f"throttled-{uuid.uuid4().hex[:8]}"
    options = {
        "enabled": True,
        "bucket_name": bucket,
        "s3_region": REGION,
        "create_bucket": True,
        "ttl": 600,
    }
    async with ThrottleProxy(*upstream(moto_server), 1.0, s3=True, limit=3) as proxy:
        options["endpoint_url"] = proxy.url
        config = Config.from_dict({"backends": {"S3": options}, "timeout": 30})
        chan = S3Channel(ChannelContext(0, 1, "W", uuid.uuid4().hex[:12], config, Mailbox(0)))
        await asyncio.wait_for(chan.open(), 30)
        try:
            await chan.put(("k", 0), dumps("opened"))
            assert loads(await chan.get(("k", 0), 5.0)) == "opened"
            rules = await chan._client.get_bucket_lifecycle_configuration(Bucket=bucket)
            assert rules["Rules"][0]["ID"] == "fmi-async-expire"
        finally:
            await chan.close()
        assert proxy.throttled == 3 and sum(chan.retried.values()) >= 3, (proxy, chan.retried)


@pytest.mark.parametrize("mode", ["fmi", "standard", "adaptive"])
async def test_retry_modes_configure_the_client(mode: str) -> None:
    config = dynamodb_config("http://127.0.0.1:9", "t", retry_mode=mode)
    options = channel(config).options
    async with aws_client("dynamodb", options, "DynamoDB", retries=0) as client:
        retries = client.meta.config.retries
    if mode == "fmi":  # the channel retries: botocore sends once
        assert retries["mode"] == "standard" and retries["total_max_attempts"] == 1
    else:
        assert retries["mode"] == mode and retries["total_max_attempts"] == 3
    with pytest.raises(ConfigError, match="retry_mode"):
        channel(dynamodb_config("http://127.0.0.1:9", "t", retry_mode="eager"))


@pytest.mark.slow  # a job of its own on moto, some seconds: the modes' choice is benchmarked
async def test_a_job_in_adaptive_mode_under_throttling(moto_server: str) -> None:
    table = f"throttled-{uuid.uuid4().hex[:8]}"
    async with ThrottleProxy(*upstream(moto_server), 0.2, seed=5) as proxy:
        group = storage_group(dynamodb_config(proxy.url, table, retry_mode="adaptive"))
        async with group(P) as comms:
            assert await asyncio.gather(*(c.allreduce(c.rank) for c in comms)) == [3] * P
        assert proxy.throttled > 0


# ---------------------------------------------------------------- HTTPS

_MOTO_TLS = """
import logging, os, sys, threading, time
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
logging.getLogger("werkzeug").setLevel(logging.WARNING)
app = DomainDispatcherApplication(create_backend_app)
server = make_server(sys.argv[1], 0, app, True, ssl_context=(sys.argv[2], sys.argv[3]))
print(server.server_address[1], flush=True)
def orphaned(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=orphaned, daemon=True).start()
server.serve_forever()
"""


@pytest.fixture(scope="module")
def https_moto(
    moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Certs]]:
    """moto serving HTTPS with a certificate of a CA made here: ``(https URL, certs)``.

    Depends on ``moto_server`` for the dummy AWS environment it sets up."""
    workdir: Path = tmp_path_factory.mktemp("moto-tls")
    certs = make_certs(workdir)
    with open(workdir / "moto.out", "wb") as out, open(workdir / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _MOTO_TLS,
                "127.0.0.1",
                str(certs.server_cert),
                str(certs.server_key),
            ],
            stdout=out,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while time.monotonic() < deadline and proc.poll() is None and port is None:
            line = (workdir / "moto.out").read_text()
            if line.endswith("\n") and line.strip().isdigit():
                port = int(line)
            else:
                time.sleep(0.05)
        if port is None:
            pytest.fail(f"moto with TLS did not start; see {workdir / 'moto.log'}")
        yield f"https://127.0.0.1:{port}", certs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_dynamodb_over_https_verified_with_the_ca(https_moto: tuple[str, Certs]) -> None:
    url, certs = https_moto
    table = f"tls-{uuid.uuid4().hex[:8]}"
    chan = channel(dynamodb_config(url, table, verify=str(certs.ca)))
    await asyncio.wait_for(chan.open(), 30)
    try:
        await chan.put(("k", 1), dumps({"over": "https"}))
        assert loads(await chan.get(("k", 1), 5.0)) == {"over": "https"}
    finally:
        await chan.close()


async def test_https_with_an_unknown_ca_fails_and_verify_false_skips_the_check(
    https_moto: tuple[str, Certs],
) -> None:
    url, certs = https_moto
    table = f"tls-{uuid.uuid4().hex[:8]}"
    for verify in (str(certs.other_ca), None):  # a CA that signed nothing here, the system's
        chan = channel(dynamodb_config(url, table, timeout=5, verify=verify))
        with pytest.raises(FMIError) as info:
            await asyncio.wait_for(chan.open(), 30)
        assert isinstance(info.value, BrokenChannelError | ConfigError), info.value
        assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()
    chan = channel(dynamodb_config(url, table, verify=False))
    await asyncio.wait_for(chan.open(), 30)
    await chan.close()


async def test_a_job_over_https(https_moto: tuple[str, Certs]) -> None:
    url, certs = https_moto
    group = storage_group(dynamodb_config(url, f"tls-{uuid.uuid4().hex[:8]}", verify=str(certs.ca)))
    async with group(P) as comms:
        assert await asyncio.gather(*(c.allgather(c.rank) for c in comms)) == [[0, 1, 2]] * P
        assert isinstance(comms[0], fmi.Communicator)


async def test_s3_over_https_verified_with_the_ca(https_moto: tuple[str, Certs]) -> None:
    url, certs = https_moto
    options = {
        "enabled": True,
        "bucket_name": f"tls-{uuid.uuid4().hex[:8]}",
        "s3_region": REGION,
        "endpoint_url": url,
        "create_bucket": True,
        "verify": str(certs.ca),
        "ttl": 600,
    }
    config = Config.from_dict({"backends": {"S3": options}, "timeout": 30})
    chan = S3Channel(ChannelContext(0, 1, "W", uuid.uuid4().hex[:12], config, Mailbox(0)))
    await asyncio.wait_for(chan.open(), 30)
    try:
        big = bytes(range(256)) * 1024
        await chan.put(("k", 2), dumps(big))
        assert loads(await chan.get(("k", 2), 5.0)) == big
    finally:
        await chan.close()
