"""Names of stored data: the namespace of a run and the name segment of a key.

Every stored name starts with ``fmi/<comm_name>/<run_id>/``, so two runs or
two communicators on one bucket, table or database never read each other's
data.  Key parts are percent-quoted and prefixed by type, so ``("u", 3)``
and ``("u", "3")`` never share a name, and no part can contain the ``/``
separator.  Also here: how long stored data lives by default.
"""

from __future__ import annotations

import logging
import math
from urllib.parse import quote

from ..errors import ArgumentError
from ..wire import Key

__all__ = [
    "TTL_FACTOR",
    "TTL_FLOOR",
    "default_ttl",
    "encode_key",
    "key_component",
    "storage_prefix",
]

logger = logging.getLogger(__name__)

# Stored data outlives the deadline of the operation that wrote it by this
# factor (a receiver may post its recv later than the send), but no less than
# TTL_FLOOR seconds; ``ttl`` overrides both.
TTL_FACTOR = 4
TTL_FLOOR = 60


def default_ttl(timeout: float) -> int:
    """Seconds stored data lives by default: ``TTL_FACTOR`` times ``timeout``, at least a minute."""
    return max(TTL_FLOOR, math.ceil(TTL_FACTOR * timeout))


def storage_prefix(comm_name: str, run_id: str) -> str:
    """``fmi/<comm>/<run>``: the namespace of one run of one communicator."""
    return f"fmi/{quote(comm_name, safe='')}/{quote(run_id, safe='')}"


def key_component(part: str | int) -> str:
    """One key part as a name segment: ints as decimal, strings quoted behind ``~``.

    Raises :class:`~fmi_async.errors.ArgumentError` for any other type.
    """
    if isinstance(part, bool) or not isinstance(part, (str, int)):
        raise ArgumentError(f"message key parts must be str or int, got {part!r}")
    if isinstance(part, int):
        return str(part)
    return "~" + quote(part, safe="")


def encode_key(key: Key) -> str:
    """A message key as name segments joined by ``/``.

    Raises :class:`~fmi_async.errors.ArgumentError` unless ``key`` is a
    non-empty tuple of str and int.
    """
    if not isinstance(key, tuple) or not key:
        raise ArgumentError(f"message keys are non-empty tuples of str/int, got {key!r}")
    return "/".join(key_component(part) for part in key)
