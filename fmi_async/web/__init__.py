"""Communicators in web services: one per worker process, opened and closed with the app.

A web service served by several worker processes can make its workers one
group of peers: every worker opens a :class:`~fmi_async.Communicator` when
the application starts and closes it when the application stops, and request
handlers run collectives through a :class:`CollectiveService`
(:mod:`fmi_async.web.service`), which runs every worker's part of every
request's collectives in one order.

``serve(operations)`` is that whole life cycle as one async context manager
(any framework's lifespan); ``aiohttp_cleanup_ctx(key, operations)`` adapts
it to aiohttp's ``app.cleanup_ctx``; ``communicator()`` opens and closes a
bare communicator.  Nothing here imports a web framework.
See docs/web-services.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from ..communicator import Communicator
from ..errors import ConfigError
from ..runner import communicator_from_env
from .service import DEFAULT_TAG, CollectiveService, Operation

__all__ = [
    "DEFAULT_TAG",
    "CollectiveService",
    "Operation",
    "aiohttp_cleanup_ctx",
    "communicator",
    "serve",
]


@asynccontextmanager
async def communicator(comm: Communicator | None = None) -> AsyncIterator[Communicator]:
    """Open ``comm``, or the communicator the environment describes, and close it on exit.

    The environment is the one ``fmi run`` and ``examples/web_service/serve.py``
    give each worker (``FMI_PEER_ID``, ``FMI_NUM_PEERS``, ``FMI_CONFIG``, ...;
    see :func:`fmi_async.runner.communicator_from_env`).  Raises
    :class:`~fmi_async.errors.ConfigError` when ``comm`` is None and the
    environment describes none.
    """
    async with _given_or_from_env(comm) as opened:
        yield opened


def _given_or_from_env(comm: Communicator | None) -> Communicator:
    if comm is not None:
        return comm
    found = communicator_from_env()
    if found is None:
        raise ConfigError(
            "no communicator: pass one, or start the workers with FMI_PEER_ID, "
            "FMI_NUM_PEERS and FMI_CONFIG set (as fmi run and "
            "examples/web_service/serve.py do)"
        )
    return found


@asynccontextmanager
async def serve(
    operations: Mapping[str, Operation],
    comm: Communicator | None = None,
    *,
    heartbeat: float = 1.0,
    tag: str = DEFAULT_TAG,
) -> AsyncIterator[CollectiveService]:
    """Open the communicator (see :func:`communicator`) and run a :class:`CollectiveService`.

    One line in any framework's lifespan: ``async with fmi.web.serve(OPS) as
    service: ...``.  On exit the service stops with the other workers, then
    the communicator closes (without the final barrier when the service
    broke: its peers are not all there to meet).
    """
    comm = _given_or_from_env(comm)
    await comm.open()
    service: CollectiveService | None = None
    clean = False
    try:
        service = CollectiveService(comm, operations, heartbeat=heartbeat, tag=tag)
        await service.start()
        try:
            yield service
            clean = True
        finally:
            await service.close()
    finally:
        healthy = service is not None and service.state == "stopped"
        await comm.close(synchronize=clean and healthy)


def aiohttp_cleanup_ctx(
    key: Any,
    operations: Mapping[str, Operation],
    comm: Communicator | None = None,
    **options: Any,
) -> Callable[[MutableMapping[Any, Any]], AsyncIterator[None]]:
    """:func:`serve` as an aiohttp ``cleanup_ctx``: the service is ``app[key]`` while it runs.

    ``app.cleanup_ctx.append(aiohttp_cleanup_ctx(SERVICE, OPERATIONS))``, with
    ``SERVICE = web.AppKey("service", CollectiveService)``.  ``options`` go
    to :func:`serve` (``heartbeat=``, ``tag=``).
    """

    async def context(app: MutableMapping[Any, Any]) -> AsyncIterator[None]:
        async with serve(operations, comm, **options) as service:
            app[key] = service
            yield

    return context
