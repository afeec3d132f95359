"""A rendezvous server that is unreachable for a moment: asked again within the deadline.

The server is stopped while a new pairing is under way and started again
on the same port, with none of its state (registrations, pairings): the
pairing succeeds after the restart, because the initiator pairs again once
the responder has registered again.  When the server never comes back, the
call's deadline wins with an error that names the server.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from fmi_async.errors import BrokenChannelError, CommTimeout
from fmi_async.holepunch import protocol as p
from fmi_async.holepunch.client import ControlConnection, RendezvousClient
from fmi_async.holepunch.retry import retry_unreachable
from fmi_async.holepunch.server import RendezvousServer
from tests.helpers import recv
from tests.holepunch.test_holepunch import SECRET, channels, send


def stop_at_join(srv: RendezvousServer, responder: int) -> asyncio.Event:
    """Make ``srv`` close itself when a join of a pairing with ``responder`` arrives
    (before handling it: the pairing is lost with the server); returns the event
    set once it has closed."""
    closed = asyncio.Event()
    handle = srv._handle

    def hooked(message: p.Message, link: Any) -> None:
        if isinstance(message, p.Join) and message.responder == responder and not closed.is_set():

            async def stop() -> None:
                await srv.close()
                closed.set()

            asyncio.get_running_loop().create_task(stop())
            return
        handle(message, link)

    srv._handle = hooked  # type: ignore[method-assign]
    return closed


async def test_a_pairing_while_the_server_restarts_succeeds_after_the_restart() -> None:
    srv = RendezvousServer(SECRET.encode())
    await srv.start("127.0.0.1", 0)
    host, port = srv.address
    async with channels(srv, 3, traversal="punch") as c:
        await send(c[0], 1, "before")
        assert await recv(c[1], 0) == "before"
        closed = stop_at_join(srv, responder=2)
        sending = asyncio.create_task(send(c[0], 2, "across the restart"))
        await asyncio.wait_for(closed.wait(), 10)
        assert not sending.done()  # still trying, not failed at once
        # The same port, none of the old state.
        srv = RendezvousServer(SECRET.encode())
        await srv.start(host, port)
        try:
            await asyncio.wait_for(sending, 30)
            assert await recv(c[2], 0) == "across the restart"
            assert c[0].stats.pairs == {1: "direct", 2: "direct"}
            assert srv.pairings.decided["direct"] >= 1  # the new server paired them
            # Every peer registers again by itself (its control connection reconnects).
            for _ in range(200):
                if len(srv.registry) == 3:
                    break
                await asyncio.sleep(0.05)
            assert len(srv.registry) == 3, srv
            # The established pair needed no server; the others pair on the new one.
            await send(c[1], 2, "after")
            assert await recv(c[2], 1) == "after"
        finally:
            await srv.close()


async def test_the_deadline_wins_when_the_server_never_comes_back() -> None:
    srv = RendezvousServer(SECRET.encode())
    await srv.start("127.0.0.1", 0)
    host, port = srv.address
    async with channels(srv, 3, traversal="punch", lookup_timeout=1.5, punch_timeout=0.5) as c:
        await send(c[0], 1, "before")
        assert await recv(c[1], 0) == "before"
        closed = stop_at_join(srv, responder=2)
        with pytest.raises(BrokenChannelError) as info:
            await send(c[0], 2, "never")
        assert closed.is_set()
        text = str(info.value)
        assert f"rendezvous server at {host}:{port}" in text, text
        assert "could not be reached" in text and "deadline" in text, text
        await send(c[0], 1, "still")  # the established pair is not affected
        assert await recv(c[1], 0) == "still"


async def test_a_lookup_waits_out_a_restart_and_finds_the_peer_registered_again() -> None:
    srv = RendezvousServer(SECRET.encode())
    await srv.start("127.0.0.1", 0)
    host, port = srv.address
    run_id = uuid.uuid4().hex[:12]
    client = RendezvousClient(host, port, SECRET.encode(), timeout=2.0)
    control = ControlConnection(
        client, "W", run_id, 1, ("127.0.0.1", 40001), lambda invite: None, max_backoff=0.2
    )
    await control.start()
    try:
        assert await client.lookup("W", run_id, 1, timeout=5.0) == ("127.0.0.1", 40001)
        await srv.close()
        looking = asyncio.create_task(client.lookup("W", run_id, 1, timeout=20.0))
        await asyncio.sleep(0)  # the lookup meets the closed port at least once
        srv = RendezvousServer(SECRET.encode())
        await srv.start(host, port)
        assert await asyncio.wait_for(looking, 30) == ("127.0.0.1", 40001)
        assert control.reconnects >= 1
    finally:
        await control.close()
        await srv.close()


async def test_retry_unreachable_retries_only_an_unreachable_server() -> None:
    loop = asyncio.get_running_loop()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BrokenChannelError("connection refused")
        return "answer"

    assert await retry_unreachable(flaky, loop.time() + 10, "the server", "asking") == "answer"
    assert calls == 3

    async def refused() -> str:
        raise CommTimeout("the peer never registered")

    with pytest.raises(CommTimeout):  # an answer of the server: not asked again
        await retry_unreachable(refused, loop.time() + 10, "the server", "asking")

    async def down() -> str:
        raise BrokenChannelError("connection refused")

    with pytest.raises(BrokenChannelError, match="asking: the server could not be reached"):
        await retry_unreachable(down, loop.time() + 0.2, "the server", "asking")
