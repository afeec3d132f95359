"""Real storage servers for the tests, as a pytest plugin (``pytest_plugins``).

* ``redis_server``: a ``redis-server`` process on a free loopback port, no
  persistence; yields ``(host, port)``.
* ``moto_server``: moto's threaded server (the real AWS HTTP protocol) on a
  free loopback port, with dummy credentials and region in the environment;
  yields its endpoint URL.
* ``redis_config``, ``s3_config``, ``dynamodb_config``: a
  :class:`fmi_async.Config` for each backend, pointing at those servers, with
  a bucket and a table unique to this test session.
* ``mediated_backend``: parametrized over the three, yields ``(channel name,
  Config)`` so one test body runs on every storage channel.

Everything is session-scoped and synchronous, so it works with any event
loop the tests run on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmi_async.config import Config

__all__ = [
    "dynamodb_config",
    "mediated_backend",
    "moto_server",
    "redis_config",
    "redis_server",
    "s3_config",
]

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
MEDIATED_BACKENDS = ("redis", "s3", "dynamodb")


def _redis_binary() -> str:
    """Path of redis-server; installs it with apt-get when running as root, else skips."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for args in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "redis-server"]):
            subprocess.run(args, env=env, check=False, capture_output=True, timeout=600)
        found = shutil.which("redis-server")
        if found:
            return found
    pytest.skip(
        "redis-server is not installed: install it (Debian/Ubuntu: apt-get install "
        "redis-server; macOS: brew install redis) to run the Redis channel tests"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_ready(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """PING until PONG, the process dies, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A private redis-server on loopback (no RDB, no AOF); yields ``(host, port)``."""
    binary = _redis_binary()
    workdir: Path = tmp_path_factory.mktemp("redis")
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        log = open(workdir / f"redis-{port}.log", "wb")  # closed below
        options = {
            "bind": LOOPBACK,
            "port": str(port),
            "save": "",  # no RDB snapshots
            "appendonly": "no",
            "dir": str(workdir),
            "daemonize": "no",
            "loglevel": "warning",
        }
        proc = subprocess.Popen(
            [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if _redis_ready(port, proc, timeout=15):
            break
        proc.kill()
        proc.wait(timeout=10)
        log.close()
    else:
        pytest.fail(f"redis-server did not start; see the logs in {workdir}")
    try:
        yield LOOPBACK, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server on a free loopback port; yields its endpoint URL.

    Dummy credentials and region are put in the environment for the whole
    session, and the shared AWS files and instance metadata are switched off,
    so no test can reach a real account.
    """
    from moto.server import ThreadedMotoServer

    # One INFO record per request costs the single-threaded server time.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_CONFIG_FILE", str(nowhere))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


SESSION = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def redis_config(redis_server: tuple[str, int]) -> Config:
    host, port = redis_server
    return Config.from_dict(
        {
            "backends": {"Redis": {"enabled": True, "host": host, "port": port, "ttl": 600}},
            "timeout": 30,
        }
    )


@pytest.fixture(scope="session")
def s3_config(moto_server: str) -> Config:
    return Config.from_dict(
        {
            "backends": {
                "S3": {
                    "enabled": True,
                    "bucket_name": f"fmi-test-{SESSION}",
                    "s3_region": REGION,
                    "endpoint_url": moto_server,
                    "create_bucket": True,
                    "timeout": 5,  # FMI's polling interval, ms
                    "max_timeout": 30000,  # FMI's maximum wait, ms
                    "backoff_max": 0.03,
                    "ttl": 600,
                }
            },
            "timeout": 30,
        }
    )


@pytest.fixture(scope="session")
def dynamodb_config(moto_server: str) -> Config:
    return Config.from_dict(
        {
            "backends": {
                "DynamoDB": {
                    "enabled": True,
                    "table_name": f"fmi-test-{SESSION}",
                    "region": REGION,
                    "endpoint_url": moto_server,
                    "create_table": True,
                    "backoff_initial": 0.005,
                    "backoff_max": 0.03,
                    "ttl": 600,
                }
            },
            "timeout": 30,
        }
    )


@pytest.fixture(scope="session", params=MEDIATED_BACKENDS)
def mediated_backend(request: pytest.FixtureRequest) -> tuple[str, Config]:
    """``(channel name, Config)`` for each storage channel in turn."""
    name: str = request.param
    config: Config = request.getfixturevalue(f"{name}_config")
    return name, config
