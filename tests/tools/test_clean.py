"""``fmi clean`` against the real redis-server and moto server.

Peers write messages, shared objects and chunks, then "die": their clients
go away without ``close``.  ``fmi clean`` must remove exactly the runs it is
asked for (``RUN`` and ``RUN.<epoch>``), on every configured backend, and
print what it removed; everything else stays.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aioboto3
import numpy as np
import pytest
import redis.asyncio as aioredis

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.registry import channel_class
from fmi_async.channels.storage import StorageChannel, storage_prefix
from fmi_async.config import Config
from fmi_async.tools.cli import main
from fmi_async.wire import dumps

BACKENDS = ("redis", "s3", "dynamodb")
JSON_NAMES = {"redis": "Redis", "s3": "S3", "dynamodb": "DynamoDB"}


@pytest.fixture
def configs(redis_config: Config, s3_config: Config, dynamodb_config: Config) -> dict[str, Config]:
    return {"redis": redis_config, "s3": s3_config, "dynamodb": dynamodb_config}


def config_file(tmp_path: Path, configs: dict[str, Config], **override: Any) -> Path:
    backends = {JSON_NAMES[n]: {**c.options(n), **override.get(n, {})} for n, c in configs.items()}
    path = tmp_path / "fmi.json"
    path.write_text(json.dumps({"backends": backends, "timeout": 10}))
    return path


async def crash(configs: dict[str, Config], comm: str, run: str) -> None:
    """A peer of ``run`` stores a shared object and two messages (one chunked on Redis)
    on every backend, then loses its clients without close()."""
    for name, config in configs.items():
        if name == "redis":
            config = config.with_backend(name, inline_max=1024)
        chan: StorageChannel = channel_class(name)(
            ChannelContext(0, 2, comm, run, config, Mailbox(0))
        )  # type: ignore[assignment]
        await chan.open()
        await chan.put(("c", 1, "bcast"), dumps("shared"))
        await chan.send(1, ("u", 0), dumps(np.arange(2000)))
        await chan.send(1, ("u", 1), dumps("never read"))
        if name == "s3":  # a multipart upload the crash left incomplete
            await chan._client.create_multipart_upload(  # type: ignore[attr-defined]
                Bucket=chan.bucket,  # type: ignore[attr-defined]
                Key=chan.message_name(0, 1, ("big",), 0),
            )
        await chan._shutdown()


def crash_all(configs: dict[str, Config], runs: list[tuple[str, str]]) -> None:
    async def all_of_them() -> None:
        await asyncio.gather(*(crash(configs, comm, run) for comm, run in runs))

    asyncio.run(all_of_them())


def left_in(configs: dict[str, Config], runs: list[tuple[str, str]]) -> list[dict[str, int]]:
    """For each ``(comm, run)``: how many names each backend still holds under its prefix,
    seen with the backends' own clients (one per backend)."""
    prefixes = [storage_prefix(comm, run) + "/" for comm, run in runs]

    async def redis_counts() -> list[int]:
        opts = configs["redis"].options("redis")
        client = aioredis.Redis(host=opts["host"], port=opts["port"])
        try:
            return [len([k async for k in client.scan_iter(match=p + "*")]) for p in prefixes]
        finally:
            await client.aclose()

    async def s3_counts() -> list[int]:
        opts = configs["s3"].options("s3")
        async with aioboto3.Session().client("s3", endpoint_url=opts["endpoint_url"]) as s3:
            pages = [
                await s3.list_objects_v2(Bucket=opts["bucket_name"], Prefix=p) for p in prefixes
            ]
        return [len(page.get("Contents", ())) for page in pages]

    async def dynamodb_counts() -> list[int]:
        opts = configs["dynamodb"].options("dynamodb")
        names: list[str] = []
        async with aioboto3.Session().client("dynamodb", endpoint_url=opts["endpoint_url"]) as db:
            async for page in db.get_paginator("scan").paginate(
                TableName=opts["table_name"], ProjectionExpression="pk"
            ):
                names.extend(item["pk"]["S"] for item in page.get("Items", ()))
        return [sum(n.startswith(p) for n in names) for p in prefixes]

    async def all_of_them() -> list[dict[str, int]]:
        counts = await asyncio.gather(redis_counts(), s3_counts(), dynamodb_counts())
        return [dict(zip(BACKENDS, row, strict=True)) for row in zip(*counts, strict=True)]

    return asyncio.run(all_of_them())


def leftovers(configs: dict[str, Config], comm: str, run: str) -> dict[str, int]:
    return left_in(configs, [(comm, run)])[0]


def uploads(config: Config, comm: str) -> list[str]:
    async def listing() -> list[str]:
        opts = config.options("s3")
        async with aioboto3.Session().client("s3", endpoint_url=opts["endpoint_url"]) as s3:
            reply = await s3.list_multipart_uploads(
                Bucket=opts["bucket_name"], Prefix=storage_prefix(comm, "-")[:-1]
            )
        return [u["Key"] for u in reply.get("Uploads", ())]

    return asyncio.run(listing())


def test_clean_removes_a_run_and_its_epochs_and_nothing_else(
    configs: dict[str, Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comm, other = f"clean-{uuid.uuid4().hex[:6]}", f"keep-{uuid.uuid4().hex[:6]}"
    runs = ["R", "R.7f3a"]
    kept = [(comm, "RX"), (other, "R")]
    crash_all(configs, [(comm, run) for run in runs] + kept)
    for left in left_in(configs, [(comm, run) for run in runs] + kept):
        assert all(left.values()), left  # something of each run, on every backend
    path = config_file(tmp_path, configs)

    # A dry run lists, deletes nothing.
    assert main(["clean", "--config", str(path), "--comm", comm, "--run", "R", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "would remove" in dry
    assert all(left["s3"] for left in left_in(configs, [(comm, r) for r in runs]))

    assert main(["clean", "--config", str(path), "--comm", comm, "--run", "R"]) == 0
    out = capsys.readouterr().out
    assert left_in(configs, [(comm, r) for r in runs]) == [dict.fromkeys(BACKENDS, 0)] * 2
    assert all(f"  run {run}: " in out for run in runs)
    for left in left_in(configs, kept):
        assert all(left.values()), left
    assert "run RX" not in out and other not in out
    for name in BACKENDS:  # every backend reports, and names what it removed
        location = channel_class(name)(
            ChannelContext(0, 1, comm, "x", configs[name], Mailbox(0))
        ).location()
        assert f"{location}: removed " in out
    assert f"{storage_prefix(comm, 'R.7f3a')}/obj/" in out
    assert "(incomplete upload)" in out
    assert [k.split("/")[2] for k in uploads(configs["s3"], comm)] == ["RX"]

    # Without --run: every run of the communicator, still nothing of another one.
    assert main(["clean", "--config", str(path), "--comm", comm, "--summary"]) == 0
    summary = capsys.readouterr().out
    assert "run RX: " in summary and "    fmi/" not in summary
    assert leftovers(configs, comm, "RX") == dict.fromkeys(BACKENDS, 0)
    assert all(leftovers(configs, other, "R").values())
    assert main(["clean", "--config", str(path), "--comm", other]) == 0
    assert leftovers(configs, other, "R") == dict.fromkeys(BACKENDS, 0)
    assert uploads(configs["s3"], comm) == [] and uploads(configs["s3"], other) == []


def test_clean_reports_an_unreachable_backend_and_cleans_the_others(
    configs: dict[str, Config], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comm = f"clean-{uuid.uuid4().hex[:6]}"
    asyncio.run(crash(configs, comm, "R"))
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    path = config_file(tmp_path, configs, redis={"port": closed, "socket_timeout": 2})
    assert main(["clean", "--config", str(path), "--comm", comm, "--run", "R"]) == 1
    captured = capsys.readouterr()
    assert "not cleaned" in captured.err and "is redis-server running" in captured.err
    left = leftovers(configs, comm, "R")
    assert left["s3"] == left["dynamodb"] == 0 and left["redis"] > 0
    assert main(["clean", "--config", str(config_file(tmp_path, configs)), "--comm", comm]) == 0
    assert leftovers(configs, comm, "R") == dict.fromkeys(BACKENDS, 0)


def test_the_fmi_command_runs_clean(configs: dict[str, Config], tmp_path: Path) -> None:
    comm = f"clean-{uuid.uuid4().hex[:6]}"
    asyncio.run(crash(configs, comm, "job.3"))
    path = config_file(tmp_path, configs)
    done = subprocess.run(
        [sys.executable, "-m", "fmi_async", "clean", "--config", str(path), "--comm", comm,
         "--run", "job", "--summary"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "run job.3: " in done.stdout and done.stdout.count(": removed ") == 3
    assert leftovers(configs, comm, "job.3") == dict.fromkeys(BACKENDS, 0)
