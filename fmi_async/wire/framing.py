"""Stream framing: a ``(key, payload)`` message as bytes on a stream, and back.

Nothing here touches a socket.  Stream channels frame a message as::

    prefix  16 bytes  !4sBBHII  magic b"FMIw", version, flags, key length,
                                header length, buffer count
    key     msgpack array of str/int (the routing key)
    header  msgpack value
    lengths buffer count x !Q
    buffers raw bytes, one after another

:class:`FrameReader` parses that format incrementally.  It hands out the
memory the next bytes should be written to (``get_buffer``), which is exactly
what :class:`asyncio.BufferedProtocol` asks for: large buffers are received
straight into their final, preallocated memory.  Every length is checked
against :class:`Limits` before anything is allocated.

A frame over this peer's own limits is refused when sending with
:class:`~fmi_async.errors.MessageTooLarge`; bytes received from a peer that do
not form a valid frame (bad magic, oversized, truncated) raise
:class:`~fmi_async.errors.ProtocolError`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgpack

from ..errors import ConfigError, MessageTooLarge, ProtocolError
from .buffers import Buffer, BufferRecycler, buflen, flat
from .serialize import MAX_DEPTH_CEILING, Payload, pack_plain

__all__ = [
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
]

logger = logging.getLogger(__name__)

Key = tuple[str | int, ...]

MAGIC: Final = b"FMIw"
VERSION: Final = 1
PREFIX = struct.Struct("!4sBBHII")
LENGTH = struct.Struct("!Q")
_PREFIX_SIZE: Final = PREFIX.size
_unpack_prefix: Final = PREFIX.unpack_from


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds enforced on every frame and header before allocation."""

    max_key: int = 4096
    max_header: int = 64 * 1024 * 1024
    max_buffers: int = 65536
    max_total: int = 16 * 1024**3
    max_depth: int = 256
    """Deepest nesting of lists, tuples and dicts a value sent may have (at most
    :data:`~fmi_async.wire.serialize.MAX_DEPTH_CEILING`, msgpack's own bound)."""
    max_items: int = 16 * 1024**2
    """Most list, tuple and dict entries, counted over the whole value sent."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_depth <= MAX_DEPTH_CEILING:
            raise ConfigError(
                f"limits.max_depth must be in 1..{MAX_DEPTH_CEILING} (msgpack nests no "
                f"deeper), got {self.max_depth!r}"
            )
        if self.max_items < 1:
            raise ConfigError(f"limits.max_items must be positive, got {self.max_items!r}")

    def check_payload(
        self, header_len: int, lengths: Sequence[int], *, sending: bool = False
    ) -> None:
        """Check a message's header length and buffer lengths against these limits.

        Raises :class:`MessageTooLarge` when ``sending`` (this peer's own
        message is over its own limits), else :class:`ProtocolError` (a peer
        announced a message this side does not accept).
        """
        error: type[MessageTooLarge | ProtocolError] = MessageTooLarge if sending else ProtocolError
        if header_len > self.max_header:
            raise error(
                f"header of {header_len} bytes exceeds the limit of {self.max_header} "
                "(raise Limits.max_header if this is intended)"
            )
        if len(lengths) > self.max_buffers:
            raise error(
                f"{len(lengths)} buffers exceed the limit of {self.max_buffers} per message"
            )
        total = header_len + sum(lengths)
        if total > self.max_total:
            raise error(
                f"message of {total} bytes exceeds the limit of {self.max_total} "
                "(raise Limits.max_total if this is intended)"
            )


DEFAULT_LIMITS: Final = Limits()


_SERIALIZER_FLAGS: Final = {"msgpack": 0, "pickle": 1}
_FLAG_SERIALIZERS: Final = {v: k for k, v in _SERIALIZER_FLAGS.items()}


# Keys repeat (a tag, a collective step), so both directions are cached;
# the caches are cleared when they fill, which bounds their memory.
_KEY_CACHE_SIZE: Final = 4096
_encoded_keys: dict[Key, bytes] = {}
_decoded_keys: dict[bytes, Key] = {}


def encode_key(key: Key) -> bytes:
    """The msgpack bytes of a routing key (cached; keys repeat)."""
    packed = _encoded_keys.get(key)
    if packed is None:
        packed = pack_plain(list(key))  # str and int parts: no hook
        assert isinstance(packed, bytes)
        if len(_encoded_keys) >= _KEY_CACHE_SIZE:
            _encoded_keys.clear()
        _encoded_keys[key] = packed
    return packed


def decode_key(data: bytes) -> Key:
    """The routing key in ``data``; raises :class:`ProtocolError` if it is not one."""
    key = _decoded_keys.get(data)
    if key is None:
        key = _decode_key(data)
        if len(_decoded_keys) >= _KEY_CACHE_SIZE:
            _decoded_keys.clear()
        _decoded_keys[data] = key
    return key


def _decode_key(data: bytes) -> Key:
    try:
        key = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ProtocolError(f"malformed message key: {exc}") from exc
    if type(key) is list:
        for k in key:
            if type(k) is not str and type(k) is not int:  # bool is not an int here
                break
        else:
            return tuple(key)
    raise ProtocolError(f"message key must be an array of str/int, got {key!r}")


def encode_frame(key: Key, payload: Payload, limits: Limits = DEFAULT_LIMITS) -> list[Buffer]:
    """The buffers to write, in order, for one framed message (no data copies).

    Raises :class:`MessageTooLarge` if the key, header or buffers exceed ``limits``.
    """
    kbytes = encode_key(key)
    if len(kbytes) > limits.max_key:
        raise MessageTooLarge(f"message key of {len(kbytes)} bytes exceeds {limits.max_key}")
    header = payload.header
    flags = _SERIALIZER_FLAGS[payload.serializer]
    if not payload.buffers:  # the common small message: one bytes object
        if len(header) > limits.max_header or len(header) > limits.max_total:
            limits.check_payload(len(header), (), sending=True)
        prefix = PREFIX.pack(MAGIC, VERSION, flags, len(kbytes), len(header), 0)
        return [prefix + kbytes + header]
    lengths = [buflen(b) for b in payload.buffers]
    limits.check_payload(len(header), lengths, sending=True)
    head = b"".join(
        [
            PREFIX.pack(MAGIC, VERSION, flags, len(kbytes), len(header), len(lengths)),
            kbytes,
            header,
            b"".join(LENGTH.pack(n) for n in lengths),
        ]
    )
    return [head, *(flat(b) for b in payload.buffers if buflen(b))]


class FrameReader:
    """Incremental parser of framed messages, written for ``BufferedProtocol``.

    Call :meth:`get_buffer` for the memory to receive into, then
    :meth:`buffer_updated` with the number of bytes written; completed messages
    accumulate and are taken with :meth:`pop_frames`.  :meth:`feed` does both
    steps for bytes already in hand (tests, fuzzing).  Large out-of-band
    buffers are received directly into their own memory (see
    :func:`~fmi_async.wire.buffers.allocate`).
    """

    _STAGING = 256 * 1024
    RECYCLE_SLOTS = 2  # large buffers kept for reuse per reader
    RECYCLE_MIN = 1024 * 1024
    RECYCLE_MAX = 128 * 1024 * 1024

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._recycler = BufferRecycler(self.RECYCLE_SLOTS, self.RECYCLE_MIN, self.RECYCLE_MAX)
        self._staging = bytearray(self._STAGING)
        self._r = 0  # read position in staging
        self._w = 0  # write position in staging
        self._frames: list[tuple[Key, Payload]] = []
        self._direct = False  # next bytes go straight into _target
        self._reset_message()

    def _reset_message(self) -> None:
        self._need_body = 0
        self._body_done = False
        self._prefix: tuple[int, int, int, int] | None = None  # flags, klen, hlen, nbufs
        self._key: Key = ()
        self._header = b""
        self._lengths: list[int] = []
        self._bufs: list[memoryview] = []
        self._target: memoryview | None = None
        self._filled = 0

    @property
    def mid_frame(self) -> bool:
        """True if the bytes seen so far end inside a frame."""
        return self._prefix is not None or self._w > self._r

    def pop_frames(self) -> list[tuple[Key, Payload]]:
        """The messages completed since the last call."""
        frames, self._frames = self._frames, []
        return frames

    def get_buffer(self) -> memoryview:
        """The memory the next received bytes should be written to."""
        if self._direct:
            assert self._target is not None
            return memoryview(self._target)[self._filled :]
        if self._r == self._w:
            self._r = self._w = 0
        need = self._need_body or PREFIX.size
        if len(self._staging) - self._r < need:
            # Compact, and grow for a large header (bounded by Limits).
            data = self._staging[self._r : self._w]
            size = max(self._STAGING, need)
            self._staging = bytearray(size)
            self._staging[: len(data)] = data
            self._r, self._w = 0, len(data)
        if self._w == len(self._staging):
            # Full of a partial item smaller than `need`?  Cannot happen: grown above.
            raise ProtocolError("frame reader staging buffer overflow")
        return memoryview(self._staging)[self._w :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written to the last :meth:`get_buffer`; parse them.

        Raises :class:`ProtocolError` if they do not continue a valid frame.
        """
        if self._direct:
            self._filled += nbytes
            self._after_buffer_progress()
        else:
            self._w += nbytes
        self._parse()

    def received(self, nbytes: int) -> list[tuple[Key, Payload]]:
        """:meth:`buffer_updated` and :meth:`pop_frames` in one call (a protocol's
        receive path, once per read)."""
        if self._direct:
            self._filled += nbytes
            self._after_buffer_progress()
            self._parse()
        else:
            self._w += nbytes
            if self._prefix is not None:
                self._parse()
            else:
                while self._parse_small():  # the common read: whole small frames
                    if self._r == self._w:
                        break
                else:
                    self._parse()
        frames, self._frames = self._frames, []
        return frames

    def feed(self, data: Buffer) -> list[tuple[Key, Payload]]:
        """Parse bytes already in hand; the messages they complete.

        Raises :class:`ProtocolError` if they do not form valid frames.
        """
        view = flat(data)
        while view.nbytes:
            dest = self.get_buffer()
            n = min(dest.nbytes, view.nbytes)
            dest[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)
        return self.pop_frames()

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self.mid_frame:
            raise ProtocolError("stream ended in the middle of a frame (truncated message)")

    # -- parsing ------------------------------------------------------------

    def _avail(self) -> int:
        return self._w - self._r

    def _parse(self) -> None:
        while not self._direct:
            if self._prefix is None:
                while self._parse_small():
                    if self._r == self._w:
                        return  # all taken (the common case: one small frame per read)
                if self._avail() < PREFIX.size:
                    return
                self._parse_prefix()
            elif self._need_body >= 0 and not self._body_done:
                if self._avail() < self._need_body:
                    return
                self._parse_body()
            elif len(self._bufs) < len(self._lengths):
                if not self._fill_buffer():
                    return
            else:
                self._complete()

    def _parse_small(self) -> bool:
        """Take one whole frame without out-of-band buffers in one step, if staged.

        The common small message skips the state machine; anything else (a
        partial frame, buffers, a value the checks reject) returns False and
        goes the long way, which raises the precise error."""
        r, staging = self._r, self._staging
        if self._w - r < _PREFIX_SIZE:
            return False
        magic, version, flags, klen, hlen, nbufs = _unpack_prefix(staging, r)
        end = r + _PREFIX_SIZE + klen + hlen
        limits = self._limits
        if (
            nbufs
            or end > self._w
            or magic != MAGIC
            or version != VERSION
            or klen > limits.max_key
            or hlen > limits.max_header
            or hlen > limits.max_total
            or flags not in _FLAG_SERIALIZERS
        ):
            return False
        k = r + _PREFIX_SIZE
        key = decode_key(bytes(staging[k : k + klen]))
        header = bytes(staging[k + klen : end])
        self._r = end
        self._frames.append((key, Payload(header, (), _FLAG_SERIALIZERS[flags])))
        return True

    def _parse_prefix(self) -> None:
        magic, version, flags, klen, hlen, nbufs = PREFIX.unpack_from(self._staging, self._r)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}; is the peer an fmi-async peer?")
        if version != VERSION:
            raise ProtocolError(f"frame version {version}, this side speaks {VERSION}")
        if flags not in _FLAG_SERIALIZERS:
            raise ProtocolError(f"unknown frame flags {flags}")
        if klen > self._limits.max_key:
            raise ProtocolError(f"key of {klen} bytes exceeds {self._limits.max_key}")
        if hlen > self._limits.max_header:
            raise ProtocolError(
                f"header of {hlen} bytes exceeds the limit of {self._limits.max_header}"
            )
        if nbufs > self._limits.max_buffers:
            raise ProtocolError(f"{nbufs} buffers exceed the limit of {self._limits.max_buffers}")
        self._r += PREFIX.size
        self._prefix = (flags, klen, hlen, nbufs)
        self._need_body = klen + hlen + LENGTH.size * nbufs

    def _parse_body(self) -> None:
        assert self._prefix is not None
        _, klen, hlen, nbufs = self._prefix
        r = self._r
        self._key = decode_key(bytes(self._staging[r : r + klen]))
        self._header = bytes(self._staging[r + klen : r + klen + hlen])
        off = r + klen + hlen
        lengths = [
            LENGTH.unpack_from(self._staging, off + LENGTH.size * i)[0] for i in range(nbufs)
        ]
        self._r += self._need_body
        self._need_body = 0
        self._body_done = True
        self._limits.check_payload(hlen, lengths)
        self._lengths = lengths

    def _fill_buffer(self) -> bool:
        """Move staged bytes into the current buffer; False when more must arrive."""
        if self._target is None:
            self._target = self._recycler.allocate(self._lengths[len(self._bufs)])
            self._filled = 0
        take = min(self._avail(), len(self._target) - self._filled)
        if take:
            end = self._filled + take
            self._target[self._filled : end] = memoryview(self._staging)[self._r : self._r + take]
            self._r += take
            self._filled = end
        if self._filled == len(self._target):
            self._bufs.append(self._target)
            self._target = None
            return True
        # Staging is drained; the rest of this buffer is received in place.
        self._direct = True
        return False

    def _after_buffer_progress(self) -> None:
        assert self._target is not None
        if self._filled == len(self._target):
            self._bufs.append(self._target)
            self._target = None
            self._direct = False

    def _complete(self) -> None:
        assert self._prefix is not None
        serializer = _FLAG_SERIALIZERS[self._prefix[0]]
        self._frames.append((self._key, Payload(self._header, tuple(self._bufs), serializer)))
        self._reset_message()
