"""Job leases: one job at a time per communicator name and run id.

Peers of two jobs that open the same ``comm_name`` with the same run id would
use the same storage keys, pairing names and membership proofs, and read each
other's messages.  A *job lease* prevents it: when a communicator opens, its
peers form one lease record per ``(comm_name, run_id)`` on one backend, and
the record's random *epoch* becomes part of the run id every channel uses
(``f"{run_id}.{epoch}"``).  Peers of another job get another epoch, hence
other keys, or an error; never each other's data.  The protocol is in
:mod:`fmi_async.jobs.record` (sans-IO); ``docs/jobs.md`` tells the story for
users.

This module picks the backend: :func:`lease_for` reads the configuration
and returns a :class:`JobLease` (:mod:`fmi_async.jobs.base`), acquired
when the communicator opens, renewed in the background, and released at
close.  :class:`StoreLease` (:mod:`fmi_async.jobs.store`) drives the
protocol over conditional writes (:mod:`fmi_async.jobs.stores`: Redis, S3,
DynamoDB); :class:`RendezvousLease` (:mod:`fmi_async.jobs.rendezvous`)
asks the rendezvous server, which runs it on its own table.

Storage records carry wall-clock times: peers' clocks are assumed to agree to
well within ``lease_ttl`` (and within
:data:`~fmi_async.jobs.store.SETTLE_MARGIN` for the settle window).
"""

from __future__ import annotations

import logging
from typing import Any

from ..channels import registry
from ..config import Config
from .base import DEFAULT_SETTLE, RELEASE_TIMEOUT, JobLease, settle_for
from .rendezvous import RendezvousLease
from .store import RecordStore, StoreLease

__all__ = [
    "JobLease",
    "lease_for",
    "settle_for",
    "RecordStore",
    "StoreLease",
    "RendezvousLease",
    "DEFAULT_SETTLE",
    "RELEASE_TIMEOUT",
]

logger = logging.getLogger(__name__)


def lease_for(
    config: Config, comm_name: str, run_id: str, peer_id: int, num_peers: int
) -> JobLease | None:
    """The lease of one peer of a job, on the one backend every peer chooses alike.

    The rendezvous server when ``tcp`` or ``udp`` is enabled, else Redis,
    else DynamoDB, else S3; None when only in-process channels are enabled
    (``memory``: one hub per group cannot mix jobs).  Raises
    :class:`~fmi_async.errors.ConfigError` when the chosen backend's options
    cannot work.
    """
    enabled = set(config.enabled())
    job = config.job
    for name in ("tcp", "udp"):
        if name in enabled:
            if config.secret is None and not config.insecure:
                config.check_security(name)  # refused before anything is said to the server
            options = _options(name, config)
            host, port = options.rendezvous(name.upper(), "it also holds the job lease")
            timeout = options.connect_timeout or 10.0
            return RendezvousLease(
                host,
                port,
                config.secret,
                comm_name,
                run_id,
                peer_id,
                num_peers,
                job,
                timeout=min(timeout, config.timeout),
            )
    from . import stores as lease_stores

    key = lease_stores.record_name(comm_name, run_id)
    store: RecordStore
    if "redis" in enabled:
        store = lease_stores.RedisStore(_options("redis", config), key)
    elif "dynamodb" in enabled:
        store = lease_stores.DynamoDBStore(_options("dynamodb", config), key, config.timeout)
    elif "s3" in enabled:
        store = lease_stores.S3Store(_options("s3", config), key)
    else:
        return None
    return StoreLease(store, comm_name, run_id, peer_id, num_peers, job)


def _options(name: str, config: Config) -> Any:
    """Channel ``name``'s typed options (its lease store reads the same section)."""
    return registry.channel_class(name).parse_options(config)
