"""One worker of a statistics service whose endpoints aggregate over every worker.

Started by ``serve.py`` (one process per worker, each a peer of one
communicator); not meant to be run alone.  Each worker keeps the values POSTed
to it; the aggregate endpoints run collectives over all workers through
:class:`fmi_async.web.CollectiveService`, which runs every worker's part of
every request's collectives in one order (see docs/web-services.md).

Endpoints (JSON):

* ``POST /add`` ``{"value": 2.5}``: add a value on this worker -> this worker's count and sum
* ``GET /local``: this worker's count and sum (no collective)
* ``GET /total``: count and sum over every worker (one allreduce)
* ``GET /above?threshold=T``: how many values, over every worker, exceed T (one allreduce)
* ``GET /workers``: every worker's count, sum and pid (one allgather)

An aggregate answers 503 with the error's text when the workers cannot run
collectives any more (a worker died, or they are shutting down).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

import fmi_async as fmi
from fmi_async.web import CollectiveService, aiohttp_cleanup_ctx


def say(line: str) -> None:
    """One line to stdout in one write: the workers share serve.py's stdout."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class WorkerStats:
    """What one worker holds: the values POSTed to it."""

    values: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def total(self) -> float:
        return math.fsum(self.values)


STATS = WorkerStats()  # one per process: each worker is a process of its own
SERVICE = web.AppKey("service", CollectiveService)


# ------------------------------------------------------------------ operations
# Run by every worker, in the order worker 0 broadcast; each returns this
# worker's result, which the worker that got the request answers with.


async def op_total(comm: fmi.Communicator, args: None) -> dict[str, Any]:
    summed = await comm.allreduce(np.array([STATS.count, STATS.total], dtype=np.float64))
    return {"count": int(summed[0]), "sum": float(summed[1])}


async def op_above(comm: fmi.Communicator, threshold: float) -> int:
    mine = sum(1 for v in STATS.values if v > threshold)
    count: int = await comm.allreduce(mine)
    return count


async def op_workers(comm: fmi.Communicator, args: None) -> list[Any]:
    mine = {"worker": comm.rank, "count": STATS.count, "sum": STATS.total, "pid": os.getpid()}
    everyone: list[Any] = await comm.allgather(mine)
    return everyone


OPERATIONS = {"total": op_total, "above": op_above, "workers": op_workers}


# ------------------------------------------------------------------ handlers


async def aggregate(request: web.Request, name: str, args: Any = None) -> Any:
    """Run operation ``name`` on every worker; a 503 response when they cannot."""
    service = request.app[SERVICE]
    try:
        return await service.call(name, args)
    except fmi.FMIError as exc:
        body = {"error": str(exc), "type": type(exc).__name__, "worker": _rank(request)}
        raise web.HTTPServiceUnavailable(
            text=json.dumps(body),
            content_type="application/json",
        ) from exc


async def add(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        value = body["value"]
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(text='expected a JSON body {"value": <number>}') from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"value must be a finite number, got {value!r}")
    STATS.values.append(float(value))
    return web.json_response({"worker": _rank(request), "count": STATS.count, "sum": STATS.total})


async def local(request: web.Request) -> web.Response:
    return web.json_response({"worker": _rank(request), "count": STATS.count, "sum": STATS.total})


async def total(request: web.Request) -> web.Response:
    result = await aggregate(request, "total")
    size = request.app[SERVICE].comm.size
    return web.json_response({"worker": _rank(request), "workers": size, **result})


async def above(request: web.Request) -> web.Response:
    try:
        threshold = float(request.query["threshold"])
    except (KeyError, ValueError):
        raise web.HTTPBadRequest(text="expected ?threshold=<number>") from None
    # Checked here, on the worker that got the request: an operation must not
    # fail on one worker alone (the others would be left mid-collective).
    if not math.isfinite(threshold):
        raise web.HTTPBadRequest(text="threshold must be finite")
    count = await aggregate(request, "above", threshold)
    return web.json_response({"worker": _rank(request), "threshold": threshold, "count": count})


async def workers(request: web.Request) -> web.Response:
    everyone = await aggregate(request, "workers")
    return web.json_response({"worker": _rank(request), "workers": everyone})


def make_app(heartbeat: float = 1.0) -> web.Application:
    """The application; its lifespan opens the communicator the environment describes."""
    app = web.Application()
    app.cleanup_ctx.append(aiohttp_cleanup_ctx(SERVICE, OPERATIONS, heartbeat=heartbeat))
    app.on_startup.append(_announce)  # after the cleanup context's start: the service runs
    app.on_cleanup.append(_farewell)  # after the cleanup context's end: the service stopped
    app.router.add_post("/add", add)
    app.router.add_get("/local", local)
    app.router.add_get("/total", total)
    app.router.add_get("/above", above)
    app.router.add_get("/workers", workers)
    return app


async def _announce(app: web.Application) -> None:
    service = app[SERVICE]
    say(f"[worker {service.comm.rank}] ready, pid {os.getpid()}: {service!r}")


async def _farewell(app: web.Application) -> None:
    service = app[SERVICE]
    say(f"[worker {service.comm.rank}] closed: {service!r}")


def _rank(request: web.Request) -> int:
    return request.app[SERVICE].comm.rank


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="listening socket inherited")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="idle batch every S seconds")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    web.run_app(
        make_app(args.heartbeat),
        sock=sock,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
