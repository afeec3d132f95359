"""Rendezvous messages to bytes and back: the envelope, its limits, and the field loops.

Sans-IO: nothing here touches a socket, so the codec is tested (and fuzzed)
with byte strings alone.  Every message on the wire is::

    magic    3 bytes  b"FMR"
    version  1 byte   PROTOCOL_VERSION
    length   u32      length of the body, network order, at most ``max_body``
    body     msgpack map: "type" first, then every field of that type in
             declaration order (nil where a field has no value)

A receiver rejects a wrong magic, an unknown version, an oversize or
malformed body, an unknown type and any field of the wrong kind with a
:class:`~fmi_async.errors.ProtocolError`, before allocating anything large.
The fields and their kinds are declared once, in
:mod:`~fmi_async.holepunch.messages`; :func:`to_body` and :func:`from_body`
are loops over them.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from typing import Any, Final

import msgpack

from ..errors import MessageTooLarge, ProtocolError
from .fields import kind_of
from .messages import MESSAGE_TYPES, Message

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "MAX_BODY",
    "Message",
    "to_body",
    "from_body",
    "encode",
    "parse_header",
    "decode_body",
    "decode_datagram",
    "Decoder",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"FMR"
PROTOCOL_VERSION: Final = 1
_HEADER = struct.Struct("!3sBI")
HEADER_SIZE: Final = _HEADER.size
MAX_BODY: Final = 16 * 1024
"""Default limit of one body: requests are tiny, so anything bigger is an attack or a bug."""


def to_body(message: Message) -> dict[str, Any]:
    """The msgpack map of ``message``: its type, then each field packed by its kind."""
    body: dict[str, Any] = {"type": message.TYPE}
    for spec in dataclasses.fields(message):
        value = getattr(message, spec.name)
        body[spec.name] = None if value is None else kind_of(spec.metadata).pack(value)
    return body


def from_body(body: dict[str, Any]) -> Message:
    """The message a decoded msgpack map holds; raises ProtocolError for anything off."""
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown rendezvous message type {kind!r}")
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        wire = kind_of(spec.metadata)
        raw = body.get(spec.name)
        has_default = spec.default is not dataclasses.MISSING
        if raw is None and has_default and not wire.strict:
            values[spec.name] = spec.default
        else:
            values[spec.name] = wire.unpack(spec.name, raw)
    message = cls(**values)
    message.check()
    return message


def encode(message: Message, max_body: int = MAX_BODY) -> bytes:
    """The bytes of one message, envelope included.

    Raises :class:`~fmi_async.errors.MessageTooLarge` (this side's misuse,
    not the peer's garbage) when the body exceeds ``max_body``.
    """
    data: bytes = msgpack.packb(to_body(message), use_bin_type=True)
    if len(data) > max_body:
        raise MessageTooLarge(f"{message.TYPE} message of {len(data)} bytes exceeds {max_body}")
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, len(data)) + data


def parse_header(data: bytes | bytearray | memoryview, max_body: int = MAX_BODY) -> int:
    """Validate the fixed envelope header and return the body length; raises ProtocolError."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"envelope header must be {HEADER_SIZE} bytes, got {len(data)}")
    magic, version, length = _HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad rendezvous magic {magic!r}; is the other side an fmi-async peer or server?"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"rendezvous protocol version {version}, this side speaks {PROTOCOL_VERSION}; "
            "run the same fmi-async version everywhere"
        )
    if length > max_body:
        raise ProtocolError(f"rendezvous message of {length} bytes exceeds the limit of {max_body}")
    return int(length)


def decode_body(data: bytes | bytearray | memoryview) -> Message:
    """Parse one body (without envelope) into a message; raises ProtocolError."""
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage input
        raise ProtocolError(f"malformed rendezvous message: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("a rendezvous message body must be a map")
    return from_body(body)


def decode_datagram(data: bytes | bytearray | memoryview) -> Message:
    """Exactly one enveloped message filling ``data`` (a datagram without its first
    byte); raises ProtocolError."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError("short rendezvous datagram")
    length = parse_header(data[:HEADER_SIZE])
    if length != len(data) - HEADER_SIZE:
        raise ProtocolError("datagram length does not match the envelope")
    return decode_body(data[HEADER_SIZE:])


class Decoder:
    """Incremental decoder: feed bytes as they arrive, get whole messages back.

    After a :class:`ProtocolError` the stream is out of sync for good, so the
    decoder stays failed and every later :meth:`feed` raises again.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._need: int | None = None  # body length once the header is parsed
        self._failed: ProtocolError | None = None

    def __repr__(self) -> str:
        state = "failed" if self._failed else f"buffered={len(self._buf)}"
        return f"<Decoder {state}>"

    @property
    def mid_message(self) -> bool:
        """True if the bytes seen so far end inside a message."""
        return bool(self._buf) or self._need is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages ``data`` completes; raises ProtocolError (for good) on garbage."""
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                if self._need is None:
                    if len(self._buf) < HEADER_SIZE:
                        break
                    self._need = parse_header(self._buf[:HEADER_SIZE], self.max_body)
                    del self._buf[:HEADER_SIZE]
                if len(self._buf) < self._need:
                    break
                body = self._buf[: self._need]
                del self._buf[: self._need]
                self._need = None
                out.append(decode_body(body))
        except ProtocolError as exc:
            self._failed = exc
            self._buf.clear()
            raise
        return out
