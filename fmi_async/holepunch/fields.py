"""The kinds of rendezvous message fields: how each value travels, and what a receiver accepts.

A kind is a pair of functions, ``pack`` (the value to its msgpack form) and
``unpack`` (the msgpack form back, checked, raising
:class:`~fmi_async.errors.ProtocolError` that names the field).  Message
classes (:mod:`~fmi_async.holepunch.messages`) name one kind per field, as
dataclass field metadata built by :func:`kind`; the codec and the proofs read
it back with :func:`kind_of`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError

__all__ = [
    "Kind",
    "kind",
    "kind_of",
    "same",
    "text",
    "uint",
    "exact_bytes",
    "boolean",
    "address",
    "seconds",
    "one_of",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Kind:
    """How one field travels: ``pack`` makes the msgpack value, ``unpack`` checks it back.

    ``unpack(name, value)`` raises :class:`~fmi_async.errors.ProtocolError`
    naming the field.  A field with a default takes it for nil (or an
    absent key) unless its kind is ``strict``.
    """

    pack: Callable[[Any], Any]
    unpack: Callable[[str, Any], Any]
    strict: bool = False  # nil is refused even where the field has a default


def same(value: Any) -> Any:
    return value


def text(limit: int) -> Callable[[str, Any], str]:
    def unpack(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ProtocolError(f"field {name!r} must be a string, got {type(value).__name__}")
        if len(value) > limit:
            raise ProtocolError(f"field {name!r} is longer than {limit} characters")
        return value

    return unpack


def uint(limit: int) -> Callable[[str, Any], int]:
    def unpack(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise ProtocolError(f"field {name!r} must be an integer in [0, {limit}], got {value!r}")
        return value

    return unpack


def exact_bytes(length: int) -> Callable[[str, Any], bytes]:
    def unpack(name: str, value: Any) -> bytes:
        if not isinstance(value, bytes) or len(value) != length:
            raise ProtocolError(f"field {name!r} must be {length} bytes")
        return value

    return unpack


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be true or false, got {value!r}")
    return value


def address(name: str, value: Any) -> tuple[str, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or len(value[0]) > 256
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 <= value[1] <= 65535
    ):
        raise ProtocolError(f"field {name!r} must be [host, port], got {value!r}")
    return (value[0], value[1])


def seconds(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 86400.0:
        raise ProtocolError(f"field {name!r} must be seconds in [0, 86400], got {value!r}")
    return float(value)


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def unpack(name: str, value: Any) -> str:
        if value not in choices:
            allowed = " or ".join(repr(c) for c in choices)
            raise ProtocolError(f"field {name!r} must be {allowed}, got {value!r}")
        return str(value)

    return unpack


def kind(
    pack: Callable[[Any], Any], unpack: Callable[[str, Any], Any], *, strict: bool = False
) -> Mapping[str, Kind]:
    return {"wire": Kind(pack, unpack, strict)}


def kind_of(metadata: Mapping[str, Any]) -> Kind:
    """The wire kind a field declared (every field of a message declares one)."""
    kind: Kind = metadata["wire"]
    return kind
