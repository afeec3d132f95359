"""``fmi clean``: remove what runs left on the configured storage backends.

A peer that dies before ``close`` leaves its keys, objects and items under
``fmi/<comm>/<run>/`` (see :mod:`fmi_async.channels.storage`).  They expire
by themselves on Redis and DynamoDB (TTL) and on an S3 bucket with the
lifecycle rule, but a bucket without one keeps them forever, and a day is
long.  ``fmi clean --config fmi.json --comm NAME [--run RUN]`` deletes them
at once, on every storage backend the config enables, and prints what it
removed.

Without ``--run`` everything of the communicator goes, every run; with it,
the runs whose run component is ``RUN`` or ``RUN.<anything>`` (a run's job
epochs are stored as ``<run>.<epoch>``).  Only names under the ``fmi/``
prefix of that communicator are ever listed or deleted.  Running it while
the run is still alive breaks that run: its peers lose their messages.
The command itself is :mod:`fmi_async.tools.clean`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .channels.base import ChannelContext, MediatedChannel
from .channels.mailbox import Mailbox
from .channels.options import option_fields
from .channels.registry import channel_class
from .channels.storage import storage_prefix
from .config import Config
from .errors import ArgumentError, FMIError

__all__ = ["Cleaned", "clean", "run_selector"]

logger = logging.getLogger(__name__)


@dataclass
class Cleaned:
    """What one backend held (and, unless a dry run, no longer holds)."""

    backend: str
    location: str
    names: list[str] = field(default_factory=list)
    error: str | None = None

    def by_run(self, comm_name: str) -> dict[str, list[str]]:
        """The names grouped by their (quoted) run component."""
        base = storage_prefix(comm_name, "-")[: -len("-")]
        runs: dict[str, list[str]] = {}
        for name in self.names:
            run = name[len(base) :].split("/", 1)[0] if name.startswith(base) else "?"
            runs.setdefault(run, []).append(name)
        return runs


def run_selector(comm_name: str, run_id: str | None) -> tuple[str, str]:
    """``(prefix to list, quoted run)``: the run's names start with the prefix.

    The prefix ends in the quoted run itself (no slash), so ``R`` lists
    ``R/...`` and ``R.<epoch>/...`` (and ``Rx/...``, which :func:`clean`
    filters out).  Raises :class:`~fmi_async.errors.ArgumentError` for an
    empty communicator name or run id.
    """
    if not comm_name:
        raise ArgumentError("fmi clean needs a communicator name (--comm)")
    if run_id is None:
        return storage_prefix(comm_name, "-")[: -len("-")], ""
    if not run_id:
        raise ArgumentError("--run must not be empty")
    prefix = storage_prefix(comm_name, run_id)
    return prefix, prefix.rsplit("/", 1)[1]


async def clean(
    config: Config, comm_name: str, run_id: str | None = None, *, dry_run: bool = False
) -> list[Cleaned]:
    """Delete the leftovers of ``comm_name`` (one run's, or all) on every storage backend.

    Never creates a bucket or table.  A backend that cannot be reached or
    listed is reported in its :class:`Cleaned` entry's ``error``; the others
    are cleaned anyway.  Raises :class:`~fmi_async.errors.ArgumentError` for
    an empty name.
    """
    prefix, run = run_selector(comm_name, run_id)
    base_len = len(prefix) - len(run)

    def selected(name: str) -> bool:
        if not run:
            return True
        component = name[base_len:].split("/", 1)[0]
        return component == run or component.startswith(run + ".")

    results: list[Cleaned] = []
    for backend in config.enabled():
        try:
            cls = channel_class(backend)
        except FMIError as exc:  # enabled, but its module or extra is missing
            results.append(Cleaned(backend, backend, error=str(exc)))
            continue
        if not issubclass(cls, MediatedChannel):
            continue
        # Never create what is not there; the run id is a placeholder (the
        # channel's own prefix is not used).
        known = option_fields(cls.Options)
        options = {k: False for k in ("create_bucket", "create_table") if k in known}
        settings = config.with_backend(backend, **options)
        chan = cls(ChannelContext(0, 1, comm_name, "clean", settings, Mailbox(0)))
        entry = Cleaned(backend, chan.location())
        results.append(entry)
        try:
            await chan.open()
            entry.names = await chan.sweep(prefix, selected, dry_run=dry_run)
        except FMIError as exc:
            entry.error = str(exc)
        finally:
            try:
                await chan.close()
            except FMIError as exc:
                logger.debug("closing %r after cleaning: %s", chan, exc)
    return results
