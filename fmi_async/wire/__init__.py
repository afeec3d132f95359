"""Sans-IO serialization and stream framing.

Nothing here touches a socket.  :func:`dumps` turns a Python value into a
:class:`Payload`: a small msgpack *header* plus a list of raw *buffers*.  numpy
arrays (and large ``bytes``) travel out-of-band as buffers, so their data is
never copied into the header.  :func:`loads` is the inverse.

Stream channels frame a ``(key, payload)`` message as::

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
"""

from __future__ import annotations

import pickle
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np

from .errors import ProtocolError, SerializationError

__all__ = [
    "Buffer",
    "Key",
    "Limits",
    "Payload",
    "FrameReader",
    "BufferRecycler",
    "dumps",
    "loads",
    "encode_frame",
    "encode_key",
    "decode_key",
    "SERIALIZERS",
]

Buffer = bytes | bytearray | memoryview
Key = tuple[str | int, ...]

MAGIC: Final = b"FMIw"
VERSION: Final = 1
PREFIX = struct.Struct("!4sBBHII")
LENGTH = struct.Struct("!Q")
_PREFIX_SIZE: Final = PREFIX.size
_unpack_prefix: Final = PREFIX.unpack_from
SERIALIZERS: Final = ("msgpack", "pickle")

# msgpack extension codes used by the msgpack serializer.
_EXT_NDARRAY: Final = 1
_EXT_NPSCALAR: Final = 2
_EXT_TUPLE: Final = 3
_EXT_OOB_BYTES: Final = 4
_EXT_BIGINT: Final = 5
_EXT_COMPLEX: Final = 6

# bytes at least this long travel out-of-band instead of inside the header.
OOB_BYTES_THRESHOLD: Final = 4096


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds enforced on every frame and header before allocation."""

    max_key: int = 4096
    max_header: int = 64 * 1024 * 1024
    max_buffers: int = 65536
    max_total: int = 16 * 1024**3

    def check_payload(self, header_len: int, lengths: Sequence[int]) -> None:
        if header_len > self.max_header:
            raise ProtocolError(
                f"header of {header_len} bytes exceeds the limit of {self.max_header} "
                "(raise Limits.max_header if this is intended)"
            )
        if len(lengths) > self.max_buffers:
            raise ProtocolError(
                f"{len(lengths)} buffers exceed the limit of {self.max_buffers} per message"
            )
        total = header_len + sum(lengths)
        if total > self.max_total:
            raise ProtocolError(
                f"message of {total} bytes exceeds the limit of {self.max_total} "
                "(raise Limits.max_total if this is intended)"
            )


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class Payload:
    """A serialized value: msgpack/pickle header plus out-of-band buffers."""

    header: bytes
    buffers: tuple[Buffer, ...] = ()
    serializer: str = "msgpack"

    @property
    def nbytes(self) -> int:
        if not self.buffers:
            return len(self.header)
        return len(self.header) + sum(_buflen(b) for b in self.buffers)

    def copy(self, recycler: BufferRecycler | None = None) -> Payload:
        """A payload that owns its memory (the sender may reuse its arrays);
        large buffers are copied into ``recycler``'s memory when one is given."""
        if recycler is None:
            return Payload(self.header, tuple(bytearray(b) for b in self.buffers), self.serializer)
        return Payload(self.header, tuple(recycler.copy(b) for b in self.buffers), self.serializer)


def _buflen(buf: Buffer) -> int:
    return memoryview(buf).nbytes


def _flat(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


# ---------------------------------------------------------------- serialization


def dumps(value: Any, serializer: str = "msgpack") -> Payload:
    """Serialize ``value``; raises :class:`SerializationError` for what cannot travel."""
    if serializer == "msgpack":
        return _dumps_msgpack(value)
    if serializer == "pickle":
        return _dumps_pickle(value)
    raise SerializationError(f"unknown serializer {serializer!r}; use one of {SERIALIZERS}")


def loads(payload: Payload) -> Any:
    """Deserialize a payload; malformed input raises :class:`ProtocolError`."""
    if payload.serializer == "msgpack":
        return _loads_msgpack(payload)
    if payload.serializer == "pickle":
        return _loads_pickle(payload)
    raise ProtocolError(f"unknown serializer {payload.serializer!r}")


class _OOB:
    """Marks a large bytes-like value that must travel out-of-band."""

    __slots__ = ("buf",)

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf


def _mark_large_bytes(value: Any) -> Any:
    """Wrap large bytes-like values (msgpack would inline them) in :class:`_OOB`.

    Containers are rebuilt only where something inside them changed.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        if memoryview(value).nbytes >= OOB_BYTES_THRESHOLD or not isinstance(value, bytes):
            return _OOB(value)
        return value
    if isinstance(value, list):
        items = [_mark_large_bytes(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=False)) else value
    if isinstance(value, tuple):
        items = [_mark_large_bytes(v) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=False)):
            return tuple(items)
        return value
    if isinstance(value, dict):
        pairs = {k: _mark_large_bytes(v) for k, v in value.items()}
        return pairs if any(pairs[k] is not v for k, v in value.items()) else value
    return value


_SCALARS: Final = frozenset({str, float, bool, type(None)})


def _dumps_msgpack(value: Any) -> Payload:
    kind = type(value)
    if (
        kind in _SCALARS
        or (kind is int and -(2**63) <= value < 2**64)
        or (kind is bytes and len(value) < OOB_BYTES_THRESHOLD)
    ):  # the common small value: nothing to mark, nothing out of band
        try:
            return Payload(msgpack.packb(value, use_bin_type=True), (), "msgpack")
        except ValueError:  # a lone surrogate in a str: the long way explains it
            pass
    buffers: list[Buffer] = []
    value = _mark_large_bytes(value)

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise SerializationError(
                    "numpy arrays of dtype object cannot travel with the msgpack serializer; "
                    "use a numeric dtype or serializer='pickle'"
                )
            arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
            dtype: Any = arr.dtype.descr if arr.dtype.fields is not None else arr.dtype.str
            buffers.append(_flat(arr.data) if arr.nbytes else b"")
            meta = [dtype, list(arr.shape), len(buffers) - 1]
            return msgpack.ExtType(_EXT_NDARRAY, _pack(meta))
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise SerializationError(f"numpy object scalar {obj!r} cannot travel")
            return msgpack.ExtType(_EXT_NPSCALAR, _pack([obj.dtype.str, obj.tobytes()]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, _pack(list(obj)))
        if isinstance(obj, list):
            return list(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):
            return msgpack.ExtType(_EXT_BIGINT, str(int(obj)).encode())
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, complex):
            return msgpack.ExtType(_EXT_COMPLEX, _pack([obj.real, obj.imag]))
        if isinstance(obj, _OOB):
            buffers.append(_flat(obj.buf))
            return msgpack.ExtType(_EXT_OOB_BYTES, _pack(len(buffers) - 1))
        raise SerializationError(
            f"values of type {type(obj).__name__} cannot travel with the msgpack serializer; "
            "send None, bool, int, float, complex, str, bytes, list, tuple, dict or numpy "
            "values, or pass serializer='pickle'"
        )

    def _pack(obj: Any) -> bytes:
        packed: bytes = msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True)
        return packed

    try:
        header = _pack(value)
    except SerializationError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot serialize {type(value).__name__}: {exc}") from exc
    return Payload(header, tuple(buffers), "msgpack")


def _loads_msgpack(payload: Payload) -> Any:
    ext_hook = _NO_BUFFER_HOOK if not payload.buffers else _ExtDecoder(payload.buffers)
    try:
        return msgpack.unpackb(
            payload.header, ext_hook=ext_hook, raw=False, strict_map_key=False, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types on garbage input
        raise ProtocolError(f"malformed message header: {type(exc).__name__}: {exc}") from exc


class _ExtDecoder:
    """The msgpack extension decoder for a frame with these out-of-band buffers.

    An object, not nested closures: closures that call each other form a
    reference cycle, which would keep every received buffer alive until the
    garbage collector runs instead of until its last user lets go.
    """

    __slots__ = ("buffers",)

    def __init__(self, buffers: tuple[Buffer, ...]) -> None:
        self.buffers = buffers

    def __call__(self, code: int, data: bytes) -> Any:
        _unpack, _buffer = self._unpack, self._buffer
        if code == _EXT_NDARRAY:
            dtype, shape, index = _unpack(data)
            buf = _buffer(index)
            dt = np.dtype([tuple(f) for f in dtype] if isinstance(dtype, list) else dtype)
            if dt.hasobject:
                raise ProtocolError("object dtype in a msgpack frame")
            count = 1
            for s in shape:
                count *= int(s)
            if count * dt.itemsize != _buflen(buf):
                raise ProtocolError(
                    f"array of shape {tuple(shape)} and dtype {dt} needs "
                    f"{count * dt.itemsize} bytes, buffer has {_buflen(buf)}"
                )
            if count == 0:
                return np.empty(tuple(shape), dtype=dt)
            if memoryview(buf).readonly:
                buf = bytearray(buf)
            return np.frombuffer(buf, dtype=dt).reshape(tuple(shape))
        if code == _EXT_NPSCALAR:
            dtype, raw = _unpack(data)
            dt = np.dtype(dtype)
            if dt.hasobject or len(raw) != dt.itemsize:
                raise ProtocolError("malformed numpy scalar")
            return np.frombuffer(raw, dtype=dt)[0]
        if code == _EXT_TUPLE:
            return tuple(_unpack(data))
        if code == _EXT_OOB_BYTES:
            return bytes(_buffer(_unpack(data)))
        if code == _EXT_BIGINT:
            return int(data.decode())
        if code == _EXT_COMPLEX:
            real, imag = _unpack(data)
            return complex(real, imag)
        raise ProtocolError(f"unknown msgpack extension code {code}")

    def _buffer(self, index: Any) -> Buffer:
        buffers = self.buffers
        if not isinstance(index, int) or not 0 <= index < len(buffers):
            raise ProtocolError(f"header refers to buffer {index!r}; frame has {len(buffers)}")
        return buffers[index]

    def _unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self, raw=False, strict_map_key=False, use_list=True)


_NO_BUFFER_HOOK: Final = _ExtDecoder(())


def _dumps_pickle(value: Any) -> Payload:
    buffers: list[Buffer] = []

    def callback(buf: pickle.PickleBuffer) -> None:
        buffers.append(buf.raw())

    try:
        header = pickle.dumps(value, protocol=5, buffer_callback=callback)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__name__}: {exc}") from exc
    return Payload(header, tuple(buffers), "pickle")


def _loads_pickle(payload: Payload) -> Any:
    try:
        return pickle.loads(
            payload.header,
            buffers=[bytearray(b) if memoryview(b).readonly else b for b in payload.buffers],
        )
    except Exception as exc:
        raise ProtocolError(f"malformed pickle message: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- keys and frames

_SERIALIZER_FLAGS: Final = {"msgpack": 0, "pickle": 1}
_FLAG_SERIALIZERS: Final = {v: k for k, v in _SERIALIZER_FLAGS.items()}


# Keys repeat (a tag, a collective step), so both directions are cached;
# the caches are cleared when they fill, which bounds their memory.
_KEY_CACHE_SIZE: Final = 4096
_encoded_keys: dict[Key, bytes] = {}
_decoded_keys: dict[bytes, Key] = {}


def encode_key(key: Key) -> bytes:
    packed = _encoded_keys.get(key)
    if packed is None:
        packed = msgpack.packb(list(key), use_bin_type=True)
        assert isinstance(packed, bytes)
        if len(_encoded_keys) >= _KEY_CACHE_SIZE:
            _encoded_keys.clear()
        _encoded_keys[key] = packed
    return packed


def decode_key(data: bytes) -> Key:
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
    if not isinstance(key, list) or not all(
        isinstance(k, (str, int)) and not isinstance(k, bool) for k in key
    ):
        raise ProtocolError(f"message key must be an array of str/int, got {key!r}")
    return tuple(key)


def encode_frame(key: Key, payload: Payload, limits: Limits = DEFAULT_LIMITS) -> list[Buffer]:
    """The buffers to write, in order, for one framed message (no data copies)."""
    kbytes = encode_key(key)
    if len(kbytes) > limits.max_key:
        raise ProtocolError(f"message key of {len(kbytes)} bytes exceeds {limits.max_key}")
    header = payload.header
    flags = _SERIALIZER_FLAGS[payload.serializer]
    if not payload.buffers:  # the common small message: one bytes object
        if len(header) > limits.max_header or len(header) > limits.max_total:
            limits.check_payload(len(header), ())
        prefix = PREFIX.pack(MAGIC, VERSION, flags, len(kbytes), len(header), 0)
        return [prefix + kbytes + header]
    lengths = [_buflen(b) for b in payload.buffers]
    limits.check_payload(len(header), lengths)
    head = b"".join(
        [
            PREFIX.pack(MAGIC, VERSION, flags, len(kbytes), len(header), len(lengths)),
            kbytes,
            header,
            b"".join(LENGTH.pack(n) for n in lengths),
        ]
    )
    return [head, *(_flat(b) for b in payload.buffers if _buflen(b))]


def _allocate(nbytes: int) -> memoryview:
    """Writable memory for one received buffer, *not* zero-filled.

    ``bytearray(n)`` writes n zero bytes first, which for a 64 MiB array costs
    as much as receiving it; ``numpy.empty`` only reserves the pages, and the
    kernel fills them once, with the received data.
    """
    return np.empty(nbytes, dtype=np.uint8).data.cast("B")


_OWN_REFERENCES: Final = 3
_COUNTS_REFERENCES: Final = sys.implementation.name == "cpython"  # exact counts, no tracing GC


class BufferRecycler:
    """Reuses the memory of large received buffers that nobody holds any more.

    Receiving into new memory costs a page fault per page on first touch,
    which on some virtual machines is slower than the network copy itself.  A
    training loop receives arrays of the same size again and again, so the
    last few large buffers are kept here and handed out again once the only
    reference left to one is ours: every array, view or memoryview made from
    a buffer holds a reference to it, so a count of one means that no value a
    user can reach still uses that memory.
    """

    def __init__(
        self, slots: int = 2, smallest: int = 1024 * 1024, largest: int = 128 * 1024 * 1024
    ) -> None:
        self._slots = slots
        self._smallest = smallest
        self._largest = largest
        self._pool: list[np.ndarray[Any, Any]] = []

    def allocate(self, nbytes: int) -> memoryview:
        if not (_COUNTS_REFERENCES and self._slots and self._smallest <= nbytes <= self._largest):
            return _allocate(nbytes)
        for i in range(len(self._pool)):  # not enumerate: its tuple would hold a reference
            arr = self._pool[i]
            # Ours: the pool's list, `arr` and getrefcount's argument.
            if arr.nbytes == nbytes and sys.getrefcount(arr) <= _OWN_REFERENCES:
                del self._pool[i]
                self._pool.append(arr)  # most recently used last
                return arr.data.cast("B")
        arr = np.empty(nbytes, dtype=np.uint8)
        self._pool.append(arr)
        if len(self._pool) > self._slots:
            del self._pool[0]  # the least recently used goes back to the allocator
        return arr.data.cast("B")

    def copy(self, buf: Buffer) -> Buffer:
        """A copy of ``buf`` in memory of this recycler (a bytearray when small)."""
        view = _flat(buf)
        if view.nbytes < self._smallest:
            return bytearray(view)
        out = self.allocate(view.nbytes)
        out[:] = view
        return out


class FrameReader:
    """Incremental parser of framed messages, written for ``BufferedProtocol``.

    Call :meth:`get_buffer` for the memory to receive into, then
    :meth:`buffer_updated` with the number of bytes written; completed messages
    accumulate and are taken with :meth:`pop_frames`.  :meth:`feed` does both
    steps for bytes already in hand (tests, fuzzing).  Large out-of-band
    buffers are received directly into their own memory (see :func:`_allocate`).
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
        return self._prefix is not None or self._w > self._r

    def pop_frames(self) -> list[tuple[Key, Payload]]:
        frames, self._frames = self._frames, []
        return frames

    def get_buffer(self) -> memoryview:
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
        if self._direct:
            self._filled += nbytes
            self._after_buffer_progress()
        else:
            self._w += nbytes
        self._parse()

    def feed(self, data: Buffer) -> list[tuple[Key, Payload]]:
        view = _flat(data)
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
                    pass
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
