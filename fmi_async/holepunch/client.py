"""Client side of the rendezvous protocol.

Each request uses its own short connection, so concurrent lookups never wait
behind each other.  The one long-lived connection is a peer's *control
connection* (:class:`ControlConnection`): the register is sent on it and
renewed, which keeps it (and the NAT mapping under it) alive, and the server
pushes ``invite`` messages on it when another peer wants to punch a
connection to this one.  It reconnects by itself, with backoff, when the
server goes away (a restarted server learns the peer again that way).

Every connection is opened through a :class:`~fmi_async.holepunch.net.Network`,
so behind a simulated NAT the server observes the NAT's mapping.

A server that cannot be reached for a moment (it restarts, say) is asked
again within the caller's deadline (:mod:`~fmi_async.holepunch.retry`):
lookups and registers, and an initiator's pairing
(:func:`~fmi_async.holepunch.retry.retry_pairing`).

Every step has a deadline, and failures are mapped onto the library's errors
with messages that say what to check: the server's error answers through the
one table of :mod:`~fmi_async.holepunch.error_codes` (for example
:class:`~fmi_async.errors.CommTimeout` when the peer never registers,
:class:`~fmi_async.errors.AuthenticationError` when the secrets differ, or,
on a server without a secret, when another registrant holds this peer's
registration), and :class:`~fmi_async.errors.BrokenChannelError` when the
server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable

from ..errors import (
    ArgumentError,
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
    FMIError,
    ProtocolError,
)
from . import protocol as p
from .error_codes import server_error
from .net import Address, Network
from .retry import retry_unreachable

__all__ = ["RendezvousClient", "ControlConnection"]

logger = logging.getLogger(__name__)

_Request = p.Lookup | p.Register | p.Claim | p.Refresh | p.Release


class RendezvousClient:
    """Registers this peer and looks up others at one rendezvous server.

    ``timeout`` bounds connecting and each network round trip; a lookup waits
    additionally for as long as its own ``timeout`` argument says.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes | None = None,
        timeout: float = 10.0,
        net: Network | None = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ArgumentError(f"rendezvous port must be in 1..65535, got {port!r}")
        if timeout <= 0:
            raise ArgumentError(f"rendezvous timeout must be positive, got {timeout!r}")
        self.host = host
        self.port = port
        self.secret = secret
        self.timeout = timeout
        self.net = net
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        auth = "with secret" if self.secret else "no secret"
        return f"<RendezvousClient {self.host}:{self.port} {auth} timeout={self.timeout}>"

    @property
    def _where(self) -> str:
        return f"the rendezvous server at {self.host}:{self.port}"

    async def register(
        self,
        comm: str,
        run_id: str,
        peer: int,
        addr: Address,
        local: Address | None = None,
    ) -> p.Ok:
        """Announce that ``peer`` listens at ``addr``; returns the server's acknowledgement.

        Raises what :mod:`~fmi_async.holepunch.error_codes` maps the server's
        refusal to, and the connection's errors.
        """
        request = p.Register(
            comm, run_id, peer, (addr[0], int(addr[1])), id=next(self._ids), local=local
        )
        answer = await self._retrying(request, self.timeout, f"registering peer {peer}")
        if isinstance(answer, p.Ok):
            return answer
        raise self._error(answer, f"registering peer {peer}")

    async def lookup(
        self,
        comm: str,
        run_id: str,
        peer: int,
        timeout: float | None = None,
    ) -> Address:
        """The address of ``peer``, waiting up to ``timeout`` seconds for it to register.

        Raises :class:`~fmi_async.errors.CommTimeout` when it does not, what
        :mod:`~fmi_async.holepunch.error_codes` maps other refusals to, and
        the connection's errors.
        """
        return (await self.lookup_info(comm, run_id, peer, timeout)).addr

    async def lookup_info(
        self,
        comm: str,
        run_id: str,
        peer: int,
        timeout: float | None = None,
    ) -> p.PeerInfo:
        """Like :meth:`lookup`, with whether the peer is behind NAT; raises the same."""
        wait = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait

        async def attempt() -> p.Message:
            # Asked again after a failure: wait only for what is left.
            left = max(0.0, deadline - loop.time())
            request = p.Lookup(comm, run_id, peer, left, id=next(self._ids))
            return await self._request(request, left + self.timeout)

        answer = await retry_unreachable(attempt, deadline, self._where, f"looking up peer {peer}")
        if isinstance(answer, p.PeerInfo) and answer.peer == peer:
            return answer
        raise self._error(answer, f"looking up peer {peer}")

    async def claim(
        self,
        comm: str,
        run_id: str,
        peer: int,
        num_peers: int,
        nonce: bytes,
        *,
        wait: bool,
        ttl: float,
        settle: float,
        timeout: float,
    ) -> p.LeaseGrant:
        """Claim ``peer``'s slot in the job lease; returns once all ``num_peers`` peers have.

        The server waits up to ``timeout`` seconds.  Raises what
        :meth:`fmi_async.jobs.lease.JobLease.acquire` documents:
        :class:`~fmi_async.errors.JobConflictError`,
        :class:`~fmi_async.errors.JobConflictTimeout`,
        :class:`~fmi_async.errors.JobMismatchError`,
        :class:`~fmi_async.errors.CommTimeout`, and the connection's errors.
        """
        request = p.Claim(
            comm, run_id, peer, num_peers, nonce, wait, ttl, settle, timeout, id=next(self._ids)
        )
        answer = await self._request(request, timeout + self.timeout)
        if isinstance(answer, p.LeaseGrant):
            return answer
        raise self._error(answer, f"claiming the job lease of peer {peer}")

    async def refresh_lease(
        self,
        comm: str,
        run_id: str,
        peer: int,
        num_peers: int,
        epoch: str,
        nonce: bytes,
        ttl: float,
    ) -> None:
        """Renew the job lease of ``epoch``.

        Raises :class:`~fmi_async.errors.LeaseLostError` when another job
        took it, :class:`~fmi_async.errors.JobConflictError` or
        :class:`~fmi_async.errors.JobMismatchError` when it was poisoned, and
        the connection's errors.
        """
        request = p.Refresh(comm, run_id, peer, num_peers, epoch, nonce, ttl, id=next(self._ids))
        answer = await self._request(request, self.timeout)
        if not isinstance(answer, p.Ok):
            raise self._error(answer, f"renewing the job lease of peer {peer}")

    async def release_lease(
        self, comm: str, run_id: str, peer: int, epoch: str, nonce: bytes
    ) -> None:
        """Give ``peer``'s slot of the job lease back; raises the connection's errors."""
        request = p.Release(comm, run_id, peer, epoch, nonce, id=next(self._ids))
        answer = await self._request(request, self.timeout)
        if not isinstance(answer, p.Ok):
            raise self._error(answer, f"releasing the job lease of peer {peer}")

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Address]:
        """A connection to the server (through :attr:`net`) and its local endpoint."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.net is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    name = writer.get_extra_info("sockname")
                    local = (str(name[0]), int(name[1]))
                else:
                    sock, local = await self.net.connect(
                        (self.host, self.port), timeout=self.timeout
                    )
                    reader, writer = await asyncio.open_connection(sock=sock)
        except TimeoutError:
            raise BrokenChannelError(
                f"cannot reach {self._where}: no answer within {self.timeout:.3g}s; "
                "check backends.TCP.host/port and that `fmi rendezvous` runs there"
            ) from None
        except OSError as exc:
            raise BrokenChannelError(
                f"cannot reach {self._where}: {exc.strerror or exc}; check backends.TCP.host/"
                "port and that `fmi rendezvous` runs there"
            ) from exc
        return reader, writer, local

    # ---------------------------------------------------------------- internals

    async def _retrying(self, request: _Request, deadline_s: float, what: str) -> p.Message:
        """:meth:`_request` of a request harmless to repeat, again while the server is
        unreachable, for up to ``deadline_s`` seconds."""
        deadline = asyncio.get_running_loop().time() + deadline_s
        return await retry_unreachable(
            lambda: self._request(request, deadline_s), deadline, self._where, what
        )

    async def _request(self, request: _Request, deadline_s: float) -> p.Message:
        signed = p.sign(request, self.secret)
        deadline = time.monotonic() + deadline_s
        reader, writer, _ = await self.open_connection()
        try:
            writer.write(p.encode(signed))
            return await self._read_answer(reader, request, deadline)
        except OSError as exc:
            raise BrokenChannelError(f"connection to {self._where} broke: {exc}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_answer(
        self, reader: asyncio.StreamReader, request: _Request, deadline: float
    ) -> p.Message:
        decoder = p.Decoder()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(request)
            try:
                async with asyncio.timeout(remaining):
                    data = await reader.read(65536)
            except TimeoutError:
                raise self._timeout(request) from None
            if not data:
                raise BrokenChannelError(f"{self._where} closed the connection without answering")
            try:
                messages = decoder.feed(data)
            except ProtocolError as exc:
                raise ProtocolError(f"bad answer from {self._where}: {exc}") from exc
            for answer in messages:
                if getattr(answer, "id", None) in (request.id, None):
                    return answer
                logger.debug("rendezvous: ignoring answer %r to another request", answer)

    def _timeout(self, request: _Request) -> CommTimeout:
        if isinstance(request, p.Lookup):
            return CommTimeout(
                f"peer {request.peer} of communicator {request.comm!r} (run {request.run_id}) "
                f"was not found at {self._where} in time: no answer within the deadline"
            )
        return CommTimeout(f"{self._where} did not answer a {request.TYPE} within the deadline")

    def _error(self, answer: p.Message, what: str) -> FMIError:
        """The error for a refusal (or an unexpected answer) of the server to ``what``."""
        return server_error(answer, self._where, what)


class ControlConnection:
    """A peer's long-lived registration: renewed, reconnected, and where invites arrive.

    :meth:`start` registers once and raises what went wrong (wrong secret,
    unreachable server).  After that a background task renews the register
    every ``renew`` seconds (well inside the server's idle timeout and TTL),
    hands every ``invite`` to ``on_invite``, and when the connection breaks
    reconnects with jittered, doubling backoff (capped at ``max_backoff``)
    until :meth:`close`.
    """

    def __init__(
        self,
        client: RendezvousClient,
        comm: str,
        run_id: str,
        peer: int,
        addr: Address,
        on_invite: Callable[[p.Invite], None],
        *,
        renew: float = 15.0,
        max_backoff: float = 2.0,
    ) -> None:
        self.client = client
        self.comm = comm
        self.run_id = run_id
        self.peer = peer
        self.addr = addr
        self.on_invite = on_invite
        self.renew = renew
        self.max_backoff = max_backoff
        self.observed: Address | None = None
        self.local: Address | None = None
        self.reconnects = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._decoder = p.Decoder()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._writer else "connecting")
        return (
            f"<ControlConnection peer={self.peer} {state} observed={self.observed} "
            f"local={self.local} reconnects={self.reconnects}>"
        )

    @property
    def behind_nat(self) -> bool:
        """True when the server saw another endpoint than ours: a translator is in between."""
        return self.observed is not None and self.observed != self.local

    async def start(self) -> p.Ok:
        ok = await self._connect()
        self._task = asyncio.create_task(self._run())
        return ok

    async def _connect(self) -> p.Ok:
        reader, writer, local = await self.client.open_connection()
        decoder = p.Decoder()
        try:
            request = p.Register(self.comm, self.run_id, self.peer, self.addr, id=0, local=local)
            writer.write(p.encode(p.sign(request, self.client.secret)))
            answer: p.Message | None = None
            pending: list[p.Message] = []
            async with asyncio.timeout(self.client.timeout):
                while answer is None:
                    data = await reader.read(65536)
                    if not data:
                        raise BrokenChannelError(
                            f"{self.client._where} closed the connection without answering"
                        )
                    for message in decoder.feed(data):
                        if answer is None and not isinstance(message, p.Invite):
                            answer = message
                        else:
                            pending.append(message)  # an invite right behind the answer
            if not isinstance(answer, p.Ok):
                raise self.client._error(answer, f"registering peer {self.peer}")
        except TimeoutError:
            writer.close()
            raise CommTimeout(
                f"{self.client._where} did not answer a register within {self.client.timeout:.3g}s"
            ) from None
        except BaseException:
            writer.close()
            raise
        self._reader, self._writer, self._decoder = reader, writer, decoder
        self.local, self.observed = local, answer.observed
        for message in pending:
            self._dispatch(message)
        return answer

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Invite):
            logger.debug("peer %d: invited by peer %d", self.peer, message.initiator)
            self.on_invite(message)
        elif isinstance(message, p.Error):
            logger.warning("peer %d: rendezvous server: %s", self.peer, message.message)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                if self._writer is None:
                    await self._connect()
                    self.reconnects += 1
                    logger.info("peer %d: registered again at %s", self.peer, self.client._where)
                backoff = 0.05
                await self._serve()
            except asyncio.CancelledError:
                raise
            except AuthenticationError as exc:  # refused: worth a line, it will not heal by itself
                logger.warning("peer %d: control connection: %s", self.peer, exc)
            except Exception as exc:
                logger.debug("peer %d: control connection: %s", self.peer, exc)
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._closed:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)

    async def _serve(self) -> None:
        assert self._reader is not None and self._writer is not None
        decoder = self._decoder
        request = p.sign(
            p.Register(self.comm, self.run_id, self.peer, self.addr, id=0, local=self.local),
            self.client.secret,
        )
        while True:
            try:
                async with asyncio.timeout(self.renew):
                    data = await self._reader.read(65536)
            except TimeoutError:
                self._writer.write(p.encode(request))  # renewal; the answer is an ok
                async with asyncio.timeout(self.client.timeout):
                    await self._writer.drain()
                continue
            if not data:
                raise BrokenChannelError("the rendezvous server closed the control connection")
            for message in decoder.feed(data):
                self._dispatch(message)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            self._writer = None
