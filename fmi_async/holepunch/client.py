"""Client side of the rendezvous protocol.

Each request uses its own short connection: peers talk to the server a few
times per run (one register, at most one lookup per destination), so a
persistent connection would buy nothing and would need keep-alives through
NATs.  It also means concurrent lookups never wait behind each other.

Every step has a deadline, and failures are mapped onto the library's errors
with messages that say what to check: :class:`~fmi_async.errors.CommTimeout`
when the peer never registers, :class:`~fmi_async.errors.AuthenticationError`
when the secrets differ, :class:`~fmi_async.errors.BrokenChannelError` when
the server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from ..errors import (
    ArgumentError,
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
    ProtocolError,
)
from . import protocol as p

__all__ = ["RendezvousClient"]

logger = logging.getLogger(__name__)


class RendezvousClient:
    """Registers this peer and looks up others at one rendezvous server.

    ``timeout`` bounds connecting and each network round trip; a lookup waits
    additionally for as long as its own ``timeout`` argument says.
    """

    def __init__(
        self, host: str, port: int, secret: bytes | None = None, timeout: float = 10.0
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ArgumentError(f"rendezvous port must be in 1..65535, got {port!r}")
        if timeout <= 0:
            raise ArgumentError(f"rendezvous timeout must be positive, got {timeout!r}")
        self.host = host
        self.port = port
        self.secret = secret
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        auth = "with secret" if self.secret else "no secret"
        return f"<RendezvousClient {self.host}:{self.port} {auth} timeout={self.timeout}>"

    @property
    def _where(self) -> str:
        return f"the rendezvous server at {self.host}:{self.port}"

    async def register(self, comm: str, run_id: str, peer: int, addr: p.Address) -> p.Ok:
        """Announce that ``peer`` listens at ``addr``; returns the server's acknowledgement."""
        request = p.Register(comm, run_id, peer, (addr[0], int(addr[1])), id=next(self._ids))
        answer = await self._request(request, self.timeout)
        if isinstance(answer, p.Ok):
            return answer
        raise self._error(answer, request, f"registering peer {peer}")

    async def lookup(
        self,
        comm: str,
        run_id: str,
        peer: int,
        timeout: float | None = None,
    ) -> p.Address:
        """The address of ``peer``, waiting up to ``timeout`` seconds for it to register."""
        wait = self.timeout if timeout is None else timeout
        request = p.Lookup(comm, run_id, peer, wait, id=next(self._ids))
        answer = await self._request(request, wait + self.timeout)
        if isinstance(answer, p.PeerInfo) and answer.peer == peer:
            return answer.addr
        raise self._error(answer, request, f"looking up peer {peer}")

    # ---------------------------------------------------------------- internals

    async def _request(self, request: p.Lookup | p.Register, deadline_s: float) -> p.Message:
        signed = p.sign(request, self.secret)
        deadline = time.monotonic() + deadline_s
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
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
        self, reader: asyncio.StreamReader, request: p.Lookup | p.Register, deadline: float
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

    def _timeout(self, request: p.Lookup | p.Register) -> CommTimeout:
        if isinstance(request, p.Lookup):
            return CommTimeout(
                f"peer {request.peer} of communicator {request.comm!r} (run {request.run_id}) "
                f"was not found at {self._where} in time: no answer within the deadline"
            )
        return CommTimeout(f"{self._where} did not answer a register within {self.timeout:.3g}s")

    def _error(self, answer: p.Message, request: p.Lookup | p.Register, what: str) -> Exception:
        if not isinstance(answer, p.Error):
            return ProtocolError(f"unexpected {answer.TYPE!r} answer from {self._where} to {what}")
        if answer.code == "auth":
            return AuthenticationError(
                f"{self._where} rejected {what}: {answer.message}; use the same "
                "security.secret on every peer and on the server"
            )
        if answer.code == "timeout":
            return CommTimeout(
                f"peer {request.peer} of communicator {request.comm!r} (run {request.run_id}) "
                f"never registered at {self._where} ({answer.message}); did it start, with "
                "the same comm name and run id?"
            )
        if answer.code == "bad_request":
            return ProtocolError(f"{self._where} rejected {what}: {answer.message}")
        return BrokenChannelError(f"{self._where} failed {what}: {answer.message}")
