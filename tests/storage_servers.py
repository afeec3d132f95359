"""Real storage servers for the tests, as a pytest plugin (``pytest_plugins``).

* ``redis_server``: a ``redis-server`` process on a free loopback port, no
  persistence; yields ``(host, port)``.
* ``moto_server``: moto's server (the real AWS HTTP protocol) in its own process on a
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

import os
import shutil
import socket
import subprocess
import sys
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
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# moto's server in a process of its own: on a thread of the test process it
# would share the interpreter lock with the peers it serves (and the second
# core would sit idle).  The server binds a free port itself and prints it.
_MOTO_MAIN = """
import logging, os, sys, threading, time
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no record per request
server = make_server(sys.argv[1], 0, DomainDispatcherApplication(create_backend_app), True)
print(server.server_address[1], flush=True)
def orphaned(parent=os.getppid()):  # the test process died without stopping us
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=orphaned, daemon=True).start()
server.serve_forever()
"""


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's server, in its own process, on a free loopback port; yields its endpoint URL.

    Dummy credentials and region are put in the environment for the whole
    session, and the shared AWS files and instance metadata are switched off,
    so no test can reach a real account.
    """
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
        workdir = nowhere.parent
        with open(workdir / "moto.out", "wb") as out, open(workdir / "moto.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _MOTO_MAIN, LOOPBACK], stdout=out, stderr=log
            )
        try:
            port = _moto_port(workdir / "moto.out", proc, timeout=60)
            if port is None:
                pytest.fail(f"the moto server did not start; see {workdir / 'moto.log'}")
            yield f"http://{LOOPBACK}:{port}"
        finally:
            _stop(proc)


def _moto_port(out: Path, proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The port the moto server printed once it listens; None if it died or took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        line = out.read_text()
        if line.endswith("\n") and line.strip().isdigit():  # the whole line is written
            return int(line)
        time.sleep(0.05)
    return None


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
