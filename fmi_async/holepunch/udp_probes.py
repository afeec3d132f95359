"""The probe datagrams of a UDP pairing, sans-IO: their bytes and their proofs.

Both sides of a pairing send probes (``PROBE``, answered by ``PROBE_ACK``) to
each other's candidate endpoints until one gets through (see
:mod:`fmi_async.holepunch.udp`).  A probe is its kind byte and the msgpack
list ``[comm, run_id, from, to, mac]``; the MAC is an HMAC-SHA256 (cut to
16 bytes) over those fields, the kind and the pairing's nonce, keyed by
``security.secret``, so only a member that took part in this pairing can
make one.  :class:`Punch` is one pairing in progress on this side.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

import msgpack

from ..errors import ProtocolError
from .net import Address
from .pairing import PairKey

__all__ = ["Punch", "decode_probe", "encode_probe", "probe_mac"]

logger = logging.getLogger(__name__)

MAC_LEN = 16


class Punch:
    """One pairing in progress on this side."""

    def __init__(self, key: PairKey, me: int, other: int) -> None:
        self.key = key
        self.me = me
        self.other = other
        self.nonce: bytes | None = None
        self.heard: asyncio.Future[Address] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[Address | None] = asyncio.get_running_loop().create_future()


def probe_mac(
    secret: bytes | None, kind: int, comm: str, run_id: str, src: int, dst: int, nonce: bytes
) -> bytes:
    """The proof of a probe of ``kind`` from ``src`` to ``dst`` in the pairing of ``nonce``."""
    data = msgpack.packb([kind, comm, run_id, src, dst, nonce], use_bin_type=True)
    return hmac.new(secret or b"", data, hashlib.sha256).digest()[:MAC_LEN]


def encode_probe(
    secret: bytes | None, kind: int, comm: str, run_id: str, src: int, dst: int, nonce: bytes
) -> bytes:
    """The datagram of one probe (kind byte, then the signed fields)."""
    mac = probe_mac(secret, kind, comm, run_id, src, dst, nonce)
    body: bytes = msgpack.packb([comm, run_id, src, dst, mac], use_bin_type=True)
    return bytes([kind]) + body


def decode_probe(data: bytes) -> tuple[str, str, int, int, bytes]:
    """``(comm, run_id, from, to, mac)`` of a probe datagram (its kind byte first).

    Raises :class:`~fmi_async.errors.ProtocolError` when it is malformed.
    """
    try:
        fields: Any = msgpack.unpackb(data[1:], raw=False)
    except Exception as exc:
        raise ProtocolError(f"malformed probe: {type(exc).__name__}") from exc
    if (
        not isinstance(fields, list)
        or len(fields) != 5
        or not isinstance(fields[0], str)
        or not isinstance(fields[1], str)
        or not isinstance(fields[2], int)
        or not isinstance(fields[3], int)
        or not isinstance(fields[4], bytes)
    ):
        raise ProtocolError("a probe is [comm, run_id, from, to, mac]")
    comm, run_id, src, dst, mac = fields
    return comm, run_id, src, dst, mac
