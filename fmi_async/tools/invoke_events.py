"""The events of one job's invocations, shared by ``fmi invoke`` and real invokers.

A serverless function learns who it is from its event: :func:`job_events`
merges the job (peer id, number of peers, communicator name, run id and the
config the peers meet through) into the user's event, once per invocation.
``fmi invoke`` builds its events with it, and so does the example invoker of
real AWS Lambda functions (``examples/lambda/invoke.py``), so what a deployed
function receives is what the local emulation tests.

The job's secret never travels in an event (events are logged and kept by
the platform): functions read it from their environment, ``FMI_SECRET``.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["EVENT_KEYS", "SECRET_VARIABLE", "event_config", "job_events", "new_run_id"]

EVENT_KEYS = ("peer_id", "num_peers", "comm_name", "run_id", "config")
"""The keys :func:`job_events` adds to every invocation's event."""

SECRET_VARIABLE = "FMI_SECRET"
"""The environment variable that holds the job's secret inside each function."""


def new_run_id() -> str:
    """A fresh run id for one job (every invocation of the job gets the same)."""
    return secrets.token_hex(8)


def event_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without ``security.secret``: what may travel in an event."""
    out = copy.deepcopy(dict(config))
    security = out.get("security")
    if isinstance(security, dict):
        security.pop("secret", None)
        if not security:
            del out["security"]
    return out


def job_events(
    event: Mapping[str, Any],
    num_peers: int,
    comm_name: str,
    run_id: str,
    config: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """The events of one job's ``num_peers`` invocations: ``event`` with the job merged in.

    Invocation ``i`` gets ``peer_id = i`` and the same ``num_peers``,
    ``comm_name``, ``run_id`` and ``config`` as the others (a copy each).
    Raises :class:`~fmi_async.errors.ConfigError` when ``event`` is not a
    mapping, when it already has one of :data:`EVENT_KEYS`, when
    ``num_peers`` is below 1 or when ``config`` carries a secret (keep the
    secret in the functions' environment: :func:`event_config`).
    """
    if not isinstance(event, Mapping):
        raise ConfigError(f"the event must be a JSON object, got {type(event).__name__}")
    taken = [key for key in EVENT_KEYS if key in event]
    if taken:
        raise ConfigError(f"the event may not set {', '.join(taken)}: the invoker sets them")
    if isinstance(num_peers, bool) or not isinstance(num_peers, int) or num_peers < 1:
        raise ConfigError(f"the number of invocations must be at least 1, got {num_peers!r}")
    security = config.get("security")
    if isinstance(security, Mapping) and "secret" in security:
        raise ConfigError(
            "the config of an event must not carry security.secret: events are logged "
            f"and stored; give the functions the secret in {SECRET_VARIABLE} instead"
        )
    return [
        {
            **copy.deepcopy(dict(event)),
            "peer_id": peer,
            "num_peers": num_peers,
            "comm_name": comm_name,
            "run_id": run_id,
            "config": copy.deepcopy(dict(config)),
        }
        for peer in range(num_peers)
    ]
