"""Rendezvous server and client over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from fmi_async.errors import (
    ArgumentError,
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
)
from fmi_async.holepunch import protocol as p
from fmi_async.holepunch.client import RendezvousClient
from fmi_async.holepunch.registry import Registry
from fmi_async.holepunch.server import RendezvousServer, serve_forever

LOOPBACK = "127.0.0.1"
SECRET = b"rendezvous-test-secret"


@pytest.fixture
async def server() -> AsyncIterator[RendezvousServer]:
    async with RendezvousServer(SECRET, idle_timeout=5.0) as srv:
        yield srv


def client_for(srv: RendezvousServer, secret: bytes | None = SECRET) -> RendezvousClient:
    host, port = srv.address
    return RendezvousClient(host, port, secret, timeout=2.0)


def closed_port() -> int:
    """A loopback port that nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------- Registry (no I/O)


def test_registry_expiry_and_renewal() -> None:
    reg = Registry(ttl=10.0, max_entries=3)
    assert reg.register(("c", "r", 0), ("h", 1), now=0.0)
    assert reg.register(("c", "r", 1), ("h", 2), now=5.0)
    assert reg.get(("c", "r", 0), now=9.9) == ("h", 1)
    assert reg.get(("c", "r", 0), now=10.0) is None  # expired at exactly ttl
    assert reg.register(("c", "r", 0), ("h", 3), now=12.0)  # renewed: moves to the end
    assert reg.expire(now=15.0) == 1  # only peer 1 (expires at 15) goes
    assert reg.get(("c", "r", 0), now=21.9) == ("h", 3)
    assert len(reg) == 1


def test_registry_bound() -> None:
    reg = Registry(ttl=10.0, max_entries=2)
    assert reg.register(("c", "r", 0), ("h", 1), now=0.0)
    assert reg.register(("c", "r", 1), ("h", 1), now=1.0)
    assert not reg.register(("c", "r", 2), ("h", 1), now=2.0)  # full
    assert reg.register(("c", "r", 1), ("h", 9), now=2.0)  # renewing an entry is fine
    assert reg.register(("c", "r", 2), ("h", 1), now=10.5)  # peer 0 expired, room again
    assert reg.get(("c", "r", 0), now=10.5) is None


# ---------------------------------------------------------------- server + client


async def test_register_then_lookup(server: RendezvousServer) -> None:
    client = client_for(server)
    ok = await client.register("W", "run", 1, (LOOPBACK, 4000))
    assert ok.ttl == server.registry.ttl
    assert ok.observed is not None and ok.observed[0] == LOOPBACK
    assert await client.lookup("W", "run", 1, timeout=1.0) == (LOOPBACK, 4000)
    assert server.address[0] == LOOPBACK and server.address[1] > 0
    assert "entries=1" in repr(server)


async def test_lookup_waits_for_late_registration(server: RendezvousServer) -> None:
    client = client_for(server)

    async def late() -> None:
        await asyncio.sleep(0.2)
        await client.register("W", "run", 2, (LOOPBACK, 4002))

    start = time.monotonic()
    task = asyncio.create_task(late())
    addr = await client.lookup("W", "run", 2, timeout=5.0)
    await task
    assert addr == (LOOPBACK, 4002)
    assert 0.15 < time.monotonic() - start < 3.0
    assert server.core.pending == 0 and len(server.core.waits) == 0


async def test_lookup_of_absent_peer_times_out(server: RendezvousServer) -> None:
    client = client_for(server)
    start = time.monotonic()
    with pytest.raises(CommTimeout, match="peer 7 of communicator 'W'"):
        await client.lookup("W", "run", 7, timeout=0.3)
    assert time.monotonic() - start < 2.0
    assert server.core.pending == 0


async def test_runs_and_comms_are_separate(server: RendezvousServer) -> None:
    client = client_for(server)
    await client.register("W", "run-a", 0, (LOOPBACK, 1111))
    await client.register("X", "run-b", 0, (LOOPBACK, 2222))
    assert await client.lookup("W", "run-a", 0, 0.5) == (LOOPBACK, 1111)
    assert await client.lookup("X", "run-b", 0, 0.5) == (LOOPBACK, 2222)
    with pytest.raises(CommTimeout):
        await client.lookup("W", "run-b", 0, 0.1)


async def test_wrong_or_missing_secret_rejected(server: RendezvousServer) -> None:
    with pytest.raises(AuthenticationError, match="secret"):
        await client_for(server, b"wrong").register("W", "r", 0, (LOOPBACK, 1))
    with pytest.raises(AuthenticationError, match="secret"):
        await client_for(server, None).register("W", "r", 0, (LOOPBACK, 1))
    with pytest.raises(AuthenticationError):
        await client_for(server, b"wrong").lookup("W", "r", 0, 0.1)
    assert len(server.registry) == 0


async def test_unreachable_server_names_address() -> None:
    port = closed_port()
    client = RendezvousClient(LOOPBACK, port, timeout=1.0)
    with pytest.raises(BrokenChannelError, match=f"{LOOPBACK}:{port}"):
        await client.register("W", "r", 0, (LOOPBACK, 1))
    with pytest.raises(BrokenChannelError, match=f"{LOOPBACK}:{port}"):
        await client.lookup("W", "r", 0, 0.1)


def test_client_arguments() -> None:
    with pytest.raises(ArgumentError):
        RendezvousClient(LOOPBACK, 0)
    with pytest.raises(ArgumentError):
        RendezvousClient(LOOPBACK, 1000, timeout=0)


async def test_unspecified_host_replaced_by_observed(server: RendezvousServer) -> None:
    client = client_for(server)
    await client.register("W", "r", 0, ("0.0.0.0", 5555))
    assert await client.lookup("W", "r", 0, 0.5) == (LOOPBACK, 5555)


async def test_entries_expire_after_ttl() -> None:
    now = [0.0]
    async with RendezvousServer(ttl=10.0, clock=lambda: now[0], insecure=True) as srv:
        client = client_for(srv, None)
        await client.register("W", "r", 0, (LOOPBACK, 1))
        assert await client.lookup("W", "r", 0, 0.1) == (LOOPBACK, 1)
        now[0] = 11.0
        with pytest.raises(CommTimeout):
            await client.lookup("W", "r", 0, 0.1)


async def test_bounded_pending_lookups_and_entries() -> None:
    async with RendezvousServer(max_pending=1, max_entries=1, insecure=True) as srv:
        client = client_for(srv, None)
        waiting = asyncio.create_task(client.lookup("W", "r", 5, timeout=5.0))
        for _ in range(100):  # until the first lookup waits at the server
            if srv.core.pending:
                break
            await asyncio.sleep(0.01)
        assert srv.core.pending == 1
        with pytest.raises(BrokenChannelError, match="lookups waiting"):
            await client.lookup("W", "r", 6, timeout=5.0)
        await client.register("W", "r", 5, (LOOPBACK, 55))
        assert await asyncio.wait_for(waiting, 2.0) == (LOOPBACK, 55)
        with pytest.raises(BrokenChannelError, match="entries"):
            await client.register("W", "r", 6, (LOOPBACK, 66))


async def test_garbage_gets_error_and_close(server: RendezvousServer) -> None:
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(65536), 2.0)
        answer = p.Decoder().feed(data)
        assert isinstance(answer[0], p.Error) and answer[0].code == "bad_request"
        assert await asyncio.wait_for(reader.read(), 2.0) == b""  # then closed
    finally:
        writer.close()
    # The server still serves others.
    await client_for(server).register("W", "r", 0, (LOOPBACK, 1))


async def test_non_request_message_rejected(server: RendezvousServer) -> None:
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        writer.write(p.encode(p.Ok()))
        answer = p.Decoder().feed(await asyncio.wait_for(reader.read(65536), 2.0))
        assert isinstance(answer[0], p.Error) and "does not accept" in answer[0].message
    finally:
        writer.close()


async def test_idle_connection_closed() -> None:
    async with RendezvousServer(idle_timeout=0.2, insecure=True) as srv:
        reader, writer = await asyncio.open_connection(*srv.address)
        try:
            start = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 3.0) == b""
            assert time.monotonic() - start < 2.0
        finally:
            writer.close()


async def test_close_ends_waiting_lookups() -> None:
    srv = RendezvousServer(insecure=True)
    await srv.start(LOOPBACK, 0)
    client = client_for(srv, None)
    # Asked again while the server is gone (it may restart), until the lookup's deadline.
    task = asyncio.create_task(client.lookup("W", "r", 3, timeout=1.0))
    for _ in range(100):
        if srv.core.pending:
            break
        await asyncio.sleep(0.01)
    start = time.monotonic()
    await srv.close()
    await srv.close()  # idempotent
    with pytest.raises(BrokenChannelError, match="could not be reached"):
        await asyncio.wait_for(task, 5.0)
    assert time.monotonic() - start < 5.0


async def test_server_lifecycle_errors() -> None:
    srv = RendezvousServer(insecure=True)
    with pytest.raises(ArgumentError, match="not started"):
        _ = srv.address
    await srv.start(LOOPBACK, 0)
    try:
        with pytest.raises(ArgumentError, match="already started"):
            await srv.start(LOOPBACK, 0)
    finally:
        await srv.close()
    with pytest.raises(ArgumentError):
        RendezvousServer(ttl=0)


async def test_serve_forever_until_cancelled() -> None:
    ready: asyncio.Future[p.Address] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_forever(LOOPBACK, 0, SECRET, ready=ready.set_result))
    host, port = await asyncio.wait_for(ready, 5.0)
    client = RendezvousClient(host, port, SECRET, timeout=2.0)
    await client.register("W", "r", 0, (LOOPBACK, 9))
    assert await client.lookup("W", "r", 0, 0.5) == (LOOPBACK, 9)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(BrokenChannelError):
        await client.register("W", "r", 0, (LOOPBACK, 9))


async def test_many_concurrent_clients(server: RendezvousServer) -> None:
    client = client_for(server)
    n = 32
    lookups = [asyncio.create_task(client.lookup("W", "r", i, 5.0)) for i in range(n)]
    await asyncio.gather(*(client.register("W", "r", i, (LOOPBACK, 1000 + i)) for i in range(n)))
    addrs = await asyncio.wait_for(asyncio.gather(*lookups), 10.0)
    assert addrs == [(LOOPBACK, 1000 + i) for i in range(n)]


async def test_internal_failure_answers_and_server_survives(
    server: RendezvousServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(msg: p.Lookup, *args: object) -> list[object]:
        raise RuntimeError("bug")

    monkeypatch.setattr(server.core, "_lookup", broken)
    client = client_for(server)
    with pytest.raises(BrokenChannelError, match="rendezvous server failed"):
        await client.lookup("W", "r", 0, 0.1)
    assert "failed to handle" in caplog.text
    await client.register("W", "r", 0, (LOOPBACK, 1))  # still serving
