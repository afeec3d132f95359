"""Servers the benchmarks start for themselves: redis-server and a moto server.

Each runs as its own process on a free loopback port (a moto server on a
thread of the benchmark would share the interpreter lock with the peers it
serves, and bill its work to whatever plan is being timed), with no
persistence and dummy AWS credentials, so nothing can reach a real account.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], probe: bytes, answer: bytes) -> bool:
    """Send ``probe`` until the reply starts with ``answer``; give up after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with socket.create_connection((LOOPBACK, port), timeout=2) as sock:
                sock.sendall(probe)
                if sock.recv(64).startswith(answer):
                    return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def server_process(
    name: str, argv: Callable[[int], list[str]], probe: bytes, answer: bytes, workdir: Path
) -> Iterator[int]:
    """Start ``argv(port)`` on a free port (retrying if the port was taken); yield the port."""
    for _attempt in range(3):
        port = free_port()
        with open(workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv(port), stdout=log, stderr=subprocess.STDOUT)
        if _wait_ready(port, proc, probe, answer):
            break
        _stop(proc)
    else:
        sys.exit(f"{name} did not start; see {workdir / (name + '.log')}")
    try:
        yield port
    finally:
        _stop(proc)


def redis_argv(workdir: Path) -> Callable[[int], list[str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        sys.exit("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    options = {"bind": LOOPBACK, "save": "", "appendonly": "no", "dir": str(workdir)}
    flags = [arg for key, value in options.items() for arg in (f"--{key}", value)]
    return lambda port: [binary, "--port", str(port), *flags]


def moto_argv(port: int) -> list[str]:
    # Its own process: a moto server on a thread of this one would share the
    # interpreter lock with the peers it serves.
    return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]


def dummy_aws_environment(workdir: Path) -> None:
    """Dummy credentials and no shared AWS files: nothing can reach a real account."""
    nowhere = str(workdir / "none")
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE=nowhere,
        AWS_SHARED_CREDENTIALS_FILE=nowhere,
        AWS_EC2_METADATA_DISABLED="true",
    )
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)


@contextlib.contextmanager
def redis_and_moto(workdir: Path) -> Iterator[tuple[tuple[str, int], str]]:
    """A private redis-server and moto server: ``((host, port), moto_url)``."""
    dummy_aws_environment(workdir)
    redis = server_process("redis-server", redis_argv(workdir), b"PING\r\n", b"+PONG", workdir)
    moto = server_process("moto", moto_argv, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/", workdir)
    with redis as redis_port, moto as moto_port:
        yield (LOOPBACK, redis_port), f"http://{LOOPBACK}:{moto_port}"
