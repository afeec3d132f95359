"""The gateway codec between a peer and its simulated NAT box (sans-IO: bytes in, values out).

**TCP** (peer to box, loopback): each connection starts with one request, a
u32 length and a msgpack map, answered the same way; after an ``ok`` answer
the connection *is* the requested stream.

* ``{"op": "connect", "port": P or 0, "dst": [h, p], "timeout": s}`` ->
  ``{"ok": true, "local": [private, P]}``.  Port 0 allocates a fresh internal
  port (the box's "ephemeral port").
* ``{"op": "listen", "port": P, "timeout": s}`` -> ``{"ok": true,
  "remote": [h, p]}`` when an admitted inbound connection arrives.
* A refusal is ``{"ok": false, "error": text}``.

**UDP**: a peer's datagram socket sends ``0xFE`` (``kinds.NAT`` of
:mod:`fmi_async.channels.udp.kinds`, the one table of first bytes) + u8 host
length + host + u16 port + payload to the box's gateway UDP port; the box
sends the payload from the mapping's public socket, and forwards admitted
inbound datagrams to the peer's socket the same way, the header naming the
true source.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from ..channels.udp import kinds
from ..errors import ConfigError, ProtocolError
from ..holepunch.net import Address

__all__ = [
    "UDP_NAT",
    "MAX_REQUEST",
    "LENGTH",
    "pack",
    "unpack",
    "address",
    "encapsulate",
    "decapsulate",
    "parse_hostport",
]

logger = logging.getLogger(__name__)

UDP_NAT: Final = kinds.NAT
"""First byte of a datagram between a peer and its NAT box (reserved range 0xF0-0xFF)."""
MAX_REQUEST: Final = 4096
"""Largest request or answer on a gateway connection, in bytes."""
LENGTH: Final = struct.Struct("!I")
"""The length prefix of a request or answer."""
_PORT = struct.Struct("!H")


def pack(obj: Mapping[str, Any]) -> bytes:
    """One request or answer: its length, then its msgpack map."""
    data: bytes = msgpack.packb(dict(obj), use_bin_type=True)
    return LENGTH.pack(len(data)) + data


def unpack(data: bytes | bytearray) -> dict[str, Any]:
    """The map of one request or answer (its bytes after the length).

    Raises :class:`~fmi_async.errors.ProtocolError` when it is not a msgpack map.
    """
    try:
        obj = msgpack.unpackb(bytes(data), raw=False)
    except Exception as exc:
        raise ProtocolError(f"malformed NAT gateway message: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("a NAT gateway message must be a map")
    return obj


def address(value: Any, what: str) -> Address:
    """An ``[host, port]`` field of a request or answer.

    Raises :class:`~fmi_async.errors.ProtocolError` when it is not one.
    """
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or not 0 <= value[1] <= 65535
    ):
        raise ProtocolError(f"NAT gateway: {what} must be [host, port]")
    return (value[0], int(value[1]))


def encapsulate(addr: Address, payload: bytes) -> bytes:
    """A datagram between a peer and its box: who it is really to (or from), then the data."""
    host = addr[0].encode()
    return bytes([UDP_NAT, len(host)]) + host + _PORT.pack(addr[1]) + payload


def decapsulate(data: bytes) -> tuple[Address, bytes]:
    """The true address and the payload of an encapsulated datagram.

    Raises :class:`~fmi_async.errors.ProtocolError` when ``data`` is not one.
    """
    if len(data) < 4 or data[0] != UDP_NAT or len(data) < 4 + data[1]:
        raise ProtocolError("not a NAT gateway datagram")
    n = data[1]
    host = data[2 : 2 + n].decode(errors="replace")
    (port,) = _PORT.unpack_from(data, 2 + n)
    return (host, port), data[4 + n :]


def parse_hostport(value: Any, what: str) -> Address:
    """A gateway address from configuration: ``"host:port"`` or ``[host, port]``.

    Raises :class:`~fmi_async.errors.ConfigError` when it is neither.
    """
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if port.isdigit():
            return (host, int(port))
    if isinstance(value, list | tuple) and len(value) == 2:
        return (str(value[0]), int(value[1]))
    raise ConfigError(f"{what} must be 'host:port', got {value!r}")
