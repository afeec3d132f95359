"""Value serialization: a Python value to a :class:`Payload` and back.

:func:`dumps` turns a value into a small msgpack (or pickle) *header* plus a
list of raw *buffers*.  numpy arrays (and large ``bytes``) travel out-of-band
as buffers, so their data is never copied into the header.  :func:`loads` is
the inverse; malformed input (bytes a peer sent) raises :class:`ProtocolError`.

msgpack extension codes carry what msgpack has no type for: numpy arrays and
scalars, tuples, out-of-band bytes, big integers and complex numbers.

A value is checked against the sender's :class:`~fmi_async.wire.Limits`
while it is walked for large bytes, before any of it is packed: nesting
deeper than ``max_depth`` or more than ``max_items`` list, tuple and dict
entries raise :class:`SerializationError`, a header or buffers over the
frame limits :class:`~fmi_async.errors.MessageTooLarge`.  Without limits
(a collective's packing, after the call checked the value with the
configured ones) only :data:`MAX_DEPTH_CEILING` applies.  Either way a value
that would exhaust the interpreter's stack (a ``RecursionError``) is a
:class:`SerializationError`, never anything else.
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import numpy as np

from ..errors import ProtocolError, SerializationError
from .buffers import Buffer, BufferRecycler, buflen, flat

if TYPE_CHECKING:
    from .framing import Limits

__all__ = [
    "Payload",
    "dumps",
    "dumps_pair",
    "loads",
    "pair_prefix",
    "SERIALIZERS",
    "OOB_BYTES_THRESHOLD",
    "MAX_DEPTH_CEILING",
]

logger = logging.getLogger(__name__)

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

MAX_DEPTH_CEILING: Final = 500
"""Deepest nesting any value may have: msgpack's packer refuses more than 511
levels, and a tuple level costs the hook two Python frames of the stack."""


@dataclass(frozen=True, slots=True)
class Payload:
    """A serialized value: msgpack/pickle header plus out-of-band buffers."""

    header: bytes
    buffers: tuple[Buffer, ...] = ()
    serializer: str = "msgpack"

    @property
    def nbytes(self) -> int:
        """Header and buffers together, in bytes."""
        if not self.buffers:
            return len(self.header)
        return len(self.header) + sum(buflen(b) for b in self.buffers)

    def copy(self, recycler: BufferRecycler | None = None) -> Payload:
        """A payload that owns its memory (the sender may reuse its arrays);
        large buffers are copied into ``recycler``'s memory when one is given."""
        if recycler is None:
            return Payload(self.header, tuple(bytearray(b) for b in self.buffers), self.serializer)
        return Payload(self.header, tuple(recycler.copy(b) for b in self.buffers), self.serializer)


def dumps(value: Any, serializer: str = "msgpack", limits: Limits | None = None) -> Payload:
    """Serialize ``value``, checked against ``limits`` (see the module doc).

    Raises :class:`SerializationError` for what cannot travel (a type the
    serializer has no form for, nesting deeper than ``limits.max_depth``,
    more entries than ``limits.max_items``) and
    :class:`~fmi_async.errors.MessageTooLarge` for a header or buffers over
    the frame limits.
    """
    if serializer == "msgpack":
        payload = _dumps_msgpack(value, limits)
    elif serializer == "pickle":
        if limits is not None and not _plain(value):
            _Walk(limits.max_depth, limits.max_items).mark(value, 0)  # the same bounds
        payload = _dumps_pickle(value)
    else:
        raise SerializationError(f"unknown serializer {serializer!r}; use one of {SERIALIZERS}")
    if limits is not None and (
        len(payload.header) > limits.max_header
        or len(payload.buffers) > limits.max_buffers
        or payload.nbytes > limits.max_total
    ):  # over a limit: check_payload says which
        limits.check_payload(
            len(payload.header), [buflen(b) for b in payload.buffers], sending=True
        )
    return payload


@functools.lru_cache(maxsize=256)
def pair_prefix(first: str) -> bytes:
    """The bytes every msgpack header of the pair ``[first, value]`` starts with.

    ``dumps([first, value])`` is ``Payload(pair_prefix(first) + h, b)`` where
    ``dumps(value)`` is ``Payload(h, b)``: a msgpack array is its length and
    then its items, and the buffer numbers in ``h`` count from the value's
    first buffer, which is the pair's first too (``first`` has none).  A
    caller that sends many values under one name packs the name once.
    """
    packed: bytes = msgpack.packb(first, use_bin_type=True)
    return b"\x92" + packed


def dumps_pair(prefix: bytes, value: Any) -> Payload:
    """``dumps([first, value])`` (msgpack) given ``prefix = pair_prefix(first)``."""
    if type(value) in _SCALARS:  # the common small value, in one step
        try:
            return Payload(prefix + pack_plain(value), (), "msgpack")
        except ValueError:  # a lone surrogate in a str: the long way explains it
            pass
    body = _dumps_msgpack(value, None)
    return Payload(prefix + body.header, body.buffers, "msgpack")


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


class _Walk:
    """One walk over a value: large bytes-like values wrapped in :class:`_OOB`
    (msgpack would inline them), nesting and entries counted against limits.

    Containers are rebuilt only where something inside them changed.
    """

    __slots__ = ("items", "max_depth", "max_items")

    def __init__(self, max_depth: int, max_items: int) -> None:
        self.items = 0
        self.max_depth = max_depth
        self.max_items = max_items

    def mark(self, value: Any, depth: int) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            if memoryview(value).nbytes >= OOB_BYTES_THRESHOLD or not isinstance(value, bytes):
                return _OOB(value)
            return value
        if not isinstance(value, (list, tuple, dict)):
            return value
        if depth >= self.max_depth:
            raise SerializationError(
                f"value nested deeper than {self.max_depth} levels of lists, tuples and dicts "
                "cannot travel (limits.max_depth)"
            )
        self.items += len(value)
        if self.items > self.max_items:
            raise SerializationError(
                f"value has more than {self.max_items} list, tuple and dict entries "
                "(limits.max_items); send large collections as numpy arrays"
            )
        depth += 1
        mark, leaves = self.mark, _LEAVES  # scalars need no call
        if isinstance(value, list):
            items = [v if type(v) in leaves else mark(v, depth) for v in value]
            return items if any(a is not b for a, b in zip(items, value, strict=False)) else value
        if isinstance(value, tuple):
            items = [v if type(v) in leaves else mark(v, depth) for v in value]
            if any(a is not b for a, b in zip(items, value, strict=False)):
                return tuple(items)
            return value
        pairs = {k: v if type(v) in leaves else mark(v, depth) for k, v in value.items()}
        return pairs if any(pairs[k] is not v for k, v in value.items()) else value


_LEAVES: Final = frozenset({int, float, str, bool, type(None)})


def _plain(value: Any) -> bool:
    kind = type(value)
    return kind in _SCALARS or kind is int or kind is bytes


_SCALARS: Final = frozenset({str, float, bool, type(None)})

# One packer for values that call no hook (scalars): msgpack.packb makes a Packer
# per call, which costs several times the packing of a float.  Packing one of
# them holds the GIL throughout, and a failed pack leaves the packer empty.
pack_plain: Final = msgpack.Packer(use_bin_type=True).pack


def _dumps_msgpack(value: Any, limits: Limits | None) -> Payload:
    kind = type(value)
    if (
        kind in _SCALARS
        or (kind is int and -(2**63) <= value < 2**64)
        or (kind is bytes and len(value) < OOB_BYTES_THRESHOLD)
    ):  # the common small value: nothing to mark, nothing out of band
        try:
            return Payload(pack_plain(value), (), "msgpack")
        except ValueError:  # a lone surrogate in a str: the long way explains it
            pass
    encoder = _ExtEncoder()
    try:
        if isinstance(value, _WALKED):  # an array or a scalar has nothing to walk
            if limits is None:
                walk = _Walk(MAX_DEPTH_CEILING, _NO_ITEM_LIMIT)
            else:
                walk = _Walk(limits.max_depth, limits.max_items)
            value = walk.mark(value, 0)
        header = encoder.pack(value)
    except SerializationError:
        raise
    except RecursionError as exc:  # nesting inside what the walk does not enter (dict keys)
        raise SerializationError(
            f"cannot serialize {type(value).__name__}: nested too deeply ({exc})"
        ) from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot serialize {type(value).__name__}: {exc}") from exc
    return Payload(header, tuple(encoder.buffers), "msgpack")


_NO_ITEM_LIMIT: Final = 1 << 62
_WALKED: Final = (list, tuple, dict, bytes, bytearray, memoryview)

_HEADER_BUF: Final = 1024
"""First buffer of a header's packer, in bytes (see :meth:`_ExtEncoder.pack`)."""


class _ExtEncoder:
    """msgpack's ``default`` hook for one value; collects its out-of-band buffers.

    An object, not nested closures: a ``default`` and a ``pack`` closure that
    call each other form a reference cycle, which would keep every array sent
    alive until the garbage collector runs (a buffer pool then never sees the
    sender let go of it).
    """

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[Buffer] = []

    def pack(self, obj: Any) -> bytes:
        # A small first buffer (it grows as needed; large data travels out of
        # band): msgpack's default of 256 KiB is past malloc's mmap threshold once
        # two are live, as when an array's hook packs its description inside
        # the value's pack, and mapping fresh pages cost 15-30 us per array sent.
        packed: bytes = msgpack.packb(
            obj, default=self, strict_types=True, use_bin_type=True, buf_size=_HEADER_BUF
        )
        return packed

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise SerializationError(
                    "numpy arrays of dtype object cannot travel with the msgpack serializer; "
                    "use a numeric dtype or serializer='pickle'"
                )
            arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
            dtype: Any = arr.dtype.descr if arr.dtype.fields is not None else arr.dtype.str
            self.buffers.append(flat(arr.data) if arr.nbytes else b"")
            meta = [dtype, list(arr.shape), len(self.buffers) - 1]
            return msgpack.ExtType(_EXT_NDARRAY, self.pack(meta))
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise SerializationError(f"numpy object scalar {obj!r} cannot travel")
            return msgpack.ExtType(_EXT_NPSCALAR, self.pack([obj.dtype.str, obj.tobytes()]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_EXT_TUPLE, self.pack(list(obj)))
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
            return msgpack.ExtType(_EXT_COMPLEX, self.pack([obj.real, obj.imag]))
        if isinstance(obj, _OOB):
            self.buffers.append(flat(obj.buf))
            return msgpack.ExtType(_EXT_OOB_BYTES, self.pack(len(self.buffers) - 1))
        raise SerializationError(
            f"values of type {type(obj).__name__} cannot travel with the msgpack serializer; "
            "send None, bool, int, float, complex, str, bytes, list, tuple, dict or numpy "
            "values, or pass serializer='pickle'"
        )


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
            if count * dt.itemsize != buflen(buf):
                raise ProtocolError(
                    f"array of shape {tuple(shape)} and dtype {dt} needs "
                    f"{count * dt.itemsize} bytes, buffer has {buflen(buf)}"
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
