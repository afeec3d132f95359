"""What the compat tests share: peers in threads or processes, configs, references."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fmi_async.holepunch.server import RendezvousServer
from tests.helpers import REPO

CLIENT = Path(__file__).resolve().parent / "fmi_client.py"
SECRET = "compat-test-secret"
TIMEOUT = 30.0  # each call's deadline in the peers


def fmi_config_file(tmp: Path, **backends: dict[str, Any]) -> Path:
    """FMI's own config/fmi.json with its backends replaced by ``backends`` (FMI's
    names: Direct, Redis, S3), written to ``tmp``; ``model`` stays FMI's."""
    data = json.loads((REPO / "config" / "fmi.json").read_text())
    data["backends"] = backends
    data["timeout"] = TIMEOUT
    if "Direct" in backends:
        data["security"] = {"secret": SECRET}
    path = tmp / f"fmi-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(data))
    return path


def redis_backend(address: tuple[str, int]) -> dict[str, Any]:
    host, port = address
    return {"enabled": True, "host": host, "port": port, "timeout": 1, "max_timeout": 1000}


@contextlib.asynccontextmanager
async def rendezvous() -> AsyncIterator[RendezvousServer]:
    """A rendezvous server in the test's loop (the peers are other processes)."""
    server = RendezvousServer(secret=SECRET.encode())
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def peer_env(run_id: str) -> dict[str, str]:
    """The environment of a peer process: this one's, without a launcher's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMI_")}
    env["FMI_RUN_ID"] = run_id
    env.setdefault("PYTHONPATH", str(REPO))
    return env


async def run_processes(argvs: list[list[str]], timeout: float) -> list[str]:
    """Run one process per argv (``python ARGV``) and return their stdouts; every process
    must exit 0 within ``timeout`` seconds (all are killed otherwise)."""
    env = peer_env(uuid.uuid4().hex[:12])
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for argv in argvs
    ]
    try:
        async with asyncio.timeout(timeout):
            outputs = await asyncio.gather(*(p.communicate() for p in procs))
    except BaseException:
        for p in procs:
            if p.returncode is None:
                p.kill()
        await asyncio.gather(*(p.wait() for p in procs))
        raise
    failed = [
        f"peer {i} exit {p.returncode}:\n{err.decode()[-3000:]}"
        for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True))
        if p.returncode != 0
    ]
    assert not failed, "\n".join(failed)
    return [out.decode() for out, _ in outputs]


def results_of(stdout: str) -> tuple[int, dict[str, Any]]:
    """The ``{"peer", "results"}`` line a client printed (after any ``[peer i]`` prefix)."""
    for line in stdout.splitlines():
        start = line.find('{"peer"')
        if start >= 0:
            data = json.loads(line[start:])
            return int(data["peer"]), data["results"]
    raise AssertionError(f"no results in:\n{stdout[-2000:]}")


def in_threads(n: int, body: Callable[[int], Any], timeout: float = 120) -> list[Any]:
    """``body(rank)`` for every rank, each in its own thread (no event loop there);
    the results in rank order, or the first rank's exception re-raised."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(body, rank) for rank in range(n)]
        return [f.result(timeout=timeout) for f in futures]


def outcomes(n: int, body: Callable[[int], Any], timeout: float = 120) -> list[Any]:
    """Like :func:`in_threads`, but each rank's result *or* exception."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(body, rank) for rank in range(n)]
        out: list[Any] = []
        for f in futures:
            exc = f.exception(timeout=timeout)
            out.append(exc if exc is not None else f.result())
        return out


# ---------------------------------------------------------------- references


def bracketings(f: Callable[[Any, Any], Any], xs: list[Any]) -> list[Any]:
    """Every value ``f`` can give over ``xs`` combined in any order and grouping: what a
    reduction declared commutative and associative may return for an ``f`` that is not."""

    def trees(seq: tuple[Any, ...]) -> Iterator[Any]:
        if len(seq) == 1:
            yield seq[0]
            return
        for k in range(1, len(seq)):
            for a in trees(seq[:k]):
                for b in trees(seq[k:]):
                    yield f(a, b)

    return [v for perm in set(itertools.permutations(xs)) for v in trees(perm)]


def one_of(value: Any, choices: list[Any]) -> bool:
    return any(math.isclose(value, c, rel_tol=1e-12) for c in choices)


@contextlib.contextmanager
def threaded_rendezvous() -> Iterator[tuple[str, int]]:
    """A rendezvous server on its own loop thread, for peers in threads of this process;
    yields its address."""
    from fmi_async.compat.loop import LoopThread

    loop = LoopThread("test-rendezvous", use_uvloop=False)
    server = RendezvousServer(secret=SECRET.encode())
    try:
        loop.call(server.start("127.0.0.1", 0), "starting the rendezvous server", 30)
        yield server.address
    finally:
        with contextlib.suppress(Exception):
            loop.call(server.close(), "closing the rendezvous server", 30)
        loop.stop()
