"""The Redis channel over TLS, against a real redis-server listening with --tls-port.

The certificates are made at test time (tests/tls_certs.py).  The server
asks for client certificates, listens on TLS only, and on two loopback
addresses, so that one of them is not named by its certificate.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fmi_async as fmi
from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.redis import RedisChannel
from fmi_async.config import Config
from fmi_async.errors import ConfigError, FMIError
from tests.helpers import storage_group
from tests.tls_certs import Certs, make_certs

HOST = "127.0.0.1"
UNNAMED = "127.0.0.2"  # the same server, at an address its certificate does not name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tls_ready(port: int, certs: Certs, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with (
                socket.create_connection((HOST, port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Certs]]:
    """redis-server on TLS only (client certificates required); yields (port, certs)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    workdir: Path = tmp_path_factory.mktemp("redis-tls")
    certs = make_certs(workdir)
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        log_path = workdir / f"redis-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    f"{HOST} {UNNAMED}",
                    "--port",
                    "0",
                    "--tls-port",
                    str(port),
                    "--tls-cert-file",
                    str(certs.server_cert),
                    "--tls-key-file",
                    str(certs.server_key),
                    "--tls-ca-cert-file",
                    str(certs.ca),
                    "--tls-auth-clients",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                    "--loglevel",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if _tls_ready(port, certs, proc, timeout=15):
            break
        proc.kill()
        proc.wait(timeout=10)
        text = log_path.read_text(errors="replace")
        if "tls" in text.lower() and ("not supported" in text or "unrecognized" in text.lower()):
            pytest.skip(f"this redis-server was built without TLS: {text.strip()[-200:]}")
    else:
        pytest.fail(f"redis-server with TLS did not start; see the logs in {workdir}")
    try:
        yield port, certs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def redis_config(**redis: Any) -> Config:
    return Config.from_dict(
        {"backends": {"Redis": {"enabled": True, "ttl": 600, **redis}}, "timeout": 20}
    )


def url_options(port: int, certs: Certs, host: str = HOST, **extra: Any) -> dict[str, Any]:
    return {
        "url": f"rediss://{host}:{port}/0",
        "tls_ca": str(certs.ca),
        "tls_cert": str(certs.client_cert),
        "tls_key": str(certs.client_key),
        **extra,
    }


def channel(config: Config) -> RedisChannel:
    ctx = ChannelContext(0, 1, "tls", uuid.uuid4().hex[:12], config, Mailbox(0))
    return RedisChannel(ctx)


async def open_fails(config: Config) -> FMIError:
    chan = channel(config)
    try:
        await asyncio.wait_for(chan.open(), 15)
    except FMIError as exc:
        return exc
    await chan.close()
    raise AssertionError("the channel opened")


async def test_a_job_runs_over_rediss(tls_redis: tuple[int, Certs]) -> None:
    port, certs = tls_redis
    group = storage_group(redis_config(**url_options(port, certs)))
    async with group(3) as comms:
        assert await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms)) == [6] * 3
        big = bytes(range(256)) * 4096  # 1 MiB: chunked, as on plain TCP
        await comms[0].send(big, 2)
        assert await comms[2].recv(0) == big
        assert comms[0].stats()["channels"]["redis"]["messages_sent"] > 0


async def test_host_and_port_with_tls_true(tls_redis: tuple[int, Certs]) -> None:
    port, certs = tls_redis
    options = url_options(port, certs, tls=True)
    del options["url"]
    options.update(host=HOST, port=port)
    chan = channel(redis_config(**options))
    await asyncio.wait_for(chan.open(), 15)
    try:
        await chan.put(("k", 1), fmi.wire.dumps("over tls"))
        assert fmi.wire.loads(await chan.get(("k", 1), 5.0)) == "over tls"
    finally:
        await chan.close()


async def test_the_server_certificate_is_verified(tls_redis: tuple[int, Certs]) -> None:
    port, certs = tls_redis
    error = await open_fails(redis_config(**url_options(port, certs, tls_ca=str(certs.other_ca))))
    assert "certificate" in str(error).lower() and str(port) in str(error), error


async def test_the_host_name_is_checked_unless_told_not_to(tls_redis: tuple[int, Certs]) -> None:
    port, certs = tls_redis
    error = await open_fails(redis_config(**url_options(port, certs, host=UNNAMED)))
    assert "certificate" in str(error).lower() or "hostname" in str(error).lower(), error
    # Still verified against the CA, only the name is not compared.
    chan = channel(redis_config(**url_options(port, certs, host=UNNAMED, tls_check_hostname=False)))
    await asyncio.wait_for(chan.open(), 15)
    await chan.close()


async def test_a_server_asking_for_a_client_certificate_refuses_one_without(
    tls_redis: tuple[int, Certs],
) -> None:
    port, certs = tls_redis
    options = url_options(port, certs)
    del options["tls_cert"], options["tls_key"]
    await open_fails(redis_config(**options))


async def test_plain_tcp_to_the_tls_port_fails_clearly(tls_redis: tuple[int, Certs]) -> None:
    port, _ = tls_redis
    error = await open_fails(
        redis_config(host=HOST, port=port, socket_timeout=2.0, max_timeout=3000)
    )
    assert f"{HOST}:{port}" in str(error), error


def test_tls_options_are_checked_when_the_channel_is_made(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    with pytest.raises(ConfigError, match="plain TCP"):
        channel(redis_config(url="redis://localhost:6379", tls_ca=str(certs.ca)))
    with pytest.raises(ConfigError, match="plain TCP"):
        channel(redis_config(tls_cert=str(certs.client_cert)))
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        channel(redis_config(tls=True, tls_key=str(certs.client_key)))
    with pytest.raises(ConfigError, match="no such file"):
        channel(redis_config(url="rediss://localhost:6379", tls_ca=str(tmp_path / "missing")))
