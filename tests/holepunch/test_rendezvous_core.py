"""The rendezvous server's sans-IO core, driven with plain messages: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from fmi_async.errors import (
    ArgumentError,
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
    ConfigError,
    JobConflictError,
    JobConflictTimeout,
    JobMismatchError,
    LeaseLostError,
    ProtocolError,
)
from fmi_async.holepunch import protocol as p
from fmi_async.holepunch.error_codes import ERRORS, RendezvousExpired, server_error
from fmi_async.holepunch.server_actions import (
    Action,
    Close,
    Link,
    Send,
    ServerLimits,
    Splice,
    StartTimer,
    StopTimer,
)
from fmi_async.holepunch.server_core import RendezvousCore

SECRET = b"core-secret"
A = Link("tcp", ("198.51.100.1", 40001), 1)
B = Link("tcp", ("198.51.100.2", 40002), 2)
C = Link("tcp", ("198.51.100.3", 40003), 3)


def core(secret: bytes | None = SECRET, **limits: float) -> RendezvousCore:
    return RendezvousCore(secret, insecure=secret is None, limits=ServerLimits(**limits))  # type: ignore[arg-type]


def sent(actions: list[Action], link: Link | None = None) -> list[p.Message]:
    return [a.message for a in actions if isinstance(a, Send) and link in (None, a.link)]


def timers(actions: list[Action]) -> list[StartTimer]:
    return [a for a in actions if isinstance(a, StartTimer)]


def signed(message: p.Message) -> p.Message:
    return p.sign(message, SECRET)


# ---------------------------------------------------------------- the wire stays as it was


def test_wire_bytes_and_proofs_are_those_of_this_protocol_version() -> None:
    """Golden values: a change here breaks servers and clients of this version."""
    register = p.Register("c", "r", 1, ("10.0.0.1", 4242), id=7, local=("10.0.0.2", 5))
    assert p.encode(register).hex() == (
        "464d52010000005388a474797065a87265676973746572a4636f6d6da163a672756e5f6964a172a4"
        "7065657201a46164647292a831302e302e302e31cd1092a570726f6f66c0a2696407a56c6f63616c"
        "92a831302e302e302e3205"
    )
    join = p.sign(p.Join("c", "r", 1, 1, 2, "tcp", ("10.0.0.2", 4000)), b"k")
    assert isinstance(join, p.Join) and join.proof is not None
    assert join.proof.hex() == ("647c137e72be34e6dbbc13ae216751a836ef94658abbbbddff7d7d128ae064b5")


# ---------------------------------------------------------------- registry and lookups


def test_lookup_waits_for_the_register_and_is_answered_on_its_own_link() -> None:
    srv = core()
    actions = srv.handle(signed(p.Lookup("W", "r", 1, 5.0, id=3)), A, now=0.0)
    assert sent(actions) == [] and [t.seconds for t in timers(actions)] == [5.0]
    assert srv.pending == 1 and srv.waiting(A)
    token = timers(actions)[0].token
    actions = srv.handle(signed(p.Register("W", "r", 1, ("0.0.0.0", 7000), id=9)), B, now=1.0)
    # the registrant hears ok with what the server observed; the waiting lookup its answer
    assert sent(actions, B) == [p.Ok(B.observed, srv.registry.ttl, 9)]
    assert sent(actions, A) == [p.PeerInfo(1, ("198.51.100.2", 7000), 3)]  # host as observed
    assert StopTimer(token) in actions
    assert srv.pending == 0 and not srv.waiting(A) and len(srv.waits) == 0
    assert srv.timer(token, now=6.0) == []  # a stopped timer that fires anyway changes nothing


def test_lookup_times_out_with_an_error_naming_the_peer() -> None:
    srv = core(max_lookup_timeout=2.0)
    [start] = timers(srv.handle(signed(p.Lookup("W", "r", 4, 30.0, id=1)), A, now=0.0))
    assert start.seconds == 2.0  # capped by the server
    [answer] = sent(srv.timer(start.token, now=2.0))
    assert isinstance(answer, p.Error) and answer.code == "timeout" and answer.id == 1
    assert "peer 4 of communicator 'W'" in answer.message and srv.pending == 0


def test_bounded_pending_lookups() -> None:
    srv = core(max_pending=1)
    srv.handle(signed(p.Lookup("W", "r", 1)), A, now=0.0)
    [answer] = sent(srv.handle(signed(p.Lookup("W", "r", 2)), B, now=0.0))
    assert isinstance(answer, p.Error) and answer.code == "overloaded"
    assert "lookups waiting" in answer.message


def test_requests_without_a_valid_proof_are_refused_and_their_link_closed() -> None:
    srv = core()
    for message in (p.Register("W", "r", 1, ("h", 1)), p.sign(p.Lookup("W", "r", 1), b"guess")):
        actions = srv.handle(message, A, now=0.0)
        [answer] = sent(actions)
        assert isinstance(answer, p.Error) and answer.code == "auth"
        assert Close(A) in actions
    assert len(srv.registry) == 0 and srv.pending == 0


def test_tcp_and_udp_go_through_the_same_register() -> None:
    srv = core()
    udp = Link("udp", ("203.0.113.9", 61000))
    register = signed(p.Register("W", "r", 2, ("10.0.0.2", 5000), local=("10.0.0.2", 5000)))
    [ok] = sent(srv.handle(register, udp, now=0.0))
    assert ok == p.Ok(udp.observed, srv.registry.ttl)
    # over UDP the peer is reachable where its datagrams came from; a translator sits between
    [info] = sent(srv.handle(signed(p.Lookup("W", "r", 2)), A, now=0.0))
    assert info == p.PeerInfo(2, ("203.0.113.9", 61000), nat=True)
    # what UDP does not serve is refused the same way as any request the server does not take
    [refusal] = sent(srv.handle(signed(p.Lookup("W", "r", 2)), udp, now=0.0))
    assert isinstance(refusal, p.Error) and refusal.code == "bad_request"
    [refusal] = sent(srv.handle(p.Ok(), A, now=0.0))
    assert isinstance(refusal, p.Error) and "does not accept 'ok'" in refusal.message


def test_without_a_secret_a_registration_belongs_to_its_registrant_while_it_is_there() -> None:
    srv = core(secret=None)
    for link in (A, B):
        srv.opened(link, now=0.0)
    assert sent(srv.handle(p.Register("W", "r", 1, ("h", 1)), A, now=0.0)) != []
    actions = srv.handle(p.Register("W", "r", 1, ("h", 2)), B, now=1.0)
    [answer] = sent(actions)
    assert isinstance(answer, p.Error) and answer.code == "auth" and Close(B) in actions
    assert srv.taken(("W", "r", 1), None, 1.0)
    srv.closed(A, now=2.0)
    assert not srv.taken(("W", "r", 1), None, 2.0)
    [ok] = sent(srv.handle(p.Register("W", "r", 1, ("h", 3)), B, now=2.0))
    assert isinstance(ok, p.Ok) and srv.registry.get(("W", "r", 1), 2.0) == ("h", 3)


def test_admission_evicts_the_oldest_unproven_connection() -> None:
    srv = core(max_unproven=2, max_unproven_per_source=2)
    links = [Link("tcp", ("192.0.2.1", 1000 + i), i) for i in range(3)]
    assert srv.opened(links[0], now=0.0) == [] and srv.opened(links[1], now=0.1) == []
    assert srv.opened(links[2], now=1.0) == [Close(links[0])]
    srv.handle(signed(p.Lookup("W", "r", 0, 1.0)), links[1], now=1.0)  # proves itself
    assert links[1] not in srv.unproven and links[2] in srv.unproven


# ---------------------------------------------------------------- pairing and relays


def join(peer: int, transport: p.Transport = "tcp", rid: int | None = None) -> p.Message:
    local = ("10.0.0.9", 4000 + peer)
    return signed(p.Join("W", "r", peer, 0, 1, transport, local, 10.0, id=rid))


def result(peer: int, ok: bool, transport: p.Transport = "tcp") -> p.Message:
    return signed(p.PunchResult("W", "r", peer, 0, 1, transport, ok))


def test_a_pairing_invites_tells_both_endpoints_and_arbitrates_direct() -> None:
    srv = core()
    srv.handle(signed(p.Register("W", "r", 1, ("h", 1))), C, now=0.0)  # peer 1's control link
    actions = srv.handle(join(0), A, now=0.0)
    assert sent(actions, A) == [p.EndpointReport(A.observed, ("10.0.0.9", 4000))]  # type: ignore[arg-type]
    assert sent(actions, C) == [p.Invite("W", "r", 0, 1, "tcp")]
    actions = srv.handle(join(1), B, now=0.5)
    [report, to_b] = sent(actions, B)
    assert report == p.EndpointReport(B.observed, ("10.0.0.9", 4001))  # type: ignore[arg-type]
    [to_a] = sent(actions, A)
    assert isinstance(to_a, p.PeerEndpoint) and isinstance(to_b, p.PeerEndpoint)
    assert to_a.peer == 1 and to_a.public == B.observed and to_b.public == A.observed
    assert to_a.nonce == to_b.nonce and not to_a.relay
    assert timers(srv.handle(result(0, True), A, now=1.0))  # waits for the other report
    actions = srv.handle(result(1, True), B, now=1.2)
    assert sent(actions, A) == [p.Verdict("direct")] and sent(actions, B) == [p.Verdict("direct")]
    assert len(srv.waits) == 0


def test_a_silent_side_means_relay_and_the_relay_is_spliced_once_both_open_it() -> None:
    srv = core(result_timeout=3.0)
    srv.handle(join(0), A, now=0.0)
    srv.handle(join(1), B, now=0.0)
    [wait] = timers(srv.handle(result(0, True), A, now=1.0))
    assert wait.seconds == 3.0
    assert sent(srv.timer(wait.token, now=4.0), A) == [p.Verdict("relay")]
    relay_a, relay_b = (signed(p.RelayJoin("W", "r", peer, 0, 1, id=peer)) for peer in (0, 1))
    assert timers(srv.handle(relay_a, A, now=4.1))  # waits for the other side
    actions = srv.handle(relay_b, B, now=4.2)
    assert sent(actions, A) == [p.Ok(id=0)] and sent(actions, B) == [p.Ok(id=1)]
    assert Splice(B, A) in actions and srv.relays == 1
    srv.closed(A, now=5.0)
    srv.closed(B, now=5.0)
    assert srv.relays == 0
    # without a relay verdict there is nothing to relay
    stranger = signed(p.RelayJoin("W", "r", 0, 0, 2))
    actions = srv.handle(stranger, C, now=5.0)
    assert Close(C) in actions and "no relay verdict" in sent(actions)[0].message  # type: ignore[attr-defined]


def test_a_late_result_is_told_the_pairing_expired() -> None:
    [answer] = sent(core().handle(result(0, True), A, now=0.0))
    assert isinstance(answer, p.Error) and answer.code == "expired"
    with pytest.raises(CommTimeout) as info:
        raise server_error(answer, "the server", "reporting")
    assert isinstance(info.value, LeaseLostError)  # one class for the code, whoever asked


def test_a_udp_pair_decided_relay_is_relayed_between_its_two_endpoints_only() -> None:
    srv = core()
    a, b = Link("udp", ("203.0.113.1", 5001)), Link("udp", ("203.0.113.2", 5002))
    srv.handle(join(0, "udp", rid=5), a, now=0.0)
    actions = srv.handle(join(1, "udp", rid=6), b, now=0.0)
    [endpoint] = [m for m in sent(actions, a) if isinstance(m, p.PeerEndpoint)]
    assert endpoint.id == 5  # each side's own request id
    srv.handle(result(0, False, "udp"), a, now=1.0)
    actions = srv.handle(result(1, True, "udp"), b, now=1.0)
    assert sent(actions, a) == [p.Verdict("relay")] and sent(actions, b) == [p.Verdict("relay")]
    nonce = endpoint.nonce
    assert srv.relay_target(nonce, a.observed, 10, now=2.0) == b.observed  # type: ignore[arg-type]
    assert srv.relay_target(nonce, b.observed, 10, now=2.0) == a.observed  # type: ignore[arg-type]
    assert srv.relay_target(nonce, ("203.0.113.3", 1), 10, now=2.0) is None
    assert srv.relay_target(b"x" * 16, a.observed, 10, now=2.0) is None  # type: ignore[arg-type]
    assert srv.relayed_datagrams == 2 and srv.relayed_bytes == 20


# ---------------------------------------------------------------- leases


def test_claims_are_answered_together_once_the_group_formed() -> None:
    srv = core()
    first = signed(p.Claim("W", "r", 0, 2, b"a" * 16, timeout=5.0, id=1))
    actions = srv.handle(first, A, now=0.0)
    assert timers(actions) and sent(actions) == []  # peer 1 has not claimed yet
    second = signed(p.Claim("W", "r", 1, 2, b"b" * 16, timeout=5.0, id=2))
    actions = srv.handle(second, B, now=0.1)
    [grant_a] = sent(actions, A)
    [grant_b] = sent(actions, B)
    assert isinstance(grant_a, p.LeaseGrant) and isinstance(grant_b, p.LeaseGrant)
    assert grant_a.epoch == grant_b.epoch and (grant_a.id, grant_b.id) == (1, 2)


def test_a_claim_whose_group_never_forms_times_out_and_frees_its_slot() -> None:
    srv = core()
    claim = signed(p.Claim("W", "r", 0, 2, b"a" * 16, timeout=1.0))
    wait = timers(srv.handle(claim, A, now=0.0))[-1]
    actions = srv.timer(wait.token, now=1.0)
    [answer] = sent(actions, A)
    assert (
        isinstance(answer, p.Error) and answer.code == "timeout" and "peers [1]" in answer.message
    )
    assert srv.leases.table.get(("W", "r"), 1.0) is None


# ---------------------------------------------------------------- error codes and limits


def test_every_error_code_maps_to_one_error() -> None:
    assert set(ERRORS) == set(p.ERROR_CODES)
    expected = {
        "auth": AuthenticationError,
        "timeout": CommTimeout,
        "bad_request": ProtocolError,
        "overloaded": BrokenChannelError,
        "internal": BrokenChannelError,
        "expired": RendezvousExpired,
        "conflict": JobConflictError,
        "mismatch": JobMismatchError,
        "busy": JobConflictTimeout,
    }
    for code, kind in expected.items():
        error = server_error(p.Error(code, "why"), "the server", "asking")  # type: ignore[arg-type]
        assert type(error) is kind and "the server, asking: why" in str(error)
    assert isinstance(server_error(p.Ok(), "s", "asking"), ProtocolError)


def test_limits_and_secret_are_checked() -> None:
    with pytest.raises(ArgumentError, match="ttl"):
        ServerLimits(ttl=0)
    with pytest.raises(ConfigError, match="insecure=True"):
        RendezvousCore()
    with pytest.raises(ConfigError, match="empty"):
        RendezvousCore(b"")
