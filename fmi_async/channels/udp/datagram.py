"""The datagram format of the UDP channel (sans-IO: bytes in, values out).

Network byte order::

    magic  u8   0x75 ("u"); the first byte of every datagram on the socket is
                named in :mod:`.kinds` (0xF0-0xFF belong to hole punching)
    ver    u8   1
    type   u8   1 = DATA, 2 = ACK
    flags  u8   DATA: 1 = last fragment of a message; ACK: 1 = sender is closing,
                2 = a duplicate report follows the ranges
    tag    u32  session token of (communicator, run, secret): foreign traffic is dropped
    src    u32  sending peer
    dst    u32  receiving peer
    epoch  u32  incarnation of the sending half (DATA) / of the acknowledged half (ACK)
    DATA:  seq u64, then the fragment
    ACK:   cumulative u64 (every seq below it arrived), window u32 (fragments),
           count u16, then count x (offset u32 from cumulative, length u32):
           ranges received beyond a gap (selective acks, as TCP SACK, RFC 2018);
           with flag 2, then duplicate u64: a seq that arrived again although it
           was already held (a D-SACK, RFC 2883: the sender learns that a
           retransmission was spurious)

The version is checked before anything else is read, and every length and
range before it is used: :func:`decode` raises
:class:`~fmi_async.errors.ProtocolError` and nothing else, so a receiver can
count and drop whatever is not a well-formed datagram of its own session.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ...errors import ProtocolError
from ...wire import Buffer
from . import kinds

__all__ = [
    "MAGIC",
    "VERSION",
    "DATA_HEADER",
    "ACK_HEADER",
    "RANGE_SIZE",
    "MAX_DATAGRAM",
    "MIN_DATAGRAM",
    "Data",
    "Ack",
    "decode",
    "data_header",
    "encode_data",
    "encode_ack",
    "session_tag",
]

MAGIC: Final = kinds.CHANNEL
VERSION: Final = 1
_COMMON = struct.Struct("!BBBBIIII")
_SEQ = struct.Struct("!Q")
_ACK = struct.Struct("!QIH")
_RANGE = struct.Struct("!II")
DATA_HEADER: Final = _COMMON.size + _SEQ.size
ACK_HEADER: Final = _COMMON.size + _ACK.size
RANGE_SIZE: Final = _RANGE.size
T_DATA: Final = 1
T_ACK: Final = 2
F_LAST: Final = 0x01
F_CLOSING: Final = 0x01
F_DUPLICATE: Final = 0x02
MAX_DATAGRAM: Final = 65507  # largest UDP payload over IPv4
MIN_DATAGRAM: Final = 128


@dataclass(frozen=True, slots=True)
class Data:
    src: int
    dst: int
    epoch: int
    seq: int
    last: bool
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Ack:
    src: int
    dst: int
    epoch: int
    cumulative: int
    window: int
    ranges: tuple[tuple[int, int], ...]  # absolute [start, end)
    closing: bool
    duplicate: int | None = None  # a seq received twice (D-SACK)


def session_tag(comm: str, run_id: str, secret: bytes | None) -> int:
    """32-bit token that keeps datagrams of other runs and communicators apart.

    It is not authentication (32 bits, no per-datagram MAC); it stops stray
    traffic, for example a late datagram to a port that a new run reuses.
    """
    digest = hashlib.blake2b(
        f"{comm}\x00{run_id}".encode(), key=secret or b"", digest_size=4, person=b"fmi-udp"
    ).digest()
    return int.from_bytes(digest, "big")


def encode_data(
    tag: int, src: int, dst: int, epoch: int, seq: int, last: bool, payload: Buffer
) -> bytes:
    head = _COMMON.pack(MAGIC, VERSION, T_DATA, F_LAST if last else 0, tag, src, dst, epoch)
    return b"".join((head, _SEQ.pack(seq), payload))


def encode_ack(
    tag: int,
    src: int,
    dst: int,
    epoch: int,
    cumulative: int,
    window: int,
    ranges: Sequence[tuple[int, int]],
    closing: bool = False,
    duplicate: int | None = None,
) -> bytes:
    flags = (F_CLOSING if closing else 0) | (F_DUPLICATE if duplicate is not None else 0)
    parts = [
        _COMMON.pack(MAGIC, VERSION, T_ACK, flags, tag, src, dst, epoch),
        _ACK.pack(cumulative, window, len(ranges)),
    ]
    parts.extend(_RANGE.pack(start - cumulative, end - start) for start, end in ranges)
    if duplicate is not None:
        parts.append(_SEQ.pack(duplicate))
    return b"".join(parts)


def decode(data: bytes, tag: int) -> Data | Ack:
    """Parse one datagram; :class:`ProtocolError` says why it is not ours or malformed."""
    if len(data) < _COMMON.size:
        raise ProtocolError(f"datagram of {len(data)} bytes is shorter than a header")
    magic, version, kind, flags, their_tag, src, dst, epoch = _COMMON.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"datagram starts with {magic:#04x}, not an fmi-async udp datagram")
    if version != VERSION:
        raise ProtocolError(f"datagram version {version}, this side speaks {VERSION}")
    if their_tag != tag:
        raise ProtocolError("datagram of another communicator, run or secret")
    if kind == T_DATA:
        if len(data) <= DATA_HEADER or flags & ~F_LAST:
            raise ProtocolError("empty or malformed data datagram")
        (seq,) = _SEQ.unpack_from(data, _COMMON.size)
        return Data(src, dst, epoch, seq, bool(flags & F_LAST), memoryview(data)[DATA_HEADER:])
    if kind == T_ACK:
        if len(data) < ACK_HEADER or flags & ~(F_CLOSING | F_DUPLICATE):
            raise ProtocolError("truncated or malformed ack")
        cumulative, window, count = _ACK.unpack_from(data, _COMMON.size)
        tail = _SEQ.size if flags & F_DUPLICATE else 0
        if len(data) != ACK_HEADER + count * _RANGE.size + tail:
            raise ProtocolError(f"ack announces {count} ranges but has {len(data)} bytes")
        ranges: list[tuple[int, int]] = []
        floor = cumulative
        for i in range(count):
            offset, length = _RANGE.unpack_from(data, ACK_HEADER + i * _RANGE.size)
            start = cumulative + offset
            if start <= floor or length == 0:  # strictly increasing, after a gap
                raise ProtocolError("ack ranges overlap, touch or are empty")
            floor = start + length
            ranges.append((start, floor))
        duplicate = _SEQ.unpack_from(data, len(data) - tail)[0] if tail else None
        closing = bool(flags & F_CLOSING)
        return Ack(src, dst, epoch, cumulative, window, tuple(ranges), closing, duplicate)
    raise ProtocolError(f"unknown datagram type {kind}")


def data_header(tag: int, src: int, dst: int, epoch: int, seq: int, last: bool) -> bytes:
    """The header of a data datagram (the fragment follows it)."""
    flags = F_LAST if last else 0
    return _COMMON.pack(MAGIC, VERSION, T_DATA, flags, tag, src, dst, epoch) + _SEQ.pack(seq)
