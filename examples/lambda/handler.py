"""An fmi-async job as an AWS Lambda handler.

Every invocation is one peer.  Its event names the job (``peer_id``,
``num_peers``, ``comm_name``, ``run_id``, ``config``: see
``fmi_async.tools.invoke_events.job_events``, which ``invoke.py`` uses to start
real functions); the job's secret is in the function's environment,
``FMI_SECRET``.  The job: every peer draws its shard of a data set, and
the peers agree on the mean and standard deviation of the whole set with one
``allreduce``, and on a label that peer 0 chooses with one ``bcast``.

Run it here, N invocations as separate processes with a Lambda-like event,
context and time limit::

    fmi invoke -n 4 examples/lambda/handler.py --event '{"rows": 100000}'
    fmi invoke -n 4 examples/lambda/handler.py --handler handler.async_handler

Deploy it: docs/deploy-lambda.md.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

import fmi_async as fmi

SECRET_VARIABLE = "FMI_SECRET"


def deadline(context: Any) -> tuple[float, float]:
    """Seconds every wait of the job may take, and the margin kept back.

    The communicator's deadline is the function's remaining time less a
    margin (10 %, at least 1 s, at most 5 s), so that a peer that waits in
    vain raises ``fmi.CommTimeout``, closes its communicator (which deletes
    what the job stored) and returns an error that says what happened, before
    Lambda stops the function with "Task timed out".
    """
    remaining = context.get_remaining_time_in_millis() / 1000
    margin = min(5.0, max(1.0, 0.1 * remaining))
    if remaining - margin <= 0:
        raise RuntimeError(f"only {remaining:.1f} s left: raise the function's timeout")
    return remaining - margin, margin


def communicator(event: dict[str, Any], context: Any, timeout: float) -> fmi.Communicator:
    """The peer this invocation is, from its event, the secret in the environment and
    the function's memory (the cost model prices GB-seconds with it)."""
    config = dict(event.get("config") or {})
    secret = os.environ.get(SECRET_VARIABLE)
    if secret:
        config["security"] = {**(config.get("security") or {}), "secret": secret}
    return fmi.Communicator(
        int(event["peer_id"]),
        int(event["num_peers"]),
        config=config,
        comm_name=str(event["comm_name"]),
        faas_memory=int(context.memory_limit_in_mb),
        run_id=str(event["run_id"]),
        timeout=timeout,  # every wait of the job ends before the function's limit
    )


def shard(seed: int, peer: int, rows: int) -> np.ndarray:
    """Peer ``peer``'s part of the data set (the same numbers wherever it runs)."""
    return np.random.default_rng([seed, peer]).normal(loc=10.0, scale=2.0, size=rows)


async def job(comm: fmi.Communicator, event: dict[str, Any]) -> dict[str, Any]:
    """Mean and standard deviation of the whole data set, on every peer."""
    data = shard(int(event.get("seed", 0)), comm.rank, int(event.get("rows", 10_000)))
    local = np.array([data.sum(), np.square(data).sum(), float(data.size)])
    total, squares, count = (float(x) for x in await comm.allreduce(local, op=fmi.SUM))
    label = await comm.bcast(event.get("label", "run") if comm.rank == 0 else None, root=0)
    mean = total / count
    channels = comm.stats()["channels"]
    return {
        "peer_id": comm.rank,
        "num_peers": comm.size,
        "label": label,
        "count": int(count),
        "mean": mean,
        "std": (squares / count - mean * mean) ** 0.5,
        "messages_sent": {name: s["messages_sent"] for name, s in channels.items()},
    }


async def run_job(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Open the communicator, run the job, close: all within the function's remaining time."""
    timeout, margin = deadline(context)
    # Each wait ends within `timeout`; the whole job, many waits, within half the margin more.
    whole = timeout + margin / 2
    try:
        async with asyncio.timeout(whole):
            async with communicator(event, context, timeout) as comm:
                return await job(comm, event)
    except TimeoutError as exc:
        if isinstance(exc, fmi.CommTimeout):
            raise  # names the peer or the key it waited for
        raise TimeoutError(f"the job did not end within {whole:.1f} s") from None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda's Python runtime calls a plain function: run the async job to completion."""
    return asyncio.run(run_job(event, context))


async def async_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The same job for a runtime that awaits its handler (``fmi invoke`` does)."""
    return await run_job(event, context)
