"""Sans-IO wire format: nothing here touches a socket.

Three jobs, one module each:

* :mod:`.serialize` -- a Python value to a :class:`Payload` (a small header
  plus out-of-band buffers) and back: :func:`dumps`, :func:`loads`;
* :mod:`.framing` -- a ``(key, payload)`` message as bytes on a stream:
  :func:`encode_frame`, the incremental :class:`FrameReader`, routing keys
  and the :class:`Limits` checked before anything is allocated;
* :mod:`.buffers` -- raw buffers and the memory received arrays land in:
  :class:`BufferRecycler`.

The names other modules use are re-exported here.
"""

from __future__ import annotations

from .buffers import Buffer, BufferRecycler, flat
from .framing import (
    DEFAULT_LIMITS,
    LENGTH,
    MAGIC,
    PREFIX,
    VERSION,
    FrameReader,
    Key,
    Limits,
    decode_key,
    encode_frame,
    encode_key,
)
from .serialize import SERIALIZERS, Payload, dumps, loads

__all__ = [
    # values
    "Payload",
    "dumps",
    "loads",
    "SERIALIZERS",
    # stream framing
    "Key",
    "Limits",
    "DEFAULT_LIMITS",
    "MAGIC",
    "VERSION",
    "PREFIX",
    "LENGTH",
    "FrameReader",
    "encode_frame",
    "encode_key",
    "decode_key",
    # buffers
    "Buffer",
    "BufferRecycler",
    "flat",
]
