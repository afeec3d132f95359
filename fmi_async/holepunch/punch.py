"""TCP hole punching, the membership handshake, and the relay fallback.

:func:`pair_tcp` opens one authenticated byte stream from ``initiator`` to
``responder``, both of which call it (the responder because the server
invited it).  The steps, each with a deadline:

1. **Join.**  Connect to the rendezvous server from a fresh local port and
   send a ``join``.  The server answers with the endpoint it *observed*:
   behind a NAT that is the NAT's mapping of our port, which may have another
   number (RFC 4787 section 4.1 / RFC 5382 section 4.1; TCPunch assumed the
   number is kept).  When the other side has joined too, the server sends its
   observed (public) and local endpoints.
2. **Punch.**  Listen on the local port the rendezvous connection uses, and
   race ``connect()`` attempts from that same port to the peer's public
   endpoint and, for two peers behind the same NAT, its local endpoint,
   against ``accept()`` (TCP simultaneous open, RFC 5128 section 3.4; the
   outgoing SYNs open our NAT's filter for the peer, RFC 5382 section 5).
   Attempts are bounded in number, backed off, and stop at the punch
   deadline.
3. **Prove membership** on every connection that opens (:func:`authenticate`):
   a stranger who reaches the punched port cannot answer the challenge and is
   dropped before it can send a frame.  The initiator *commits* to the first
   connection that passes, so both sides end up with the same one.
4. **Arbitrate.**  Each side reports whether it got a committed connection;
   the server answers ``direct`` only if both did, otherwise ``relay``, and
   both get the same verdict.  When the server relayed the same two peers
   (either direction) lately, it says so in ``peer_endpoint`` to both, and
   steps 2 to 4 are skipped.
5. **Relay** (if so decided): both open a connection to the server, which
   splices them; the membership handshake runs end to end over it.

The result is a plain connected socket for ``loop.create_connection(sock=)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
    FMIError,
    ProtocolError,
)
from . import protocol as p
from .client import RendezvousClient
from .error_codes import server_error
from .net import Address, Listener, Network, close_socket, read_message, send_message
from .proofs import Handshake, remember_handshake
from .retry import retry_pairing

__all__ = ["Membership", "PairResult", "authenticate", "pair_tcp"]

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 40  # connect attempts per candidate endpoint and pairing
_FIRST_BACKOFF = 0.01
_MAX_BACKOFF = 0.25


@dataclass(frozen=True)
class Membership:
    """What a peer proves it belongs to: the communicator, the run, the secret."""

    comm: str
    run_id: str
    secret: bytes | None

    def __repr__(self) -> str:  # never show the secret
        return f"Membership({self.comm!r}, {self.run_id!r})"


@dataclass
class PairResult:
    """An authenticated stream to the other peer and how it is carried."""

    sock: socket.socket
    outcome: p.Outcome
    public: Address | None = None  # this side's endpoint as the server saw it
    peer_public: Address | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- membership handshake


async def authenticate(
    sock: socket.socket,
    member: Membership,
    me: int,
    *,
    committer: bool,
    other: int | None,
    deadline: float,
    valid_peer: Callable[[int], bool] = lambda peer: True,
    may_commit: Callable[[], bool] = lambda: True,
) -> int:
    """Challenge-response on a fresh connection; returns the other peer's id.

    The committer (the side that will write frames) speaks first::

        C -> R  challenge(C, R, nonce_c)
        R -> C  challenge(R, C, nonce_r), response(proof_r)
        C -> R  response(proof_c, commit)

    Each proof is HMAC(secret, comm, run, sender, receiver, both nonces)
    (:func:`~fmi_async.holepunch.protocol.response_proof`), so nothing can
    be replayed from another connection or reflected.  ``other`` is None
    where the responder does not know who connects (a listening socket);
    ``may_commit`` lets a committer with several candidate connections commit
    to exactly one.
    """
    what = "peer" if other is None else f"peer {other}"
    if committer:
        assert other is not None
        mine = secrets.token_bytes(p.NONCE_LEN)
        hello = p.Challenge(member.comm, member.run_id, me, other, mine)
        await send_message(sock, hello, deadline, what)
        challenge = await read_message(sock, deadline, what, _HANDSHAKE_MAX)
        _check_challenge(challenge, member, me, other, valid_peer)
        assert isinstance(challenge, p.Challenge)
        answer = await read_message(sock, deadline, what, _HANDSHAKE_MAX)
        expected = p.response_proof(
            member.secret, member.comm, member.run_id, other, me, mine, challenge.nonce
        )
        _check_response(answer, other, expected)
        if not may_commit():
            raise BrokenChannelError(f"another connection to peer {other} was chosen")
        proof = p.response_proof(
            member.secret, member.comm, member.run_id, me, other, challenge.nonce, mine
        )
        await send_message(sock, p.Response(me, proof, commit=True), deadline, what)
        remember_handshake(sock, Handshake(me, other, mine, challenge.nonce))
        return other
    challenge = await read_message(sock, deadline, what, _HANDSHAKE_MAX)
    _check_challenge(challenge, member, me, other, valid_peer)
    assert isinstance(challenge, p.Challenge)
    peer = challenge.peer
    mine = secrets.token_bytes(p.NONCE_LEN)
    proof = p.response_proof(
        member.secret, member.comm, member.run_id, me, peer, challenge.nonce, mine
    )
    loop = asyncio.get_running_loop()
    data = p.encode(p.Challenge(member.comm, member.run_id, me, peer, mine)) + p.encode(
        p.Response(me, proof)
    )
    try:
        async with asyncio.timeout_at(deadline):
            await loop.sock_sendall(sock, data)
    except TimeoutError:
        raise CommTimeout(f"could not answer peer {peer}'s challenge in time") from None
    except OSError as exc:
        raise BrokenChannelError(f"connection from peer {peer} broke: {exc}") from exc
    answer = await read_message(sock, deadline, f"peer {peer}", _HANDSHAKE_MAX)
    expected = p.response_proof(
        member.secret, member.comm, member.run_id, peer, me, mine, challenge.nonce
    )
    _check_response(answer, peer, expected)
    assert isinstance(answer, p.Response)
    if not answer.commit:
        raise ProtocolError(f"peer {peer} proved itself but did not commit to the connection")
    remember_handshake(sock, Handshake(peer, me, challenge.nonce, mine))
    return peer


_HANDSHAKE_MAX = 1024  # challenge and response are tiny; allocate nothing big for strangers


def _check_challenge(
    message: p.Message,
    member: Membership,
    me: int,
    other: int | None,
    valid_peer: Callable[[int], bool],
) -> None:
    if not isinstance(message, p.Challenge):
        raise ProtocolError(f"expected a challenge, got {message.TYPE!r}")
    if message.comm != member.comm or message.run_id != member.run_id:
        raise AuthenticationError(
            f"challenge for communicator {message.comm!r} run {message.run_id}, this is "
            f"{member.comm!r} run {member.run_id}"
        )
    if message.dst != me:
        raise AuthenticationError(f"challenge addressed to peer {message.dst}, this is peer {me}")
    if (other is not None and message.peer != other) or message.peer == me:
        raise AuthenticationError(f"challenge from peer {message.peer}, expected peer {other}")
    if not valid_peer(message.peer):
        raise AuthenticationError(f"challenge from peer {message.peer}, not a peer of this run")


def _check_response(message: p.Message, other: int, expected: bytes) -> None:
    if not isinstance(message, p.Response):
        raise ProtocolError(f"expected a response, got {message.TYPE!r}")
    if message.peer != other or not hmac.compare_digest(message.proof, expected):
        raise AuthenticationError(
            f"peer {other} failed the membership proof; does it use the same security.secret?"
        )


# ---------------------------------------------------------------- pairing


async def pair_tcp(
    net: Network,
    server: Address,
    member: Membership,
    me: int,
    initiator: int,
    responder: int,
    *,
    join_timeout: float,
    punch_timeout: float,
    step_timeout: float,
) -> PairResult:
    """Open the authenticated stream ``initiator -> responder`` (see the module doc).

    ``join_timeout`` bounds the wait for the other side to join,
    ``punch_timeout`` the punching itself, ``step_timeout`` each round trip
    with the server and each handshake.  Raises
    :class:`~fmi_async.errors.BrokenChannelError` when the server cannot be
    reached, what :mod:`~fmi_async.holepunch.error_codes` maps a refusal to
    (:class:`~fmi_async.errors.CommTimeout` when the other side never
    joins), and the membership handshake's errors.

    The initiator pairs again while the server cannot be reached (see
    :func:`~fmi_async.holepunch.retry.retry_pairing`); the responder does
    not: the initiator's new join invites it again.
    """
    once = functools.partial(_pair_tcp_once, net, server, member, me, initiator, responder)
    if me != initiator:
        return await once(join_timeout, punch_timeout, step_timeout)
    client = RendezvousClient(server[0], server[1], member.secret, timeout=step_timeout, net=net)
    return await retry_pairing(
        client, member.comm, member.run_id, responder,
        lambda join: once(join, punch_timeout, step_timeout),
        join_timeout, join_timeout + punch_timeout,
    )  # fmt: skip


async def _pair_tcp_once(
    net: Network,
    server: Address,
    member: Membership,
    me: int,
    initiator: int,
    responder: int,
    join_timeout: float,
    punch_timeout: float,
    step_timeout: float,
) -> PairResult:
    """One attempt of :func:`pair_tcp`; raises the same."""
    other = responder if me == initiator else initiator
    committer = me == initiator
    where = f"the rendezvous server at {server[0]}:{server[1]}"
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    sock, local = await _connect_server(net, server, step_timeout, where)
    listener: Listener | None = None
    try:
        listener = await net.listen(local[1])
        join = p.sign(
            p.Join(
                member.comm,
                member.run_id,
                me,
                initiator,
                responder,
                "tcp",
                local,
                join_timeout,
            ),
            member.secret,
        )
        deadline = loop.time() + step_timeout
        await send_message(sock, join, deadline, where)
        report = await read_message(sock, deadline, where)
        if not isinstance(report, p.EndpointReport):
            raise server_error(report, where, f"joining the pairing {initiator}->{responder}")
        answer = await read_message(sock, loop.time() + join_timeout + step_timeout, where)
        if not isinstance(answer, p.PeerEndpoint) or answer.peer != other:
            raise server_error(answer, where, f"joining the pairing {initiator}->{responder}")
        candidates = [answer.public]
        if answer.local != answer.public:
            candidates.append(answer.local)  # same private network: no NAT in between
        logger.debug(
            "peer %d: pairing %d->%d, we are %s:%d (local %s:%d), peer %d at %s%s",
            me, initiator, responder, *report.public, *local, other, candidates,
            "; the server relays this pair already" if answer.relay else "",
        )  # fmt: skip
        winner: socket.socket | None = None
        outcome: p.Outcome = "relay"  # the server's verdict when answer.relay: no punching
        if not answer.relay:
            winner = await _punch(
                net,
                listener,
                local[1],
                candidates,
                member,
                me,
                other,
                committer,
                loop.time() + punch_timeout,
                step_timeout,
            )
            listener.close()
            listener = None
            result = p.sign(
                p.PunchResult(
                    member.comm, member.run_id, me, initiator, responder, "tcp", winner is not None
                ),
                member.secret,
            )
            deadline = loop.time() + punch_timeout + step_timeout
            try:
                await send_message(sock, result, deadline, where)
                verdict = await read_message(sock, deadline, where)
                if not isinstance(verdict, p.Verdict):
                    raise server_error(verdict, where, f"reporting the punch with peer {other}")
            except BaseException:
                if winner is not None:
                    close_socket(winner, reset=True)
                raise
            outcome = verdict.outcome
    finally:
        if listener is not None:
            listener.close()
        close_socket(sock)
    if outcome == "direct":
        assert winner is not None
        seconds = time.perf_counter() - started
        return PairResult(winner, "direct", report.public, answer.public, seconds)
    if winner is not None:
        close_socket(winner, reset=True)
    relayed = await _relay(net, server, member, me, initiator, responder, step_timeout, where)
    seconds = time.perf_counter() - started
    return PairResult(relayed, "relay", report.public, answer.public, seconds)


async def _connect_server(
    net: Network, server: Address, timeout: float, where: str
) -> tuple[socket.socket, Address]:
    try:
        return await net.connect(server, timeout=timeout)
    except TimeoutError:
        raise BrokenChannelError(
            f"cannot reach {where}: no answer within {timeout:.3g}s; check backends.TCP.host/"
            "port and that `fmi rendezvous` runs there"
        ) from None
    except OSError as exc:
        raise BrokenChannelError(
            f"cannot reach {where}: {exc.strerror or exc}; check backends.TCP.host/port and "
            "that `fmi rendezvous` runs there"
        ) from exc


async def _punch(
    net: Network,
    listener: Listener,
    local_port: int,
    candidates: list[Address],
    member: Membership,
    me: int,
    other: int,
    committer: bool,
    deadline: float,
    step_timeout: float,
) -> socket.socket | None:
    """Race connects from ``local_port`` against accepts; the committed stream or None."""
    loop = asyncio.get_running_loop()
    winner: asyncio.Future[socket.socket] = loop.create_future()
    # Every socket an attempt opened and no handshake has settled yet: an
    # attempt cancelled mid-handshake (or before its task first ran) leaves
    # its socket here, and the finally below closes it.
    unsettled: set[socket.socket] = set()

    async def handshake(sock: socket.socket) -> bool:
        try:
            await authenticate(
                sock,
                member,
                me,
                committer=committer,
                other=other,
                deadline=min(deadline, loop.time() + step_timeout),
                may_commit=lambda: not winner.done(),
            )
            proven = True
        except (FMIError, OSError) as exc:
            logger.debug("peer %d: punched connection to peer %d failed: %s", me, other, exc)
            proven = False
        unsettled.discard(sock)
        if not proven or winner.done():
            close_socket(sock)
            return False
        winner.set_result(sock)
        return True

    async def accept_loop() -> None:
        while not winner.done():
            try:
                sock, remote = await listener.accept(max(0.001, deadline - loop.time()))
            except (OSError, TimeoutError, FMIError) as exc:
                logger.debug("peer %d: accept failed: %s", me, exc)
                if loop.time() >= deadline:
                    return
                await asyncio.sleep(_FIRST_BACKOFF)
                continue
            logger.debug("peer %d: accepted a punched connection from %s:%d", me, *remote)
            unsettled.add(sock)
            tasks.add(asyncio.create_task(handshake(sock)))

    async def connect_loop(dst: Address) -> None:
        delay = _FIRST_BACKOFF
        for _ in range(_MAX_ATTEMPTS):
            remaining = deadline - loop.time()
            if winner.done() or remaining <= 0:
                return
            try:
                sock, _ = await net.connect(
                    dst, local_port=local_port, timeout=min(remaining, max(delay * 4, 0.2))
                )
            except (OSError, TimeoutError, FMIError) as exc:
                logger.debug("peer %d: connect to %s:%d failed: %s", me, *dst, exc)
            else:
                unsettled.add(sock)
                if await handshake(sock):
                    return
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, _MAX_BACKOFF)

    tasks: set[asyncio.Task[object]] = set()
    tasks.add(asyncio.create_task(accept_loop()))
    for dst in candidates:
        tasks.add(asyncio.create_task(connect_loop(dst)))
    returning = False
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(winner)
        returning = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in unsettled:
            close_socket(sock)
        if not returning and winner.done() and not winner.cancelled():
            close_socket(winner.result(), reset=True)  # we were cancelled: nobody takes it
    if not winner.done():
        winner.cancel()
        return None
    return winner.result()


async def _relay(
    net: Network,
    server: Address,
    member: Membership,
    me: int,
    initiator: int,
    responder: int,
    step_timeout: float,
    where: str,
) -> socket.socket:
    """Open our side of the relay at the server and prove membership across it."""
    loop = asyncio.get_running_loop()
    other = responder if me == initiator else initiator
    sock, _ = await _connect_server(net, server, step_timeout, where)
    try:
        request = p.sign(
            p.RelayJoin(member.comm, member.run_id, me, initiator, responder), member.secret
        )
        deadline = loop.time() + 2 * step_timeout
        await send_message(sock, request, deadline, where)
        answer = await read_message(sock, deadline, where)
        if not isinstance(answer, p.Ok):
            raise server_error(answer, where, f"opening the relay to peer {other}")
        await authenticate(
            sock,
            member,
            me,
            committer=me == initiator,
            other=other,
            deadline=loop.time() + step_timeout,
        )
    except BaseException:
        close_socket(sock)
        raise
    return sock
