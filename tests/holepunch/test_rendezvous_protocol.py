"""The sans-IO rendezvous protocol, tested with byte strings only."""

from __future__ import annotations

import struct
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmi_async.errors import MessageTooLarge, ProtocolError
from fmi_async.holepunch import protocol as p

SECRET = b"s3cret"

MESSAGES: list[p.Message] = [
    p.Register("FMI_WORLD", "run1", 3, ("10.0.0.1", 4242), id=7),
    p.Lookup("FMI_WORLD", "run1", 2, 1.5, id=8),
    p.Lookup("c", "r", 0),
    p.Hello("c", "r", 1, 0),
    p.PeerInfo(2, ("127.0.0.1", 9999), id=8),
    p.Ok(("192.0.2.1", 1234), 600.0, id=7),
    p.Ok(),
    p.Error("timeout", "peer 2 did not register", id=8),
    p.Register("c", "r", 1, ("0.0.0.0", 5), id=1, local=("10.0.0.2", 40000)),
    p.PeerInfo(1, ("192.0.2.7", 5), id=2, nat=True),
    p.Join("c", "r", 1, 1, 2, "tcp", ("10.0.0.2", 40000), 5.0, id=3),
    p.Join("c", "r", 2, 1, 2, "udp", ("10.0.0.3", 40001)),
    p.EndpointReport(("203.0.113.5", 61000), ("10.0.0.2", 40000), id=3),
    p.PeerEndpoint(2, ("198.51.100.9", 1234), ("10.1.0.2", 40001), b"n" * 16, id=3),
    p.Invite("c", "r", 1, 2, "tcp"),
    p.PunchResult("c", "r", 1, 1, 2, "tcp", True, id=4),
    p.PunchResult("c", "r", 2, 1, 2, "udp", False),
    p.Verdict("direct", id=4),
    p.Verdict("relay"),
    p.RelayJoin("c", "r", 2, 1, 2, id=5),
    p.Challenge("c", "r", 1, 2, b"x" * 16),
    p.Response(2, b"p" * 32, commit=True),
    p.Error("expired", "pairing expired"),
    p.Claim("c", "r", 1, 3, b"n" * 16, True, 30.0, 0.5, 10.0, id=9),
    p.Claim("c", "r", 0, 1, b"m" * 16),
    p.LeaseGrant("0123456789ab", 30.0, id=9),
    p.Refresh("c", "r", 2, 3, "0123456789ab", b"n" * 16, 30.0, id=10),
    p.Release("c", "r", 2, "", b"n" * 16, id=11),
    p.Error("conflict", "another live job holds it", id=9),
]


def _raw(body: object, version: int = p.PROTOCOL_VERSION, magic: bytes = p.MAGIC) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return struct.pack("!3sBI", magic, version, len(data)) + data


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE)
def test_roundtrip(message: p.Message) -> None:
    data = p.encode(message)
    assert data[:3] == p.MAGIC and data[3] == p.PROTOCOL_VERSION
    assert struct.unpack("!I", data[4:8])[0] == len(data) - p.HEADER_SIZE
    assert p.Decoder().feed(data) == [message]


def test_incremental_byte_by_byte_and_batched() -> None:
    encoded = [p.encode(m) for m in MESSAGES]
    stream = b"".join(encoded)
    boundaries = {sum(len(e) for e in encoded[: i + 1]) for i in range(len(encoded))}
    decoder = p.Decoder()
    out: list[p.Message] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        # Exactly at a message boundary the decoder holds nothing.
        assert decoder.mid_message == (i + 1 not in boundaries)
    assert out == MESSAGES
    assert not decoder.mid_message
    assert p.Decoder().feed(stream) == MESSAGES


def test_wrong_magic_and_version() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        p.Decoder().feed(_raw({"type": "ok"}, magic=b"XYZ"))
    with pytest.raises(ProtocolError, match="version 9"):
        p.Decoder().feed(_raw({"type": "ok"}, version=9))


def test_oversize_rejected_from_header_alone() -> None:
    header = struct.pack("!3sBI", p.MAGIC, p.PROTOCOL_VERSION, p.MAX_BODY + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.Decoder().feed(header)
    with pytest.raises(MessageTooLarge, match="exceeds"):
        p.encode(p.Error("internal", "x" * 4000), max_body=100)


def test_decoder_stays_failed() -> None:
    decoder = p.Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"garbage!")
    with pytest.raises(ProtocolError):
        decoder.feed(p.encode(p.Ok()))


_JOIN = {
    "type": "join",
    "comm": "c",
    "run_id": "r",
    "peer": 1,
    "initiator": 1,
    "responder": 2,
    "transport": "tcp",
    "local": ["10.0.0.2", 4000],
}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([1, 2], "must be a map"),
        ({"type": "nope"}, "unknown rendezvous message type"),
        ({"comm": "x"}, "unknown rendezvous message type"),
        ({"type": "lookup", "comm": 1, "run_id": "r", "peer": 0}, "'comm' must be a string"),
        ({"type": "lookup", "comm": "c", "run_id": "r", "peer": -1}, "'peer'"),
        ({"type": "lookup", "comm": "c", "run_id": "r", "peer": True}, "'peer'"),
        ({"type": "lookup", "comm": "c" * 300, "run_id": "r", "peer": 0}, "longer"),
        ({"type": "lookup", "comm": "c", "run_id": "r", "peer": 0, "timeout": -1}, "timeout"),
        ({"type": "register", "comm": "c", "run_id": "r", "peer": 0, "addr": ["h"]}, "addr"),
        (
            {"type": "register", "comm": "c", "run_id": "r", "peer": 0, "addr": ["h", 70000]},
            "addr",
        ),
        (
            {"type": "register", "comm": "c", "run_id": "r", "peer": 0, "addr": ["h", 1]}
            | {"proof": b"short"},
            "proof",
        ),
        ({"type": "error", "code": "weird", "message": "m"}, "error code"),
        (_JOIN | {"transport": "sctp"}, "transport"),
        (_JOIN | {"peer": 7}, "initiator or the responder"),
        (_JOIN | {"initiator": 2}, "initiator or the responder"),
        (_JOIN | {"local": ["h"]}, "local"),
        ({"type": "verdict", "outcome": "maybe"}, "outcome"),
        ({"type": "peer_endpoint", "peer": 1, "public": ["h", 1], "local": ["h", 2]}, "nonce"),
        (
            {"type": "peer_endpoint", "peer": 1, "public": ["h", 1], "local": ["h", 2]}
            | {"nonce": b"short"},
            "nonce",
        ),
        ({"type": "response", "peer": 1, "commit": True}, "proof"),
        ({"type": "response", "peer": 1, "proof": b"p" * 32, "commit": 1}, "commit"),
        (
            {"type": "result", "comm": "c", "run_id": "r", "peer": 1, "initiator": 1}
            | {"responder": 2, "transport": "tcp", "ok": "yes"},
            "'ok'",
        ),
        (
            {
                "type": "relay",
                "comm": "c",
                "run_id": "r",
                "peer": 3,
                "initiator": 1,
                "responder": 2,
            },
            "peer",
        ),
        ({"type": "peer", "peer": 1, "addr": ["h", 1], "nat": "no"}, "'nat'"),
    ],
)
def test_malformed_bodies(body: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.Decoder().feed(_raw(body))


def test_garbage_body() -> None:
    data = b"\xc1\xc1\xc1"
    with pytest.raises(ProtocolError, match="malformed"):
        p.Decoder().feed(struct.pack("!3sBI", p.MAGIC, p.PROTOCOL_VERSION, len(data)) + data)


def test_proofs() -> None:
    reg = p.Register("c", "r", 1, ("127.0.0.1", 5000))
    signed = p.sign(reg, SECRET)
    assert isinstance(signed, p.Register) and signed.proof is not None
    assert len(signed.proof) == 32
    assert p.verify(signed, SECRET)
    assert not p.verify(signed, b"other secret")
    assert not p.verify(reg, SECRET)  # missing proof
    assert p.verify(reg, None)  # no secret configured: anything goes
    # The proof covers every join field: changing any of them invalidates it.
    for tampered in (
        p.Register("c2", "r", 1, ("127.0.0.1", 5000), signed.proof),
        p.Register("c", "r2", 1, ("127.0.0.1", 5000), signed.proof),
        p.Register("c", "r", 2, ("127.0.0.1", 5000), signed.proof),
        p.Register("c", "r", 1, ("127.0.0.2", 5000), signed.proof),
        p.Register("c", "r", 1, ("127.0.0.1", 5001), signed.proof),
    ):
        assert not p.verify(tampered, SECRET)
    # A proof survives the wire.
    decoded = p.Decoder().feed(p.encode(signed))[0]
    assert p.verify(decoded, SECRET)


def test_proof_is_bound_to_the_message_type() -> None:
    lookup = p.sign(p.Lookup("c", "r", 1), SECRET)
    hello = p.Hello("c", "r", 1, 0, getattr(lookup, "proof", None))
    assert p.verify(lookup, SECRET)
    assert not p.verify(hello, SECRET)
    # Answers carry no proof; with a secret they are never "verified" joins.
    assert p.sign(p.Ok(), SECRET) == p.Ok()
    assert not p.verify(p.Ok(), SECRET)


def test_pairing_proofs_cover_every_field() -> None:
    join = p.sign(p.Join("c", "r", 1, 1, 2, "tcp", ("10.0.0.2", 4000)), SECRET)
    assert isinstance(join, p.Join) and p.verify(join, SECRET)
    assert not p.verify(join, b"wrong")
    for changes in (
        {"comm": "c2"},
        {"run_id": "r2"},
        {"responder": 3},
        {"transport": "udp"},
        {"local": ("10.0.0.2", 4001)},
    ):
        assert not p.verify(replace(join, **changes), SECRET), changes
    assert p.verify(replace(join, timeout=9.0), SECRET)  # only bounds the caller's wait
    result = p.sign(p.PunchResult("c", "r", 1, 1, 2, "tcp", True), SECRET)
    assert p.verify(result, SECRET)
    assert not p.verify(replace(result, ok=False), SECRET)  # a forged failure is caught
    relay = p.sign(p.RelayJoin("c", "r", 1, 1, 2), SECRET)
    assert p.verify(relay, SECRET) and not p.verify(replace(relay, peer=2), SECRET)
    # A join's proof cannot pass as a relay's or a result's.
    assert not p.verify(p.RelayJoin("c", "r", 1, 1, 2, join.proof), SECRET)
    register = p.sign(p.Register("c", "r", 1, ("h", 1), local=("10.0.0.2", 5)), SECRET)
    assert p.verify(register, SECRET)
    assert not p.verify(replace(register, local=("203.0.113.1", 5)), SECRET)


def test_response_proof_binds_both_nonces_and_direction() -> None:
    a, b = b"a" * 16, b"b" * 16
    proof = p.response_proof(SECRET, "c", "r", 1, 2, a, b)
    assert len(proof) == 32
    assert proof == p.response_proof(SECRET, "c", "r", 1, 2, a, b)
    others = {
        p.response_proof(SECRET, "c", "r", 2, 1, a, b),  # reflected back
        p.response_proof(SECRET, "c", "r", 1, 2, b, a),  # nonces swapped
        p.response_proof(SECRET, "c", "r", 1, 2, a, a),  # another connection
        p.response_proof(SECRET, "c", "r2", 1, 2, a, b),  # another run
        p.response_proof(b"x", "c", "r", 1, 2, a, b),  # another secret
        p.response_proof(None, "c", "r", 1, 2, a, b),  # no secret
    }
    assert proof not in others and len(others) == 6


def test_lookup_timeout_not_covered_by_proof() -> None:
    signed = p.sign(p.Lookup("c", "r", 1, 5.0), SECRET)
    assert isinstance(signed, p.Lookup)
    assert p.verify(p.Lookup("c", "r", 1, 9.0, signed.proof), SECRET)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    decoder = p.Decoder()
    try:
        decoder.feed(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 3))
def test_fuzz_valid_envelope_random_body(data: bytes, split: int) -> None:
    """Random bodies inside a valid envelope, fed in pieces."""
    stream = struct.pack("!3sBI", p.MAGIC, p.PROTOCOL_VERSION, len(data)) + data
    decoder = p.Decoder()
    try:
        for i in range(0, len(stream), split + 1):
            for message in decoder.feed(stream[i : i + split + 1]):
                assert isinstance(message, p.Message)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            "type comm run_id peer addr proof id timeout initiator responder transport local "
            "public nonce ok outcome commit nat dst code message observed".split()
        ),
        st.one_of(
            st.sampled_from([*sorted(p.MESSAGE_TYPES), "tcp", "udp", "direct", "relay"]),
            st.booleans(),
            st.integers(-(2**40), 2**40),
            st.text(max_size=20),
            st.binary(max_size=40),
            st.lists(st.one_of(st.text(max_size=5), st.integers(-5, 70000)), max_size=3),
            st.floats(allow_nan=True),
            st.none(),
        ),
    )
)
def test_fuzz_structured_bodies(body: dict[str, object]) -> None:
    """Well-formed msgpack with random field values: valid or ProtocolError, nothing else."""
    try:
        messages = p.Decoder().feed(_raw(body))
    except ProtocolError:
        return
    assert len(messages) == 1
    assert p.Decoder().feed(p.encode(messages[0])) == messages
