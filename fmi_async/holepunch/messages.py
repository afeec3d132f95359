"""The rendezvous messages, each declared once: its type name, its fields and their wire kinds.

A message is a frozen dataclass.  Each field names its *kind* in its
metadata (``comm: str = field(metadata=NAME)``): how the value travels in
the msgpack body and what a receiver accepts (:mod:`~fmi_async.holepunch.fields`),
so the encoder and the decoder (:mod:`~fmi_async.holepunch.codec`) are loops
over the fields, and no message carries code of its own to convert itself.
The model is aioice's STUN attribute table, one ``(type, name, pack,
unpack)`` row per attribute.

``TYPE`` is the name on the wire; ``SIGNED`` names the fields a proof covers
(:mod:`~fmi_async.holepunch.proofs`), in order, after the type name; a
``*`` before an address field puts its host and its port in as two items.
Messages without ``SIGNED`` carry no proof.  A field with a default may be
absent (or nil) on the wire and then takes the default, unless its kind is
strict (``BOOL``: a flag that must always be sent).  Checks across fields (a
join's peer must be one of its two sides) live in ``check``, which the
decoder calls.

To add a message: declare its class here and add it to :data:`MESSAGE_TYPES`.
The protocol's overview (who sends what, and the answers) is in
:mod:`~fmi_async.holepunch.protocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, get_args

from ..errors import ProtocolError
from .fields import (
    address,
    boolean,
    exact_bytes,
    kind,
    one_of,
    same,
    seconds,
    text,
    uint,
)

__all__ = [
    "Address",
    "ErrorCode",
    "ERROR_CODES",
    "Transport",
    "Outcome",
    "NONCE_LEN",
    "PROOF_LEN",
    "Message",
    "Register",
    "Lookup",
    "Hello",
    "PeerInfo",
    "Ok",
    "Error",
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
    "MESSAGE_TYPES",
]

logger = logging.getLogger(__name__)

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
ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(ErrorCode))
"""Every code an ``error`` may carry; what each means to a client is in ``error_codes.py``."""
Transport = Literal["tcp", "udp"]
Outcome = Literal["direct", "relay"]
NONCE_LEN: Final = 16
PROOF_LEN: Final = 32  # HMAC-SHA256
_MAX_NAME = 256  # comm names, run ids, hosts
_MAX_EPOCH = 64
_UINT_MAX = 2**31 - 1


def _code(name: str, value: Any) -> str:
    code = text(32)(name, value)
    if code not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {code!r}")
    return code


# The kinds, as dataclass field metadata: ``field(metadata=NAME)``.
NAME: Final = kind(same, text(_MAX_NAME))  # comm names and run ids
TEXT: Final = kind(same, text(4096))  # an error's explanation
EPOCH: Final = kind(same, text(_MAX_EPOCH))
UINT: Final = kind(same, uint(_UINT_MAX))  # peer ids, counts
ID: Final = kind(same, uint(2**32 - 1))  # request ids, echoed by answers
BOOL: Final = kind(same, boolean, strict=True)  # always on the wire
FLAG: Final = kind(same, boolean)  # nil or absent: the default
ADDR: Final = kind(list, address)  # [host, port]
SECONDS: Final = kind(same, seconds)
PROOF: Final = kind(same, exact_bytes(PROOF_LEN))
NONCE: Final = kind(same, exact_bytes(NONCE_LEN))
TRANSPORT: Final = kind(same, one_of("tcp", "udp"))
OUTCOME: Final = kind(same, one_of("direct", "relay"))
CODE: Final = kind(same, _code)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message; ``id``, where a message has one, matches answers to requests."""

    TYPE: ClassVar[str] = ""
    SIGNED: ClassVar[str | None] = None

    def check(self) -> None:
        """Cross-field rules the decoder enforces; raises ProtocolError."""


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
    SIGNED: ClassVar[str | None] = "comm run_id peer *addr local"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    addr: Address = field(metadata=ADDR)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)
    local: Address | None = field(default=None, metadata=ADDR)


@dataclass(frozen=True, slots=True)
class Lookup(Message):
    """Ask for a peer's address; the server waits up to ``timeout`` for it to register."""

    TYPE: ClassVar[str] = "lookup"
    # The timeout is not covered: it only bounds how long this caller waits.
    SIGNED: ClassVar[str | None] = "comm run_id peer"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    timeout: float | None = field(default=None, metadata=SECONDS)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on a direct peer-to-peer connection: who is talking, to whom."""

    TYPE: ClassVar[str] = "hello"
    SIGNED: ClassVar[str | None] = "comm run_id peer dst"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    dst: int = field(metadata=UINT)
    proof: bytes | None = field(default=None, metadata=PROOF)


@dataclass(frozen=True, slots=True)
class PeerInfo(Message):
    """Answer to a lookup: where ``peer`` can be reached; ``nat`` if only by punching."""

    TYPE: ClassVar[str] = "peer"
    peer: int = field(metadata=UINT)
    addr: Address = field(metadata=ADDR)
    id: int | None = field(default=None, metadata=ID)
    nat: bool = field(default=False, metadata=FLAG)


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """Answer to a register (and to lease refreshes, releases and relays).

    ``observed`` is the address the server saw the request come from (the
    public endpoint behind a NAT); ``ttl`` is how long the registration lives
    unless renewed.
    """

    TYPE: ClassVar[str] = "ok"
    observed: Address | None = field(default=None, metadata=ADDR)
    ttl: float | None = field(default=None, metadata=SECONDS)
    id: int | None = field(default=None, metadata=ID)


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request failed; ``message`` tells the user what to fix."""

    TYPE: ClassVar[str] = "error"
    code: ErrorCode = field(metadata=CODE)
    message: str = field(metadata=TEXT)
    id: int | None = field(default=None, metadata=ID)


# ---------------------------------------------------------------- NAT traversal


def _check_sides(kind: str, peer: int, initiator: int, responder: int) -> None:
    if peer not in (initiator, responder) or initiator == responder:
        raise ProtocolError(f"a {kind}'s peer must be either the initiator or the responder")


@dataclass(frozen=True, slots=True)
class Join(Message):
    """Join the pairing ``initiator -> responder`` over ``transport``.

    ``local`` is the endpoint this peer's socket is bound to, as it sees it.
    The server answers with what it *observed* (:class:`EndpointReport`):
    behind a NAT that is the NAT's mapping (RFC 4787 section 4.1, RFC 5382
    section 4.1), and is the one the other side must aim at.  Never the
    local port number: a NAT that does not preserve ports changes it.
    """

    TYPE: ClassVar[str] = "join"
    SIGNED: ClassVar[str | None] = "comm run_id peer initiator responder transport *local"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    initiator: int = field(metadata=UINT)
    responder: int = field(metadata=UINT)
    transport: Transport = field(metadata=TRANSPORT)
    local: Address = field(metadata=ADDR)
    timeout: float | None = field(default=None, metadata=SECONDS)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)

    def check(self) -> None:
        _check_sides("join", self.peer, self.initiator, self.responder)


@dataclass(frozen=True, slots=True)
class EndpointReport(Message):
    """Answer to a join: what the server observed (``public``) and what the peer said."""

    TYPE: ClassVar[str] = "endpoint"
    public: Address = field(metadata=ADDR)
    local: Address = field(metadata=ADDR)
    id: int | None = field(default=None, metadata=ID)


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
    peer: int = field(metadata=UINT)
    public: Address = field(metadata=ADDR)
    local: Address = field(metadata=ADDR)
    nonce: bytes = field(metadata=NONCE)
    id: int | None = field(default=None, metadata=ID)
    relay: bool = field(default=False, metadata=FLAG)


@dataclass(frozen=True, slots=True)
class Invite(Message):
    """Server push on a control connection: join the pairing ``initiator`` opened."""

    TYPE: ClassVar[str] = "invite"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    initiator: int = field(metadata=UINT)
    responder: int = field(metadata=UINT)
    transport: Transport = field(metadata=TRANSPORT)


@dataclass(frozen=True, slots=True)
class PunchResult(Message):
    """How punching went on this side; the server arbitrates both reports."""

    TYPE: ClassVar[str] = "result"
    SIGNED: ClassVar[str | None] = "comm run_id peer initiator responder transport ok"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    initiator: int = field(metadata=UINT)
    responder: int = field(metadata=UINT)
    transport: Transport = field(metadata=TRANSPORT)
    ok: bool = field(metadata=BOOL)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)


@dataclass(frozen=True, slots=True)
class Verdict(Message):
    """The server's arbitrated outcome of a pairing; both sides get the same."""

    TYPE: ClassVar[str] = "verdict"
    outcome: Outcome = field(metadata=OUTCOME)
    id: int | None = field(default=None, metadata=ID)


@dataclass(frozen=True, slots=True)
class RelayJoin(Message):
    """Open this side of a relayed pairing; answered by ``ok``, then spliced."""

    TYPE: ClassVar[str] = "relay"
    SIGNED: ClassVar[str | None] = "comm run_id peer initiator responder"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    initiator: int = field(metadata=UINT)
    responder: int = field(metadata=UINT)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)

    def check(self) -> None:
        _check_sides("relay", self.peer, self.initiator, self.responder)


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """First message each side sends on a direct (or relayed) peer connection."""

    TYPE: ClassVar[str] = "challenge"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    dst: int = field(metadata=UINT)
    nonce: bytes = field(metadata=NONCE)


@dataclass(frozen=True, slots=True)
class Response(Message):
    """Proof of the shared secret over both sides' nonces; ``commit`` picks this connection.

    Its proof is not one of :mod:`~fmi_async.holepunch.proofs`' signatures
    over the fields but :func:`~fmi_async.holepunch.proofs.response_proof`.
    """

    TYPE: ClassVar[str] = "response"
    peer: int = field(metadata=UINT)
    proof: bytes = field(metadata=PROOF)
    commit: bool = field(default=False, metadata=BOOL)


# ---------------------------------------------------------------- job leases


def _check_peer(peer: int, num_peers: int) -> None:
    if not peer < num_peers:
        raise ProtocolError(f"peer {peer} is out of range for num_peers={num_peers}")


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
    # The timeout is not covered: it only bounds how long this caller waits.
    SIGNED: ClassVar[str | None] = "comm run_id peer num_peers nonce wait ttl settle"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    num_peers: int = field(metadata=UINT)
    nonce: bytes = field(metadata=NONCE)
    wait: bool = field(default=False, metadata=BOOL)
    ttl: float | None = field(default=None, metadata=SECONDS)
    settle: float | None = field(default=None, metadata=SECONDS)
    timeout: float | None = field(default=None, metadata=SECONDS)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)

    def check(self) -> None:
        _check_peer(self.peer, self.num_peers)


@dataclass(frozen=True, slots=True)
class LeaseGrant(Message):
    """Answer to a claim: the group formed; ``epoch`` is the job's, ``ttl`` the lease's."""

    TYPE: ClassVar[str] = "lease"
    epoch: str = field(metadata=EPOCH)
    ttl: float = field(metadata=SECONDS)
    id: int | None = field(default=None, metadata=ID)

    def check(self) -> None:
        if not self.epoch or self.ttl <= 0:
            raise ProtocolError("a lease needs a non-empty epoch and a positive ttl")


@dataclass(frozen=True, slots=True)
class Refresh(Message):
    """Keep the lease of ``epoch`` alive; restores it on a server that lost it."""

    TYPE: ClassVar[str] = "refresh"
    SIGNED: ClassVar[str | None] = "comm run_id peer num_peers epoch nonce ttl"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    num_peers: int = field(metadata=UINT)
    epoch: str = field(metadata=EPOCH)
    nonce: bytes = field(metadata=NONCE)
    ttl: float | None = field(default=None, metadata=SECONDS)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)

    def check(self) -> None:
        _check_peer(self.peer, self.num_peers)


@dataclass(frozen=True, slots=True)
class Release(Message):
    """Give ``peer``'s slot back; an empty ``epoch`` matches the slot this nonce holds."""

    TYPE: ClassVar[str] = "release"
    SIGNED: ClassVar[str | None] = "comm run_id peer epoch nonce"
    comm: str = field(metadata=NAME)
    run_id: str = field(metadata=NAME)
    peer: int = field(metadata=UINT)
    epoch: str = field(metadata=EPOCH)
    nonce: bytes = field(metadata=NONCE)
    proof: bytes | None = field(default=None, metadata=PROOF)
    id: int | None = field(default=None, metadata=ID)


MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
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
"""Every message class by its wire name: the decoder's table."""
