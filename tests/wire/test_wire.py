"""Sans-IO wire format: round trips (hypothesis), framing, limits and garbage input."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fmi_async.errors import MessageTooLarge, ProtocolError, SerializationError
from fmi_async.wire import (
    PREFIX,
    BufferRecycler,
    FrameReader,
    Limits,
    Payload,
    dumps,
    encode_frame,
    loads,
)
from tests.reference import assert_same

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=6000)
    | st.complex_numbers(allow_nan=False)
)
arrays = hnp.arrays(
    dtype=st.sampled_from(
        [np.int8, np.int64, np.uint16, np.float32, np.float64, np.bool_, np.complex128]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
)
values = st.recursive(
    scalars | arrays,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=12,
)


def same(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    else:
        assert type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(values)
def test_roundtrip(value: object) -> None:
    same(loads(dumps(value)), value)


@settings(max_examples=100, deadline=None)
@given(values, st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_frames_roundtrip_in_arbitrary_pieces(value: object, cuts: list[int]) -> None:
    """A stream of frames split at arbitrary points parses to the same messages."""
    key = ("c", 7, "step", 3)
    frames = encode_frame(key, dumps(value)) + encode_frame(("u", 0), dumps([value, 1]))
    data = b"".join(bytes(memoryview(f).cast("B")) for f in frames)
    reader = FrameReader()
    got = []
    pos, i = 0, 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        got += reader.feed(data[pos : pos + n])
        pos += n
        i += 1
    reader.eof()
    assert [k for k, _ in got] == [key, ("u", 0)]
    same(loads(got[0][1]), value)
    same(loads(got[1][1]), [value, 1])


def test_numpy_arrays_travel_out_of_band() -> None:
    arr = np.arange(100_000, dtype=np.float64)
    payload = dumps({"a": arr, "b": [arr[::2]]})
    assert len(payload.header) < 200  # only metadata in the header
    assert sum(memoryview(b).nbytes for b in payload.buffers) == arr.nbytes * 3 // 2
    # The contiguous array is not copied: its buffer is the array's own memory.
    assert np.shares_memory(np.frombuffer(payload.buffers[0], dtype=np.float64), arr)
    out = loads(payload)
    assert_same(out["a"], arr)
    assert_same(out["b"][0], arr[::2])
    out["a"][0] = 1.0  # received arrays are writable


def test_structured_and_fortran_arrays() -> None:
    rec = np.zeros(3, dtype=[("x", "<i4"), ("y", "<f8")])
    rec["x"] = [1, 2, 3]
    f = np.asfortranarray(np.arange(12).reshape(3, 4))
    out = loads(dumps([rec, f]))
    assert out[0].dtype == rec.dtype and np.array_equal(out[0], rec)
    assert np.array_equal(out[1], f)


def test_numpy_scalars_keep_their_type() -> None:
    for v in (np.float32(1.5), np.int16(-3), np.uint64(2**63), np.bool_(True)):
        out = loads(dumps(v))
        assert type(out) is type(v) and out == v


@pytest.mark.parametrize("bad", [object(), {1, 2}, np.array([object()], dtype=object), lambda: 0])
def test_unserializable_values_raise_serialization_error(bad: object) -> None:
    with pytest.raises(SerializationError):
        dumps(bad)


def test_pickle_serializer_carries_arbitrary_objects_out_of_band() -> None:
    arr = np.arange(10_000)
    payload = dumps({"s": {1, 2}, "a": arr}, serializer="pickle")
    assert payload.serializer == "pickle" and payload.buffers
    out = loads(payload)
    assert out["s"] == {1, 2} and np.array_equal(out["a"], arr)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    reader = FrameReader(Limits(max_header=1 << 16, max_total=1 << 20))
    try:
        for _, payload in reader.feed(data):
            loads(payload)
        reader.eof()
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_headers_only_raise_protocol_error(data: bytes) -> None:
    for serializer in ("msgpack", "pickle"):
        try:
            loads(Payload(data, (b"\x00" * 8,), serializer))
        except ProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(values, st.data())
def test_truncated_or_corrupted_frames(value: object, data: st.DataObject) -> None:
    frames = encode_frame(("u", 1), dumps(value))
    raw = bytearray(b"".join(bytes(memoryview(f).cast("B")) for f in frames))
    cut = data.draw(st.integers(1, len(raw) - 1))
    reader = FrameReader()
    assert reader.feed(bytes(raw[:cut])) == []
    with pytest.raises(ProtocolError, match="truncated"):
        reader.eof()
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    reader = FrameReader(Limits(max_header=1 << 20, max_total=1 << 24))
    try:
        for _, payload in reader.feed(bytes(raw)):
            loads(payload)
    except ProtocolError:
        pass


def test_limits_are_enforced_before_allocation() -> None:
    reader = FrameReader(Limits(max_total=1000))
    head = PREFIX.pack(b"FMIw", 1, 0, 2, 1, 1) + b"\x91\x00" + b"\xc0" + struct.pack("!Q", 10**12)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.feed(head)
    with pytest.raises(ProtocolError, match="magic"):
        FrameReader().feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="version"):
        FrameReader().feed(PREFIX.pack(b"FMIw", 9, 0, 0, 0, 0))
    with pytest.raises(MessageTooLarge, match="limit"):
        encode_frame(("u", 0), dumps(b"x" * 2000), Limits(max_total=1000))


def test_large_buffer_is_received_in_place() -> None:
    """After the staged bytes, get_buffer points into the destination bytearray."""
    arr = np.arange(1 << 20, dtype=np.uint8)
    frames = encode_frame(("u", 0), dumps(arr))
    reader = FrameReader()
    reader.feed(frames[0])
    first = reader.get_buffer()
    first[:1000] = memoryview(frames[1])[:1000]
    reader.buffer_updated(1000)
    view = reader.get_buffer()
    assert view.nbytes == arr.nbytes - 1000  # exactly the rest of this buffer, no more
    view[:] = memoryview(frames[1])[1000:]
    reader.buffer_updated(view.nbytes)
    ((key, payload),) = reader.pop_frames()
    assert key == ("u", 0) and np.array_equal(loads(payload), arr)


def _receive(reader: FrameReader, value: object) -> object:
    """Feed one framed value through ``reader`` and decode what comes out."""
    frames = [f for buf in encode_frame(("u", 0), dumps(value)) for f in reader.feed(buf)]
    ((_, payload),) = frames
    return loads(payload)


def _address(arr: np.ndarray) -> int:  # type: ignore[type-arg]
    return int(arr.__array_interface__["data"][0])


def test_large_receive_buffers_are_reused_only_once_released() -> None:
    """Memory a received array still uses is never written again; released memory is."""
    reader = FrameReader()
    n = FrameReader.RECYCLE_MIN // 8
    first = _receive(reader, np.full(n, 1.0))
    second = _receive(reader, np.full(n, 2.0))
    view = first[::2]  # type: ignore[index]  # a view keeps the memory in use too
    del first
    third = _receive(reader, np.full(n, 3.0))
    assert isinstance(second, np.ndarray) and isinstance(third, np.ndarray)
    assert np.all(view == 1.0) and np.all(second == 2.0) and np.all(third == 3.0)
    assert len({_address(view), _address(second), _address(third)}) == 3  # all in use: new memory
    address = _address(second)
    del second
    fourth = _receive(reader, np.full(n, 4.0))
    assert isinstance(fourth, np.ndarray) and _address(fourth) == address  # released: reused
    assert np.all(fourth == 4.0) and np.all(view == 1.0) and np.all(third == 3.0)


def test_small_and_huge_receive_buffers_are_not_kept() -> None:
    reader = FrameReader()
    small = np.ones(FrameReader.RECYCLE_MIN // 8 - 1)
    got = _receive(reader, small)
    address = _address(got)  # type: ignore[arg-type]
    del got
    again = _receive(reader, small)
    assert np.array_equal(again, small)  # type: ignore[arg-type]
    assert reader._recycler._pool == []  # nothing below the size threshold is pooled
    assert address


def test_payload_copy_into_recycled_memory_is_independent_of_the_sender() -> None:
    recycler = BufferRecycler()
    arr = np.arange(FrameReader.RECYCLE_MIN // 8, dtype=np.float64)
    first = loads(dumps(arr).copy(recycler))
    arr += 1.0  # the sender reuses its array: the copy must not change
    assert np.array_equal(first, arr - 1.0)  # type: ignore[operator]
    second = loads(dumps(arr).copy(recycler))
    assert _address(first) != _address(second)  # type: ignore[arg-type]  # first still held
    address = _address(first)  # type: ignore[arg-type]
    del first
    third = loads(dumps(arr * 2).copy(recycler))
    assert _address(third) == address  # type: ignore[arg-type]  # released memory is reused
    assert np.array_equal(third, arr * 2) and np.array_equal(second, arr)  # type: ignore[arg-type]
