"""Sans-IO rendezvous protocol: messages, their encoding, and join proofs.

Nothing here touches a socket; the server, the client and the TCP channel's
hello all drive these functions with bytes they read themselves.  That keeps
the protocol testable (and fuzzable) with byte strings alone.

Every message on the wire is::

    magic    3 bytes  b"FMR"
    version  1 byte   PROTOCOL_VERSION
    length   u32      length of the body, network order, at most ``max_body``
    body     msgpack map with a "type" field and the fields of that type

A receiver rejects a wrong magic, an unknown version, an oversize or
malformed body, an unknown type and any field of the wrong type with a
:class:`~fmi_async.errors.ProtocolError`, before allocating anything large.

Message types (requests -> answers):

* ``register`` (comm, run_id, peer, addr, proof) -> ``ok`` or ``error``
* ``lookup``   (comm, run_id, peer, timeout, proof) -> ``peer`` or ``error``
* ``hello``    (comm, run_id, peer, dst, proof): first message of a direct
  connection between two peers, so the receiver knows who is talking.

NAT traversal (see ``docs/holepunching.md``):

* ``join``     (comm, run_id, peer, initiator, responder, transport, local,
  timeout, proof) -> ``endpoint`` at once, then ``peer_endpoint`` when the
  other side joined (or ``error``).  A pairing is named by
  ``(comm, run_id, transport, initiator, responder)``.
* ``endpoint`` (public, local): the endpoint the server *observed* for this
  join (the NAT's mapping) and the local one the peer reported.
* ``peer_endpoint`` (peer, public, local, nonce, relay): the other side's
  endpoints and a per-pairing nonce both sides share; ``relay`` true when the
  server already decided ``relay`` for the pair (no punching, no ``result``).
* ``invite``   (comm, run_id, initiator, responder, transport): pushed on a
  responder's control connection so it joins a pairing it did not ask for.
* ``result``   (comm, run_id, peer, initiator, responder, transport, ok,
  proof) -> ``verdict`` (outcome ``direct`` or ``relay``): the server decides
  ``direct`` only if both sides report success, and tells both the same.
* ``relay``    (comm, run_id, peer, initiator, responder, proof) -> ``ok``,
  then the connection is spliced to the other side's relay connection.
* ``challenge`` (comm, run_id, peer, dst, nonce) and ``response`` (peer,
  proof, commit): the membership proof on every direct connection, a
  challenge-response over nonces from both sides.

Job leases (see :mod:`fmi_async.lease_record`):

* ``claim``   (comm, run_id, peer, num_peers, nonce, wait, ttl, settle,
  timeout, proof) -> ``lease`` (epoch, ttl) once all ``num_peers`` peers
  claimed, or ``error``: ``conflict`` (another job holds the name, or two
  opened it at once), ``mismatch`` (num_peers differ), ``busy`` (waited for
  another job until the timeout), ``timeout`` (peers missing).
* ``refresh`` (comm, run_id, peer, num_peers, epoch, nonce, ttl, proof) ->
  ``ok`` or ``error`` (``expired``: the lease was lost).
* ``release`` (comm, run_id, peer, epoch, nonce, proof) -> ``ok``.

Every request may carry an ``id`` which the answer echoes; a client that
pipelines several requests on one connection matches answers by it.

Proofs: when a shared secret is configured, ``proof`` is
HMAC-SHA256(secret, canonical fields) where the canonical fields are a
msgpack array that starts with the message type, so a proof for one kind of
message can never be replayed as another.  Verification uses
:func:`hmac.compare_digest`.  Later NAT traversal messages (endpoint reports,
UDP punching, pairing arbitration) are added as further types on the same
envelope; the version byte changes only if the envelope itself changes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, Literal

import msgpack

from ..errors import MessageTooLarge, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "HEADER_SIZE",
    "MAX_BODY",
    "Address",
    "Message",
    "Register",
    "Lookup",
    "Hello",
    "Join",
    "EndpointReport",
    "PeerEndpoint",
    "Invite",
    "PunchResult",
    "Verdict",
    "RelayJoin",
    "Challenge",
    "Response",
    "Claim",
    "LeaseGrant",
    "Refresh",
    "Release",
    "PeerInfo",
    "Ok",
    "Error",
    "ErrorCode",
    "Transport",
    "Outcome",
    "NONCE_LEN",
    "response_proof",
    "Decoder",
    "encode",
    "parse_header",
    "decode_body",
    "compute_proof",
    "sign",
    "verify",
]

logger = logging.getLogger(__name__)

MAGIC: Final = b"FMR"
PROTOCOL_VERSION: Final = 1
_HEADER = struct.Struct("!3sBI")
HEADER_SIZE: Final = _HEADER.size
MAX_BODY: Final = 16 * 1024
"""Default limit of one body: requests are tiny, so anything bigger is an attack or a bug."""

_MAX_NAME = 256  # comm names and run ids
_PROOF_LEN = hashlib.sha256().digest_size

Address = tuple[str, int]
ErrorCode = Literal[
    "auth",
    "timeout",
    "bad_request",
    "overloaded",
    "internal",
    "expired",
    "conflict",
    "mismatch",
    "busy",
]
_ERROR_CODES: Final = frozenset(
    (
        "auth",
        "timeout",
        "bad_request",
        "overloaded",
        "internal",
        "expired",
        "conflict",
        "mismatch",
        "busy",
    )
)
Transport = Literal["tcp", "udp"]
Outcome = Literal["direct", "relay"]
NONCE_LEN: Final = 16


# ---------------------------------------------------------------- field checks


def _str(body: dict[str, Any], name: str, limit: int = _MAX_NAME) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"field {name!r} is longer than {limit} characters")
    return value


def _uint(body: dict[str, Any], name: str, limit: int = 2**31 - 1) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ProtocolError(f"field {name!r} must be an integer in [0, {limit}], got {value!r}")
    return value


def _opt_uint(body: dict[str, Any], name: str) -> int | None:
    return None if body.get(name) is None else _uint(body, name, 2**32 - 1)


def _addr(body: dict[str, Any], name: str) -> Address:
    value = body.get(name)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or len(value[0]) > _MAX_NAME
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 <= value[1] <= 65535
    ):
        raise ProtocolError(f"field {name!r} must be [host, port], got {value!r}")
    return (value[0], value[1])


def _proof(body: dict[str, Any]) -> bytes | None:
    value = body.get("proof")
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) != _PROOF_LEN:
        raise ProtocolError(f"field 'proof' must be {_PROOF_LEN} bytes")
    return value


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be true or false, got {value!r}")
    return value


def _nonce(body: dict[str, Any], name: str = "nonce") -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes) or len(value) != NONCE_LEN:
        raise ProtocolError(f"field {name!r} must be {NONCE_LEN} bytes")
    return value


def _transport(body: dict[str, Any]) -> Transport:
    value = body.get("transport")
    if value not in ("tcp", "udp"):
        raise ProtocolError(f"field 'transport' must be 'tcp' or 'udp', got {value!r}")
    return "tcp" if value == "tcp" else "udp"


def _opt_addr(body: dict[str, Any], name: str) -> Address | None:
    return None if body.get(name) is None else _addr(body, name)


def _opt_seconds(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 86400.0:
        raise ProtocolError(f"field {name!r} must be seconds in [0, 86400], got {value!r}")
    return float(value)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``id`` lets answers be matched to requests."""

    TYPE: ClassVar[str] = ""

    def to_body(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Message:
        raise NotImplementedError

    def signed_fields(self) -> list[Any] | None:
        """The fields a proof covers, or None for messages that carry no proof."""
        return None


@dataclass(frozen=True, slots=True)
class Register(Message):
    """A peer announces the address other peers can reach it at.

    ``local`` (optional) is the local endpoint of the connection carrying
    this register.  When it differs from the endpoint the server observes,
    an address translator sits in between (the comparison STUN makes, RFC
    5389 section 1), and the server marks the entry as behind NAT so that
    others pair with it by hole punching instead of connecting to ``addr``.
    """

    TYPE: ClassVar[str] = "register"
    comm: str
    run_id: str
    peer: int
    addr: Address
    proof: bytes | None = None
    id: int | None = None
    local: Address | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "addr": list(self.addr),
            "proof": self.proof,
            "id": self.id,
            "local": None if self.local is None else list(self.local),
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Register:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _addr(body, "addr"),
            _proof(body),
            _opt_uint(body, "id"),
            _opt_addr(body, "local"),
        )

    def signed_fields(self) -> list[Any]:
        local = None if self.local is None else list(self.local)
        return [self.TYPE, self.comm, self.run_id, self.peer, self.addr[0], self.addr[1], local]


@dataclass(frozen=True, slots=True)
class Lookup(Message):
    """Ask for a peer's address; the server waits up to ``timeout`` for it to register."""

    TYPE: ClassVar[str] = "lookup"
    comm: str
    run_id: str
    peer: int
    timeout: float | None = None
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "timeout": self.timeout,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Lookup:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _opt_seconds(body, "timeout"),
            _proof(body),
            _opt_uint(body, "id"),
        )

    def signed_fields(self) -> list[Any]:
        # The timeout is not covered: it only bounds how long this caller waits.
        return [self.TYPE, self.comm, self.run_id, self.peer]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on a direct peer-to-peer connection: who is talking, to whom."""

    TYPE: ClassVar[str] = "hello"
    comm: str
    run_id: str
    peer: int
    dst: int
    proof: bytes | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "dst": self.dst,
            "proof": self.proof,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Hello:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _uint(body, "dst"),
            _proof(body),
        )

    def signed_fields(self) -> list[Any]:
        return [self.TYPE, self.comm, self.run_id, self.peer, self.dst]


@dataclass(frozen=True, slots=True)
class PeerInfo(Message):
    """Answer to a lookup: where ``peer`` can be reached; ``nat`` if only by punching."""

    TYPE: ClassVar[str] = "peer"
    peer: int
    addr: Address
    id: int | None = None
    nat: bool = False

    def to_body(self) -> dict[str, Any]:
        return {"peer": self.peer, "addr": list(self.addr), "id": self.id, "nat": self.nat}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PeerInfo:
        nat = False if body.get("nat") is None else _bool(body, "nat")
        return cls(_uint(body, "peer"), _addr(body, "addr"), _opt_uint(body, "id"), nat)


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """Answer to a register.

    ``observed`` is the address the server saw the request come from (the
    public endpoint behind a NAT); ``ttl`` is how long the registration lives
    unless renewed.
    """

    TYPE: ClassVar[str] = "ok"
    observed: Address | None = None
    ttl: float | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        observed = list(self.observed) if self.observed is not None else None
        return {"observed": observed, "ttl": self.ttl, "id": self.id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Ok:
        observed = None if body.get("observed") is None else _addr(body, "observed")
        return cls(observed, _opt_seconds(body, "ttl"), _opt_uint(body, "id"))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request failed; ``message`` tells the user what to fix."""

    TYPE: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "id": self.id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Error:
        code = _str(body, "code", 32)
        if code not in _ERROR_CODES:
            raise ProtocolError(f"unknown error code {code!r}")
        message = _str(body, "message", 4096)
        return cls(code, message, _opt_uint(body, "id"))  # type: ignore[arg-type]


# ---------------------------------------------------------------- NAT traversal


@dataclass(frozen=True, slots=True)
class Join(Message):
    """Join a pairing: ``peer`` is the initiator or the responder of it.

    ``local`` is the endpoint this peer's socket has on its own side of any
    NAT; the server adds the endpoint it *observes*, which is the NAT's
    mapping (RFC 4787 section 4.1, RFC 5382 section 4.1), and is the one
    the other side must aim at.  Never the local port number: a NAT that
    does not preserve ports changes it.
    """

    TYPE: ClassVar[str] = "join"
    comm: str
    run_id: str
    peer: int
    initiator: int
    responder: int
    transport: Transport
    local: Address
    timeout: float | None = None
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "initiator": self.initiator,
            "responder": self.responder,
            "transport": self.transport,
            "local": list(self.local),
            "timeout": self.timeout,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Join:
        msg = cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _uint(body, "initiator"),
            _uint(body, "responder"),
            _transport(body),
            _addr(body, "local"),
            _opt_seconds(body, "timeout"),
            _proof(body),
            _opt_uint(body, "id"),
        )
        if msg.peer not in (msg.initiator, msg.responder) or msg.initiator == msg.responder:
            raise ProtocolError("a join's peer must be either the initiator or the responder")
        return msg

    def signed_fields(self) -> list[Any]:
        return [
            self.TYPE,
            self.comm,
            self.run_id,
            self.peer,
            self.initiator,
            self.responder,
            self.transport,
            self.local[0],
            self.local[1],
        ]


@dataclass(frozen=True, slots=True)
class EndpointReport(Message):
    """Answer to a join: what the server observed (``public``) and what the peer said."""

    TYPE: ClassVar[str] = "endpoint"
    public: Address
    local: Address
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {"public": list(self.public), "local": list(self.local), "id": self.id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> EndpointReport:
        return cls(_addr(body, "public"), _addr(body, "local"), _opt_uint(body, "id"))


@dataclass(frozen=True, slots=True)
class PeerEndpoint(Message):
    """Both sides joined: the other side's observed and local endpoints.

    ``nonce`` is drawn by the server per pairing and sent to both, so UDP
    punch probes of one pairing cannot be replayed in another.  ``relay``
    (TCP only) says the server already decided ``relay`` for this pairing,
    because it decided so for the same two peers a short while ago: both
    sides skip punching and open the relay at once.
    """

    TYPE: ClassVar[str] = "peer_endpoint"
    peer: int
    public: Address
    local: Address
    nonce: bytes
    id: int | None = None
    relay: bool = False

    def to_body(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "public": list(self.public),
            "local": list(self.local),
            "nonce": self.nonce,
            "id": self.id,
            "relay": self.relay,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PeerEndpoint:
        return cls(
            _uint(body, "peer"),
            _addr(body, "public"),
            _addr(body, "local"),
            _nonce(body),
            _opt_uint(body, "id"),
            False if body.get("relay") is None else _bool(body, "relay"),
        )


@dataclass(frozen=True, slots=True)
class Invite(Message):
    """Server push on a control connection: join the pairing ``initiator`` opened."""

    TYPE: ClassVar[str] = "invite"
    comm: str
    run_id: str
    initiator: int
    responder: int
    transport: Transport

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "initiator": self.initiator,
            "responder": self.responder,
            "transport": self.transport,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Invite:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "initiator"),
            _uint(body, "responder"),
            _transport(body),
        )


@dataclass(frozen=True, slots=True)
class PunchResult(Message):
    """How punching went on this side; the server arbitrates both reports."""

    TYPE: ClassVar[str] = "result"
    comm: str
    run_id: str
    peer: int
    initiator: int
    responder: int
    transport: Transport
    ok: bool
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "initiator": self.initiator,
            "responder": self.responder,
            "transport": self.transport,
            "ok": self.ok,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> PunchResult:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _uint(body, "initiator"),
            _uint(body, "responder"),
            _transport(body),
            _bool(body, "ok"),
            _proof(body),
            _opt_uint(body, "id"),
        )

    def signed_fields(self) -> list[Any]:
        return [
            self.TYPE,
            self.comm,
            self.run_id,
            self.peer,
            self.initiator,
            self.responder,
            self.transport,
            self.ok,
        ]


@dataclass(frozen=True, slots=True)
class Verdict(Message):
    """The server's arbitrated outcome of a pairing; both sides get the same."""

    TYPE: ClassVar[str] = "verdict"
    outcome: Outcome
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "id": self.id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Verdict:
        outcome = body.get("outcome")
        if outcome not in ("direct", "relay"):
            raise ProtocolError(f"field 'outcome' must be 'direct' or 'relay', got {outcome!r}")
        return cls("direct" if outcome == "direct" else "relay", _opt_uint(body, "id"))


@dataclass(frozen=True, slots=True)
class RelayJoin(Message):
    """Open this side of a relayed pairing; answered by ``ok``, then spliced."""

    TYPE: ClassVar[str] = "relay"
    comm: str
    run_id: str
    peer: int
    initiator: int
    responder: int
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "initiator": self.initiator,
            "responder": self.responder,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RelayJoin:
        msg = cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _uint(body, "initiator"),
            _uint(body, "responder"),
            _proof(body),
            _opt_uint(body, "id"),
        )
        if msg.peer not in (msg.initiator, msg.responder) or msg.initiator == msg.responder:
            raise ProtocolError("a relay's peer must be either the initiator or the responder")
        return msg

    def signed_fields(self) -> list[Any]:
        return [self.TYPE, self.comm, self.run_id, self.peer, self.initiator, self.responder]


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """First message each side sends on a direct (or relayed) peer connection."""

    TYPE: ClassVar[str] = "challenge"
    comm: str
    run_id: str
    peer: int
    dst: int
    nonce: bytes

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "dst": self.dst,
            "nonce": self.nonce,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Challenge:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _uint(body, "dst"),
            _nonce(body),
        )


@dataclass(frozen=True, slots=True)
class Response(Message):
    """Proof of the shared secret over both sides' nonces; ``commit`` picks this connection."""

    TYPE: ClassVar[str] = "response"
    peer: int
    proof: bytes
    commit: bool = False

    def to_body(self) -> dict[str, Any]:
        return {"peer": self.peer, "proof": self.proof, "commit": self.commit}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Response:
        proof = _proof(body)
        if proof is None:
            raise ProtocolError("a response must carry a proof")
        return cls(_uint(body, "peer"), proof, _bool(body, "commit"))


# ---------------------------------------------------------------- job leases


_MAX_EPOCH = 64


def _num_peers(body: dict[str, Any], peer: int) -> int:
    num_peers = _uint(body, "num_peers")
    if not peer < num_peers:
        raise ProtocolError(f"peer {peer} is out of range for num_peers={num_peers}")
    return num_peers


@dataclass(frozen=True, slots=True)
class Claim(Message):
    """Claim ``peer``'s slot in the job lease of ``(comm, run_id)``.

    The server answers once all ``num_peers`` peers claimed (or the claim
    failed), waiting up to ``timeout``.  ``nonce`` identifies this
    communicator instance, ``wait`` asks to wait for another job holding the
    name to close, ``ttl`` is the lease's lifetime unless refreshed,
    ``settle`` the seconds a formed group waits for stragglers.
    """

    TYPE: ClassVar[str] = "claim"
    comm: str
    run_id: str
    peer: int
    num_peers: int
    nonce: bytes
    wait: bool = False
    ttl: float | None = None
    settle: float | None = None
    timeout: float | None = None
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "num_peers": self.num_peers,
            "nonce": self.nonce,
            "wait": self.wait,
            "ttl": self.ttl,
            "settle": self.settle,
            "timeout": self.timeout,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Claim:
        peer = _uint(body, "peer")
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            peer,
            _num_peers(body, peer),
            _nonce(body),
            _bool(body, "wait"),
            _opt_seconds(body, "ttl"),
            _opt_seconds(body, "settle"),
            _opt_seconds(body, "timeout"),
            _proof(body),
            _opt_uint(body, "id"),
        )

    def signed_fields(self) -> list[Any]:
        # The timeout is not covered: it only bounds how long this caller waits.
        return [
            self.TYPE,
            self.comm,
            self.run_id,
            self.peer,
            self.num_peers,
            self.nonce,
            self.wait,
            self.ttl,
            self.settle,
        ]


@dataclass(frozen=True, slots=True)
class LeaseGrant(Message):
    """Answer to a claim: the group formed; ``epoch`` is the job's, ``ttl`` the lease's."""

    TYPE: ClassVar[str] = "lease"
    epoch: str
    ttl: float
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ttl": self.ttl, "id": self.id}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> LeaseGrant:
        epoch = _str(body, "epoch", _MAX_EPOCH)
        ttl = _opt_seconds(body, "ttl")
        if not epoch or ttl is None or ttl <= 0:
            raise ProtocolError("a lease needs a non-empty epoch and a positive ttl")
        return cls(epoch, ttl, _opt_uint(body, "id"))


@dataclass(frozen=True, slots=True)
class Refresh(Message):
    """Keep the lease of ``epoch`` alive; restores it on a server that lost it."""

    TYPE: ClassVar[str] = "refresh"
    comm: str
    run_id: str
    peer: int
    num_peers: int
    epoch: str
    nonce: bytes
    ttl: float | None = None
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "num_peers": self.num_peers,
            "epoch": self.epoch,
            "nonce": self.nonce,
            "ttl": self.ttl,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Refresh:
        peer = _uint(body, "peer")
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            peer,
            _num_peers(body, peer),
            _str(body, "epoch", _MAX_EPOCH),
            _nonce(body),
            _opt_seconds(body, "ttl"),
            _proof(body),
            _opt_uint(body, "id"),
        )

    def signed_fields(self) -> list[Any]:
        return [
            self.TYPE,
            self.comm,
            self.run_id,
            self.peer,
            self.num_peers,
            self.epoch,
            self.nonce,
            self.ttl,
        ]


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Give ``peer``'s slot back; an empty ``epoch`` matches the slot this nonce holds."""

    TYPE: ClassVar[str] = "release"
    comm: str
    run_id: str
    peer: int
    epoch: str
    nonce: bytes
    proof: bytes | None = None
    id: int | None = None

    def to_body(self) -> dict[str, Any]:
        return {
            "comm": self.comm,
            "run_id": self.run_id,
            "peer": self.peer,
            "epoch": self.epoch,
            "nonce": self.nonce,
            "proof": self.proof,
            "id": self.id,
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Release:
        return cls(
            _str(body, "comm"),
            _str(body, "run_id"),
            _uint(body, "peer"),
            _str(body, "epoch", _MAX_EPOCH),
            _nonce(body),
            _proof(body),
            _opt_uint(body, "id"),
        )

    def signed_fields(self) -> list[Any]:
        return [self.TYPE, self.comm, self.run_id, self.peer, self.epoch, self.nonce]


_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Lookup,
        Hello,
        PeerInfo,
        Ok,
        Error,
        Join,
        EndpointReport,
        PeerEndpoint,
        Invite,
        PunchResult,
        Verdict,
        RelayJoin,
        Challenge,
        Response,
        Claim,
        LeaseGrant,
        Refresh,
        Release,
    )
}


# ---------------------------------------------------------------- encoding


def encode(message: Message, max_body: int = MAX_BODY) -> bytes:
    """The bytes of one message, envelope included."""
    body = {"type": message.TYPE, **message.to_body()}
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_body:
        raise MessageTooLarge(f"{message.TYPE} message of {len(data)} bytes exceeds {max_body}")
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, len(data)) + data


def parse_header(data: bytes | bytearray | memoryview, max_body: int = MAX_BODY) -> int:
    """Validate the fixed envelope header and return the body length."""
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
    """Parse one body (without envelope) into a message."""
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types on garbage input
        raise ProtocolError(f"malformed rendezvous message: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise ProtocolError("a rendezvous message body must be a map")
    kind = body.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown rendezvous message type {kind!r}")
    return cls.from_body(body)


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


# ---------------------------------------------------------------- proofs


def compute_proof(secret: bytes, fields: list[Any]) -> bytes:
    """HMAC-SHA256 of the canonical msgpack encoding of ``fields``."""
    data = msgpack.packb(fields, use_bin_type=True)
    return hmac.new(secret, data, hashlib.sha256).digest()


def sign(message: Message, secret: bytes | None) -> Message:
    """``message`` with its proof filled in (unchanged without a secret or proof field)."""
    fields = message.signed_fields()
    if secret is None or fields is None:
        return message
    return replace(message, proof=compute_proof(secret, fields))  # type: ignore[call-arg]


def verify(message: Message, secret: bytes | None) -> bool:
    """True if ``message`` may be trusted under ``secret`` (anything goes without one)."""
    if secret is None:
        return True
    fields = message.signed_fields()
    proof = getattr(message, "proof", None)
    if fields is None or proof is None:
        return False
    return hmac.compare_digest(proof, compute_proof(secret, fields))


def response_proof(
    secret: bytes | None,
    comm: str,
    run_id: str,
    sender: int,
    receiver: int,
    receiver_nonce: bytes,
    sender_nonce: bytes,
) -> bytes:
    """The proof ``sender`` shows ``receiver`` on a direct connection.

    It covers the communicator, the run, both identities and the nonces of
    *both* sides, so it can neither be replayed on another connection nor be
    reflected back at its author.  Without a secret the key is empty: the
    proof then only shows the comm name and run id, which is all such a run
    has to check.
    """
    fields = ["response", comm, run_id, sender, receiver, receiver_nonce, sender_nonce]
    return compute_proof(secret or b"", fields)
