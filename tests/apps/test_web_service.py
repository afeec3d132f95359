"""examples/web_service and fmi_async.web: collectives from HTTP request handlers.

The example runs for real: ``serve.py`` starts its rendezvous server and N
worker processes, and an aiohttp client sends many concurrent requests to
every worker.  Each worker holds known values, so every aggregate answer is
checked exactly; requests of different operations (with different
arguments) run at once on every worker, which is what would mis-pair or
deadlock collectives called straight from the handlers.  Then the server is
stopped (every process exits 0), and in a second run one worker is killed:
the others must answer 503 with the error's text, not hang.

The service itself (:class:`fmi_async.web.CollectiveService`) is also run on
in-process peers: ordering under concurrency, a failing operation, stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

import fmi_async as fmi
from fmi_async.web import CollectiveService, communicator, serve
from tests.helpers import REPO

SERVE = REPO / "examples" / "web_service" / "serve.py"
START_BOUND = 60.0
"""Seconds for the workers to start (import numpy and aiohttp) and open their communicator."""
ANSWER_BOUND = 15.0
"""Seconds any one HTTP request may take (the client's timeout): an answer, or a failure."""
STOP_BOUND = 30.0
"""Seconds for serve.py and its workers to exit after SIGTERM."""
SERVE_ARGS = ("--port", "0", "--heartbeat", "0.5", "--grace", "10")
"""The collectives' deadline stays serve.py's 10 s: it also bounds the workers' opening
together, and on a loaded machine the last worker may start seconds after the first."""

_WORKER_LINE = re.compile(r"\[serve\] worker (\d+): pid (\d+), (http://\S+)")


@dataclass
class Served:
    """A running serve.py: its workers' URLs and pids, and every line it printed."""

    proc: asyncio.subprocess.Process
    workers: int
    lines: list[str] = field(default_factory=list)
    urls: dict[int, str] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if match := _WORKER_LINE.match(line):
                self.urls[int(match[1])] = match[3]
                self.pids[int(match[1])] = int(match[2])
            self._changed.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, times: int, bound: float) -> None:
        """Until ``times`` lines contain ``text``; fails after ``bound`` seconds."""
        try:
            async with asyncio.timeout(bound):
                while self.count(text) < times:
                    self._changed.clear()
                    if self.proc.returncode is not None:
                        break
                    await self._changed.wait()
        except TimeoutError:
            pass
        assert self.count(text) >= times, f"no {times} x {text!r} in:\n{self.output()}"

    async def stopped_anyway(self) -> None:
        """After a failed test: serve.py and every worker gone, whatever it takes."""
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            if self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)  # serve.py stops its workers
            async with asyncio.timeout(STOP_BOUND):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for worker, pid in self.pids.items():  # they run in sessions of their own
            if not self.count(f"[serve] worker {worker} exited"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM serve.py (it stops the workers); its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(STOP_BOUND):
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def served(workers: int, *extra: str) -> AsyncIterator[Served]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVE),
        "--workers",
        str(workers),
        *SERVE_ARGS,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    server = Served(proc, workers)
    pump = asyncio.create_task(server.pump())
    try:
        await server.wait_for("] ready, pid", workers, START_BOUND)
        assert sorted(server.urls) == list(range(workers)), server.output()
        yield server
    finally:
        await server.stopped_anyway()
        with contextlib.suppress(TimeoutError):  # the pipe ends with the last worker
            async with asyncio.timeout(STOP_BOUND):
                await asyncio.shield(pump)
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ANSWER_BOUND))


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def post(http: aiohttp.ClientSession, url: str, value: float) -> tuple[int, Any]:
    async with http.post(url, json={"value": value}) as response:
        return response.status, await response.json(content_type=None)


# ---------------------------------------------------------------------- the real server


async def test_concurrent_requests_on_every_worker_get_exact_answers() -> None:
    workers, per_worker = 4, 25
    values = {w: [w * 1000 + k for k in range(1, per_worker + 1)] for w in range(workers)}
    everything = [v for vs in values.values() for v in vs]
    rng = random.Random(17)
    async with served(workers) as server, client() as http:
        urls = server.urls
        adds = [(w, v) for w, vs in values.items() for v in vs]
        rng.shuffle(adds)
        added = await asyncio.gather(*(post(http, f"{urls[w]}/add", v) for w, v in adds))
        assert all(status == 200 for status, _ in added), added
        assert [body["worker"] for _, body in added] == [w for w, _ in adds]
        # Refused by the handler, before any collective: nothing changes.
        async with http.post(f"{urls[1]}/add", json={"value": "7"}) as response:
            assert response.status == 400
        async with http.get(f"{urls[2]}/above?threshold=nan") as response:
            assert response.status == 400
        for w in range(workers):
            assert await get(http, f"{urls[w]}/local") == (
                200,
                {"worker": w, "count": per_worker, "sum": float(sum(values[w]))},
            )

        # Three operations, one with an argument, called at once on every worker.
        thresholds = [rng.uniform(0, workers * 1000) for _ in range(40)]
        asks: list[tuple[int, str, Any]] = []
        for i, t in enumerate(thresholds):
            asks += [(i % workers, "total", None), (i % workers, f"above?threshold={t!r}", t)]
        asks += [(w, "workers", None) for w in range(workers)]
        rng.shuffle(asks)
        answers = await asyncio.gather(*(get(http, f"{urls[w]}/{path}") for w, path, _ in asks))
        for (w, path, t), (status, body) in zip(asks, answers, strict=True):
            assert status == 200, (path, body)
            assert body["worker"] == w
            if path == "total":
                assert body == {
                    "worker": w,
                    "workers": workers,
                    "count": len(everything),
                    "sum": float(sum(everything)),
                }
            elif path == "workers":
                assert body["workers"] == [
                    {
                        "worker": r,
                        "count": per_worker,
                        "sum": float(sum(values[r])),
                        "pid": server.pids[r],
                    }
                    for r in range(workers)
                ]
            else:
                assert body["count"] == sum(v > t for v in everything), (t, body)

        # Values arrive while totals run: each total is a snapshot (some of the
        # new values, each 0.5) and consistent; the last one has them all.
        base_count, base_sum = len(everything), float(sum(everything))
        mixed = [(w, "add") for w in range(workers) for _ in range(8)]
        mixed += [(w, "total") for w in range(workers) for _ in range(8)]
        rng.shuffle(mixed)
        results = await asyncio.gather(
            *(
                post(http, f"{urls[w]}/add", 0.5)
                if kind == "add"
                else get(http, f"{urls[w]}/total")
                for w, kind in mixed
            )
        )
        for (_, kind), (status, body) in zip(mixed, results, strict=True):
            assert status == 200, body
            if kind == "total":
                extra = body["count"] - base_count
                assert 0 <= extra <= workers * 8
                assert body["sum"] == base_sum + 0.5 * extra
        status, body = await get(http, f"{urls[2]}/total")
        assert (status, body["count"], body["sum"]) == (
            200,
            base_count + workers * 8,
            base_sum + 0.5 * workers * 8,
        )

        code = await server.stop()
    assert code == 0, server.output()
    for w in range(workers):
        assert f"[serve] worker {w} exited with code 0" in server.lines, server.output()
        assert server.count(f"[worker {w}] closed: <CollectiveService worker={w}/4 state=stopped")


@pytest.mark.parametrize("victim", [0, 2], ids=["sequencer-killed", "worker-killed"])
async def test_a_killed_worker_makes_the_others_answer_503(victim: int) -> None:
    workers = 3
    survivors = [w for w in range(workers) if w != victim]
    async with served(workers) as server, client() as http:
        urls = server.urls
        for w in range(workers):
            assert (await post(http, f"{urls[w]}/add", w + 1))[0] == 200
        status, body = await get(http, f"{urls[victim]}/total")
        assert (status, body["count"], body["sum"]) == (200, 3, 6.0)

        os.kill(server.pids[victim], signal.SIGKILL)
        # Every survivor answers -- no hang: each request is bounded by the
        # client's timeout -- with 503 and the cause.
        for _ in range(2):  # the first requests find out, the later ones are told at once
            answers = await asyncio.gather(
                *(
                    get(http, f"{urls[w]}/{path}")
                    for w in survivors
                    for path in ("total", "workers")
                )
            )
            for status, body in answers:
                assert status == 503, body
                assert body["type"] == "BrokenCommunicatorError", body
                assert f"the collective service of {workers} workers is broken" in body["error"]
                assert f"peer {victim}" in body["error"], body  # the cause names it
        for w in survivors:  # what needs no collective still works
            assert await get(http, f"{urls[w]}/local") == (
                200,
                {"worker": w, "count": 1, "sum": float(w + 1)},
            )
        await server.wait_for(f"[serve] worker {victim} exited with code 137 on its own", 1, 5.0)

        code = await server.stop()
    assert code == 137, server.output()  # the first worker that failed: SIGKILL
    for w in survivors:
        assert f"[serve] worker {w} exited with code 0" in server.lines, server.output()
        assert server.count(f"[worker {w}] closed: <CollectiveService worker={w}/3 state=broken")


async def test_workers_sharing_one_port_answer_alike() -> None:
    workers = 3
    async with served(workers, "--shared-port") as server, client() as http:
        assert len(set(server.urls.values())) == 1, server.output()
        url = server.urls[0]
        added = await asyncio.gather(*(post(http, f"{url}/add", v) for v in range(1, 61)))
        assert all(status == 200 for status, _ in added), added
        totals = await asyncio.gather(*(get(http, f"{url}/total") for _ in range(30)))
        for status, body in totals:
            assert (status, body["count"], body["sum"]) == (200, 60, float(sum(range(1, 61))))
        status, body = await get(http, f"{url}/workers")
        assert status == 200
        assert sum(w["count"] for w in body["workers"]) == 60
        assert [w["pid"] for w in body["workers"]] == [server.pids[w] for w in range(workers)]

        os.kill(server.pids[1], signal.SIGKILL)
        await server.wait_for("[serve] worker 1 exited with code 137 on its own", 1, 5.0)
        for status, body in await asyncio.gather(*(get(http, f"{url}/total") for _ in range(6))):
            assert status == 503, body  # whichever survivor accepted it
            assert "peer 1" in body["error"], body
        code = await server.stop()
    assert code == 137, server.output()


# ---------------------------------------------------------------------- the service in-process


async def op_sum(comm: fmi.Communicator, scale: int) -> int:
    total: int = await comm.allreduce((comm.rank + 1) * scale)
    return total


async def op_names(comm: fmi.Communicator, args: None) -> list[str]:
    names: list[str] = await comm.allgather(f"w{comm.rank}")
    return names


async def op_two_steps(comm: fmi.Communicator, root: int) -> Any:
    picked = await comm.bcast(comm.rank * 10 if comm.rank == root else None, root=root)
    return await comm.allreduce(picked + comm.rank)


OPS = {"sum": op_sum, "names": op_names, "two": op_two_steps}


async def test_calls_of_different_operations_on_every_worker_run_in_one_order() -> None:
    n, rng = 4, random.Random(5)
    async with fmi.local_peers(n, timeout=10) as comms:
        services = [CollectiveService(c, OPS, heartbeat=0.1) for c in comms]
        for service in services:
            await service.start()
        calls = [(rng.randrange(n), rng.choice(["sum", "names", "two"]), i) for i in range(300)]

        async def one(w: int, name: str, i: int) -> Any:
            return await services[w].call(name, i % n if name == "two" else i)

        results = await asyncio.gather(*(one(*c) for c in calls))
        for (_, name, i), result in zip(calls, results, strict=True):
            if name == "sum":
                assert result == i * n * (n + 1) // 2
            elif name == "names":
                assert result == [f"w{r}" for r in range(n)]
            else:
                assert result == n * (i % n) * 10 + n * (n - 1) // 2
        await asyncio.gather(*(s.close() for s in services))
        assert [s.state for s in services] == ["stopped"] * n
        assert {s.calls_run for s in services} == {300}
        with pytest.raises(fmi.ClosedError, match=r"shutting down|stopped"):
            await services[1].call("sum", 1)


async def test_an_operation_failing_on_one_worker_breaks_the_service_on_all() -> None:
    async def flaky(comm: fmi.Communicator, args: int) -> int:
        if comm.rank == 2 and args == 1:
            raise RuntimeError("a bug on worker 2")
        total: int = await comm.allreduce(args)
        return total

    async with fmi.local_peers(4, timeout=10) as comms:
        services = [CollectiveService(c, {"flaky": flaky}, heartbeat=0.1) for c in comms]
        for service in services:
            await service.start()
        assert await services[3].call("flaky", 5) == 20
        outcomes = await asyncio.gather(
            *(s.call("flaky", 1) for s in services), return_exceptions=True
        )
        for outcome in outcomes:
            assert isinstance(outcome, fmi.BrokenCommunicatorError), outcome
            assert "RuntimeError: a bug on worker 2" in str(outcome)
        assert [s.state for s in services] == ["broken"] * 4
        with pytest.raises(fmi.BrokenCommunicatorError, match="a bug on worker 2"):
            await services[0].call("flaky", 0)  # at once, without a collective
        await asyncio.gather(*(s.close() for s in services))
        assert [s.state for s in services] == ["broken"] * 4


async def test_bad_calls_and_a_missing_communicator_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fmi.local_peers(1) as (comm,):
        async with CollectiveService(comm, OPS) as service:
            with pytest.raises(fmi.ArgumentError, match="unknown operation 'nope'"):
                await service.call("nope")
            assert await service.call("sum", 3) == 3
    async with fmi.local_peers(2) as comms:  # already open: communicator() closes it
        async with communicator(comms[0]) as opened:
            assert opened is comms[0]
            assert repr(opened).endswith(" open>")
        assert repr(comms[0]).endswith(" closed>")
    for name in ("FMI_PEER_ID", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "FMI_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(fmi.ConfigError, match="no communicator"):
        async with serve(OPS):
            pass
    with pytest.raises(fmi.ConfigError, match="no communicator"):
        async with communicator():
            pass
