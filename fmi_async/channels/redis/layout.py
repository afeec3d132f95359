"""How the Redis channel lays data out in Redis: list elements, chunk references, the push script.

A message or object is one element of a Redis list.  Up to ``inline_max``
bytes of data (plus ``HEADER_ROOM`` for its frame header) the element is
the stored frame itself, which starts with :data:`fmi_async.wire.MAGIC`;
above, the data is stored as string keys of at most ``chunk_size`` bytes
and the element is a *reference* to them: ``REF_MAGIC`` and a msgpack list
``[base, count, nbytes]``, where chunk ``i`` lives at ``<base>/<i>``.

``PUSH_SCRIPT`` appends a message at most once per message number (see
:mod:`fmi_async.channels.redis.once`).
"""

from __future__ import annotations

import logging
from typing import Final

import msgpack

from ...errors import ProtocolError

__all__ = [
    "HEADER_ROOM",
    "PUSH_SCRIPT",
    "REF_MAGIC",
    "SCRIPT_MAX",
    "glob_escape",
    "pack_reference",
    "unpack_reference",
]

logger = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
REF_MAGIC: Final = b"FMIr"  # a list element that points at chunk keys
UNLINK_BATCH: Final = 1000
SCRIPT_MAX: Final = 8 * 1024  # larger elements: Lua's copy costs more than a pipeline
# Room for a frame's own header on top of inline_max: a header is some tens of
# bytes, and without it a power-of-two array just over the limit paid the
# chunk path's extra round trip.
HEADER_ROOM: Final = 4 * 1024
# Appends a message unless the sender's mark says it did already (see the
# module docstring).  KEYS: the list, the mark; ARGV: element, TTL (s), number.
# RPUSH comes first: when it fails (a string where the list belongs) the
# script stops with nothing written.
PUSH_SCRIPT: Final = """
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if last >= tonumber(ARGV[3]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
return 1
"""


def pack_reference(base: str, count: int, nbytes: int) -> bytes:
    """The list element that points at ``count`` chunk keys under ``base`` holding ``nbytes``."""
    packed: bytes = msgpack.packb([base, count, nbytes])
    return REF_MAGIC + packed


def unpack_reference(element: bytes, name: str) -> tuple[list[str], int]:
    """The chunk keys and the byte count a reference element (of list ``name``) points at.

    Raises :class:`~fmi_async.errors.ProtocolError` when it is malformed.
    """
    try:
        base, count, nbytes = msgpack.unpackb(element[len(REF_MAGIC) :])
        keys = [f"{base}/{i}" for i in range(int(count))]
    except Exception as exc:
        raise ProtocolError(f"malformed chunk reference in {name!r}: {exc}") from exc
    return keys, nbytes


def glob_escape(text: str) -> str:
    """``text`` with the special characters of a SCAN MATCH pattern escaped."""
    for special in "\\*?[]":
        text = text.replace(special, "\\" + special)
    return text
