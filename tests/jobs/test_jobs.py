"""A job is a job (DESIGN.md section 8), through the public API.

Two jobs that open the same communicator name with no run id (the README's
handler pattern) never compute with each other's data: a job that starts
while another holds the name waits for it (or gets JobConflictError), two
that start together get the right answer or an error, and a peer that
disagrees on num_peers is found out on every peer.  The lease protocol itself
is tested in tests/jobs/test_lease.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import fmi_async as fmi
from fmi_async.holepunch.server import RendezvousServer

P = 3
Job = list[fmi.Communicator]


@asynccontextmanager
async def _tcp_config() -> AsyncIterator[dict[str, Any]]:
    server = RendezvousServer(secret=b"jobs-secret")
    await server.start("127.0.0.1", 0)
    host, port = server.address[:2]
    try:
        yield {
            "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
            "security": {"secret": "jobs-secret"},
        }
    finally:
        await server.close()


@asynccontextmanager
async def configs(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    if kind == "tcp":
        async with _tcp_config() as cfg:
            yield cfg
        return
    base: fmi.Config = request.getfixturevalue(f"{kind}_config")
    yield base.to_dict()


KINDS = ["tcp", "redis", "s3"]


@pytest.fixture(autouse=True)
def _no_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FMI_RUN_ID", raising=False)  # the README's pattern: no run id


def _job(cfg: dict[str, Any], name: str, n: int = P, **job: Any) -> Job:
    config = {**cfg, "timeout": 20, "job": job} if job else {**cfg, "timeout": 20}
    return [fmi.Communicator(i, n, config, comm_name=name) for i in range(n)]


async def _run(job: Job, base: int) -> list[Any]:
    """Open, one allreduce of values only this job has, close; results or errors."""

    async def one(c: fmi.Communicator) -> Any:
        async with c:
            return await c.allreduce(base + c.rank)

    return await asyncio.gather(*(one(c) for c in job), return_exceptions=True)


def _expected(base: int, n: int = P) -> int:
    return sum(base + r for r in range(n))


@pytest.mark.parametrize("kind", KINDS)
async def test_two_jobs_started_together_never_mix(
    kind: str, request: pytest.FixtureRequest
) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    async with configs(kind, request) as cfg:
        a, b = _job(cfg, name), _job(cfg, name)
        results = await asyncio.gather(_run(a, 1000), _run(b, 2000))
    for base, outcome in zip((1000, 2000), results, strict=True):
        for r in outcome:
            # The job's own sum, or an error: never a sum with the other job's values.
            if isinstance(r, BaseException):
                assert isinstance(r, fmi.FMIError), r
            else:
                assert r == _expected(base), (base, outcome)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_job_waits_for_the_first(kind: str, request: pytest.FixtureRequest) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    async with configs(kind, request) as cfg:
        first = _job(cfg, name)
        await asyncio.gather(*(c.open() for c in first))
        second = asyncio.ensure_future(_run(_job(cfg, name), 2000))
        await asyncio.sleep(1.0)
        assert not second.done()  # it waits while the first job holds the name
        assert await asyncio.gather(*(c.allreduce(c.rank) for c in first)) == [3] * P
        await asyncio.gather(*(c.close() for c in first))
        assert await asyncio.wait_for(second, 15) == [_expected(2000)] * P


@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_job_is_refused_when_configured(
    kind: str, request: pytest.FixtureRequest
) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    async with configs(kind, request) as cfg:
        first = _job(cfg, name)
        await asyncio.gather(*(c.open() for c in first))
        try:
            start = time.monotonic()
            outcome = await _run(_job(cfg, name, on_conflict="error"), 2000)
            assert all(isinstance(r, fmi.JobConflictError) for r in outcome), outcome
            assert time.monotonic() - start < 5
            # The running job is not disturbed.
            assert await asyncio.gather(*(c.allreduce(c.rank) for c in first)) == [3] * P
        finally:
            await asyncio.gather(*(c.close() for c in first))


@pytest.mark.parametrize("kind", KINDS)
async def test_a_peer_with_another_num_peers_fails_every_peer(
    kind: str, request: pytest.FixtureRequest
) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    async with configs(kind, request) as cfg:
        config = {**cfg, "timeout": 20}
        comms = [fmi.Communicator(i, P, config, comm_name=name) for i in range(P - 1)]
        comms.append(fmi.Communicator(P - 1, P + 1, config, comm_name=name))
        start = time.monotonic()
        results = await asyncio.gather(*(c.open() for c in comms), return_exceptions=True)
        took = time.monotonic() - start
    assert all(isinstance(r, fmi.JobMismatchError) for r in results), results
    assert took < 10, took  # not the 20 s deadline


async def test_fmi_run_style_jobs_with_run_ids_run_side_by_side(
    request: pytest.FixtureRequest,
) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    async with configs("redis", request) as cfg:
        make: Callable[[str], Job] = lambda run: [  # noqa: E731
            fmi.Communicator(i, P, {**cfg, "timeout": 20}, comm_name=name, run_id=run)
            for i in range(P)
        ]
        start = time.monotonic()
        results = await asyncio.gather(_run(make("run-a"), 10), _run(make("run-b"), 20))
        assert results == [[_expected(10)] * P, [_expected(20)] * P]
        assert time.monotonic() - start < 10
