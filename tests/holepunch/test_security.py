"""Secure by default: secrets required, proofs checked, registrations bound, slots not exhaustible.

Every test plays an attacker against real peers and a real rendezvous server
on loopback, and asserts both sides: the attacker is refused (or its
connection closed), and the honest peers still get right results, or a clear
``FMIError`` where they cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.tcp import TCPChannel
from fmi_async.channels.udp.channel import UDPChannel
from fmi_async.config import Config
from fmi_async.errors import AuthenticationError, ConfigError
from fmi_async.holepunch import protocol as hp
from fmi_async.holepunch.admission import Admission
from fmi_async.holepunch.client import ControlConnection, RendezvousClient
from fmi_async.holepunch.server import UDP_RENDEZVOUS, RendezvousServer
from fmi_async.tools.cli import main
from fmi_async.wire import dumps, loads

LOOPBACK = "127.0.0.1"
SECRET = "security-test-secret"


# ---------------------------------------------------------------- helpers


def config_for(
    srv: RendezvousServer,
    backend: str = "TCP",
    secret: str | None = SECRET,
    connect_timeout: float = 2.0,
    **security: Any,
) -> Config:
    """A config for ``backend`` at ``srv``; ``security`` adds keys of the security section."""
    host, port = srv.address
    sec: dict[str, Any] = dict(security)
    if secret is not None:
        sec["secret"] = secret
    options = {"host": host, "port": port, "connect_timeout": connect_timeout}
    return Config.from_dict(
        {
            "backends": {backend: options},
            "security": sec,
            "timeout": 10.0,
        }
    )


@asynccontextmanager
async def communicators(
    config: Config, n: int, run_id: str | None = None
) -> AsyncIterator[list[fmi.Communicator]]:
    run = run_id or uuid.uuid4().hex[:12]
    comms = [fmi.Communicator(i, n, config, run_id=run) for i in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.open() for c in comms)), 10.0)
        yield comms
    finally:
        await asyncio.gather(*(c.close() for c in comms), return_exceptions=True)


@asynccontextmanager
async def tcp_channels(
    config: Config, ids: list[int], n: int, run_id: str
) -> AsyncIterator[list[TCPChannel]]:
    chans = [TCPChannel(ChannelContext(i, n, "W", run_id, config, Mailbox(i))) for i in ids]
    try:
        await asyncio.gather(*(c.open() for c in chans))
        yield chans
    finally:
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)


async def exchange(a: TCPChannel | UDPChannel, b: TCPChannel | UDPChannel, value: Any) -> Any:
    """``a`` sends ``value`` to ``b``; what ``b`` received."""
    await asyncio.wait_for(a.send(b.peer_id, ("u", 0), dumps(value)), 10.0)
    return loads(await b.recv(a.peer_id, ("u", 0), 10.0))


async def check_group(comms: list[fmi.Communicator]) -> None:
    """A message and collectives among honest peers give the right results."""
    n = len(comms)
    await comms[0].send({"x": np.arange(4)}, dst=1, tag=3)
    got = await comms[1].recv(src=0, tag=3)
    assert np.array_equal(got["x"], np.arange(4))
    totals = await asyncio.gather(*(c.allreduce(c.rank + 1) for c in comms))
    assert totals == [n * (n + 1) // 2] * n
    await asyncio.gather(*(c.barrier() for c in comms))


def is_closed(sock: socket.socket) -> bool:
    """True once the other side closed or reset ``sock`` (a non-blocking socket).

    Whatever it sent before (an error answer, say) is read and dropped.
    """
    try:
        for _ in range(64):  # bounded: at most 4 MiB of answers to skip
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


async def wait_closed(socks: list[socket.socket], within: float) -> float:
    """Seconds until every socket of ``socks`` was closed by the other side (bounded)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if all(is_closed(s) for s in socks):
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    left = sum(not is_closed(s) for s in socks)
    raise AssertionError(f"{left} of {len(socks)} connections still open after {within}s")


async def open_raw(addr: hp.Address, source: str = LOOPBACK) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, addr), 5.0)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_many(addr: hp.Address, count: int, source: str = LOOPBACK) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for _ in range(count):  # one at a time: the listen backlog stays small
        socks.append(await open_raw(addr, source))
    return socks


async def slowloris(sock: socket.socket, payload: bytes, interval: float = 0.2) -> float:
    """Trickle ``payload`` one byte per ``interval``; seconds until the other side cut us off."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(len(payload)):
        if is_closed(sock):
            return loop.time() - start
        try:
            await loop.sock_sendall(sock, payload[i : i + 1])
        except OSError:
            return loop.time() - start
        await asyncio.sleep(interval)
    raise AssertionError(f"a slowloris sent all {len(payload)} bytes without being cut off")


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


@contextlib.contextmanager
def loop_errors() -> Any:
    """Collect exceptions the event loop would only log (a crashed callback or task)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda lp, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def request(addr: hp.Address, message: hp.Message, timeout: float = 3.0) -> list[hp.Message]:
    """Send one message on a fresh connection; every answer until the server closes it."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(hp.encode(message))
        data = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
        return hp.Decoder().feed(data)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# ---------------------------------------------------------------- configuration


def test_security_section_is_validated() -> None:
    bad: list[dict[str, Any]] = [
        {"insecure": "yes"},
        {"insecure": 1},
        {"secret": ""},
        {"secret": 42},
        {"handshake_timeout": 0},
        {"handshake_timeout": float("nan")},
        {"handshake_timeout": float("inf")},
        {"handshake_timeout": "5"},
        {"handshake_timeout": True},
        {"max_unproven": 0},
        {"max_unproven_per_source": 2.5},
        {"secert": "typo"},
    ]
    for section in bad:
        with pytest.raises(ConfigError, match="security"):
            Config.from_dict({"security": section})
    config = Config.from_dict(
        {"security": {"insecure": True, "handshake_timeout": 2, "max_unproven": 8}}
    )
    assert config.insecure and config.handshake_timeout == 2.0 and config.max_unproven == 8
    assert Config.from_dict(config.to_dict()) == config
    assert Config().insecure is False and Config().secret is None


@pytest.mark.parametrize("backend", ["TCP", "UDP"])
async def test_direct_channel_without_secret_is_refused(backend: str) -> None:
    async with RendezvousServer(SECRET.encode()) as srv:
        lone = fmi.Communicator(0, 2, config_for(srv, backend, secret=None), run_id="r")
        with pytest.raises(ConfigError) as info:
            await lone.open()
        assert "security.secret" in str(info.value) and "security.insecure" in str(info.value)
        assert len(srv.registry) == 0  # refused before it said anything to anyone
        # The peers that do have the secret run as ever.
        async with communicators(config_for(srv, backend), 2) as comms:
            await check_group(comms)


@pytest.mark.parametrize("backend", ["TCP", "UDP"])
async def test_insecure_opt_in_runs_with_a_logged_warning(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with RendezvousServer(insecure=True) as srv:
        server_warnings = [r for r in caplog.records if "WITHOUT a secret" in r.message]
        assert [r.levelno for r in server_warnings] == [logging.WARNING]
        config = config_for(srv, backend, secret=None, insecure=True)
        async with communicators(config, 2) as comms:
            await check_group(comms)
    warned = [r for r in caplog.records if r.name == "fmi_async.config"]
    assert len(warned) == 2 and all(r.levelno == logging.WARNING for r in warned)
    assert all(f"channel {backend.lower()} runs WITHOUT a secret" in r.message for r in warned)


async def test_memory_and_storage_channels_need_no_secret(
    redis_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with fmi.local_peers(3) as comms:
        await check_group(comms)
    async with communicators(redis_config, 2) as comms:  # the backend's credentials protect it
        await check_group(comms)
    assert not [r for r in caplog.records if "secret" in r.message]


def test_server_without_secret_needs_the_explicit_opt_out() -> None:
    with pytest.raises(ConfigError, match=r"secret.*insecure=True"):
        RendezvousServer()
    with pytest.raises(ConfigError, match="empty"):
        RendezvousServer(b"")


# ---------------------------------------------------------------- proofs at the server


def _unproven_requests(run: str, local: hp.Address) -> dict[str, hp.Message]:
    return {
        "register": hp.Register("W", run, 5, (LOOPBACK, 9), id=1),
        "lookup": hp.Lookup("W", run, 0, 0.5, id=1),
        "join": hp.Join("W", run, 5, 5, 0, "tcp", local, 0.5, id=1),
        "result": hp.PunchResult("W", run, 5, 5, 0, "tcp", True, id=1),
        "relay": hp.RelayJoin("W", run, 5, 5, 0, id=1),
    }


@pytest.mark.parametrize("proof", ["missing", "wrong"])
@pytest.mark.parametrize("kind", ["register", "lookup", "join", "result", "relay"])
async def test_server_with_secret_refuses_requests_without_valid_proof(
    kind: str, proof: str
) -> None:
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(SECRET.encode()) as srv:
        async with tcp_channels(config_for(srv), [0, 1], 2, run) as chans:
            message = _unproven_requests(run, (LOOPBACK, 4444))[kind]
            if proof == "wrong":
                message = hp.sign(message, b"a guess")
            answers = await request(srv.address, message)  # returns once the server closed
            assert len(answers) == 1 and isinstance(answers[0], hp.Error)
            assert answers[0].code == "auth" and "security.secret" in answers[0].message
            # Nothing of the stranger's request took effect...
            assert ("W", run, 5) not in srv.registry._entries
            assert not any(key[3] == 5 for key in srv.pairings._pairings)
            # ...and the honest peers, registered before, are untouched and talk.
            assert await exchange(chans[0], chans[1], "still private") == "still private"


async def test_server_with_secret_refuses_udp_requests_without_proof() -> None:
    run = uuid.uuid4().hex[:12]
    loop = asyncio.get_running_loop()
    async with RendezvousServer(SECRET.encode()) as srv:
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Stranger(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                answers.put_nowait(data)

        transport, _ = await loop.create_datagram_endpoint(Stranger, local_addr=(LOOPBACK, 0))
        try:
            local = transport.get_extra_info("sockname")[:2]
            for message in (
                hp.Register("W/udp", run, 1, (LOOPBACK, 9), id=7),
                hp.Join("W/udp", run, 1, 1, 0, "udp", local, 0.5, id=8),
                hp.sign(hp.Register("W/udp", run, 1, (LOOPBACK, 9), id=9), b"a guess"),
            ):
                transport.sendto(bytes([UDP_RENDEZVOUS]) + hp.encode(message), srv.address)
                data = await asyncio.wait_for(answers.get(), 3.0)
                answer = hp.Decoder().feed(data[1:])[0]
                assert isinstance(answer, hp.Error) and answer.code == "auth"
            assert len(srv.registry) == 0 and len(srv.pairings) == 0
        finally:
            transport.close()
        async with communicators(config_for(srv, "UDP"), 2, run) as comms:
            await check_group(comms)


# ---------------------------------------------------------------- the command line


def test_fmi_rendezvous_needs_a_secret_file_or_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rendezvous", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "without a secret" in err and "--secret-file" in err and "--insecure" in err
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    assert main(["rendezvous", "--port", "0", "--insecure", "--secret-file", str(secret)]) == 2
    assert "contradict" in capsys.readouterr().err
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmi_async", "rendezvous", "--host", LOOPBACK, "--port", "0",
         "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "WITHOUT a secret" in line, line
        port = int(line.split(":")[1].split()[0])

        async def stranger() -> hp.Address:  # runs as the operator chose: anyone may register
            client = RendezvousClient(LOOPBACK, port, None, timeout=5.0)
            await client.register("W", "r", 0, (LOOPBACK, 1))
            return await client.lookup("W", "r", 0, 1.0)

        assert asyncio.run(stranger()) == (LOOPBACK, 1)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "WARNING" in err and "WITHOUT a secret" in err
    finally:
        proc.kill()
        proc.communicate(timeout=10)


PEER_SCRIPT = """
    import asyncio, hashlib
    import fmi_async as fmi
    from fmi_async.errors import AuthenticationError
    from fmi_async.holepunch.client import RendezvousClient

    async def main(comm):
        secret = comm.config.secret
        digest = hashlib.sha256(secret).hexdigest()[:16]
        digests = await comm.allgather(digest)
        tcp = comm.config.options("tcp")
        stranger = RendezvousClient(tcp["host"], tcp["port"], None, timeout=3.0)
        try:
            await stranger.register(comm.comm_name, "stranger", 99, ("127.0.0.1", 9))
            refused = "no"
        except AuthenticationError:
            refused = "yes"
        print(f"secret={len(secret)} same={len(set(digests)) == 1} stranger_refused={refused}")

    fmi.run(main)
"""


def test_fmi_run_gives_every_peer_the_runs_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(PEER_SCRIPT))
    assert main(["run", "-n", "3", "--nat", "none", "--timeout", "60", str(peer)]) == 0
    lines = sorted(capsys.readouterr().out.splitlines())
    assert len(lines) == 3, lines
    for i, line in enumerate(lines):
        prefix, _, rest = line.partition("] ")
        assert prefix == f"[peer {i}"
        size = int(rest.split()[0].removeprefix("secret="))
        assert size >= 32 and "same=True" in rest and "stranger_refused=yes" in rest


# ---------------------------------------------------------------- registrations are bound


async def test_stranger_cannot_take_over_a_registration() -> None:
    """On a server without a secret, a peer's registration stays the peer's."""
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(insecure=True) as srv:
        async with tcp_channels(config_for(srv), [0, 1], 2, run) as chans:
            honest = chans[1].listen_address
            assert honest is not None
            stranger = RendezvousClient(*srv.address, None, timeout=2.0)
            with pytest.raises(AuthenticationError, match="registered already"):
                await stranger.register("W", run, 1, (LOOPBACK, 9))
            control = ControlConnection(stranger, "W", run, 1, (LOOPBACK, 9), lambda i: None)
            with pytest.raises(AuthenticationError, match="registered already"):
                await control.start()
            await control.close()
            assert await stranger.lookup("W", run, 1, 1.0) == honest
            # The honest peers never noticed.
            assert await exchange(chans[0], chans[1], "for peer 1") == "for peer 1"
            assert await exchange(chans[1], chans[0], "for peer 0") == "for peer 0"


async def test_udp_registration_is_bound_to_its_endpoint() -> None:
    run = uuid.uuid4().hex[:12]
    loop = asyncio.get_running_loop()
    async with RendezvousServer(insecure=True) as srv:
        config = config_for(srv, "UDP")
        chans = [UDPChannel(ChannelContext(i, 2, "W", run, config, Mailbox(i))) for i in range(2)]
        await asyncio.gather(*(c.open() for c in chans))
        try:
            honest = await RendezvousClient(*srv.address, None).lookup("W/udp", run, 1, 1.0)
            answers: asyncio.Queue[bytes] = asyncio.Queue()

            class Stranger(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: Any) -> None:
                    answers.put_nowait(data)

            transport, _ = await loop.create_datagram_endpoint(Stranger, local_addr=(LOOPBACK, 0))
            try:
                grab = hp.Register("W/udp", run, 1, (LOOPBACK, 9), id=3)
                transport.sendto(bytes([UDP_RENDEZVOUS]) + hp.encode(grab), srv.address)
                answer = hp.Decoder().feed((await asyncio.wait_for(answers.get(), 3.0))[1:])[0]
                assert isinstance(answer, hp.Error) and answer.code == "auth"
                assert "registered already" in answer.message
            finally:
                transport.close()
            assert await RendezvousClient(*srv.address, None).lookup("W/udp", run, 1, 1.0) == honest
            assert await exchange(chans[0], chans[1], "udp, still") == "udp, still"
        finally:
            await asyncio.gather(*(c.close() for c in chans))


@pytest.mark.parametrize("stranger_kind", ["silent", "wrong-secret"])
async def test_a_stranger_who_registered_first_is_found_out(stranger_kind: str) -> None:
    """The stranger can deny service on a server without a secret, never impersonate:
    the honest peer whose name it took fails to register, the one who looks it up fails
    the membership proof, and the stranger never sees a frame."""
    run = uuid.uuid4().hex[:12]
    received = bytearray()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                decoder = hp.Decoder(1024)
                while data := await reader.read(4096):
                    received.extend(data)
                    for message in decoder.feed(data):
                        if stranger_kind == "wrong-secret" and isinstance(message, hp.Challenge):
                            mine = b"n" * hp.NONCE_LEN
                            proof = hp.response_proof(
                                b"a guess", "W", run, 1, message.peer, message.nonce, mine
                            )
                            writer.write(hp.encode(hp.Challenge("W", run, 1, message.peer, mine)))
                            writer.write(hp.encode(hp.Response(1, proof)))
        writer.close()

    trap = await asyncio.start_server(impostor, LOOPBACK, 0)
    trap_addr = trap.sockets[0].getsockname()[:2]
    try:
        async with RendezvousServer(insecure=True) as srv:
            grab = ControlConnection(
                RendezvousClient(*srv.address, None, timeout=2.0),
                "W", run, 1, trap_addr, lambda i: None,
            )  # fmt: skip
            await grab.start()
            try:
                config = config_for(srv, connect_timeout=1.0)
                peer1 = TCPChannel(ChannelContext(1, 2, "W", run, config, Mailbox(1)))
                with pytest.raises(AuthenticationError, match="registered already"):
                    await peer1.open()
                assert not peer1.is_open
                async with tcp_channels(config, [0], 2, run) as (peer0,):
                    start = time.monotonic()
                    with pytest.raises(AuthenticationError, match="peer 1") as info:
                        await asyncio.wait_for(peer0.send(1, ("u", 0), dumps("secret!")), 10.0)
                    assert time.monotonic() - start < 5.0
                    if stranger_kind == "silent":
                        assert "did not prove membership" in str(info.value)
                    else:
                        assert "failed the membership proof" in str(info.value)
            finally:
                await grab.close()
    finally:
        trap.close()
        await trap.wait_closed()
    # All the stranger ever got is challenges: no frame, no payload.
    messages = hp.Decoder(1024).feed(bytes(received))
    assert messages and all(isinstance(m, hp.Challenge) for m in messages)
    assert b"secret!" not in received


async def test_registration_is_free_again_once_its_owner_left() -> None:
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(insecure=True) as srv:
        grab = ControlConnection(
            RendezvousClient(*srv.address, None, timeout=2.0), "W", run, 1, (LOOPBACK, 9),
            lambda i: None,
        )  # fmt: skip
        await grab.start()
        await grab.close()
        for _ in range(100):  # until the server has seen the connection go
            if not srv._taken(("W", run, 1), None, srv._clock()):
                break
            await asyncio.sleep(0.02)
        async with tcp_channels(config_for(srv), [0, 1], 2, run) as chans:
            assert await exchange(chans[0], chans[1], "mine now") == "mine now"
    # With a secret every registrant is a member: one that reconnected elsewhere
    # (before the server noticed its old connection died) takes its entry back.
    async with RendezvousServer(SECRET.encode()) as srv:
        client = RendezvousClient(*srv.address, SECRET.encode(), timeout=2.0)
        old = ControlConnection(client, "W", run, 0, (LOOPBACK, 1), lambda i: None)
        await old.start()
        try:
            await client.register("W", run, 0, (LOOPBACK, 2))
            assert await client.lookup("W", run, 0, 1.0) == (LOOPBACK, 2)
        finally:
            await old.close()


# ---------------------------------------------------------------- admission of connections


def test_admission_evicts_oldest_never_refuses() -> None:
    adm: Admission[str] = Admission(max_total=4, max_per_source=2, grace=1.0)
    assert adm.admit("a1", "A", now=0.0) == []
    assert adm.admit("a2", "A", now=0.1) == []
    assert adm.admit("a3", "A", now=0.2) == []  # over the source's limit, but all are young
    assert adm.count("A") == 3
    assert adm.admit("a4", "A", now=1.5) == ["a1"]  # a1 is old now: its own source pays
    assert adm.admit("b1", "B", now=1.6) == []
    assert adm.admit("b2", "B", now=1.7) == ["a2"]  # the total is full: the oldest of all goes
    assert list(adm) == ["a3", "a4", "b1", "b2"] and "a2" not in adm
    assert adm.settle("a3") and not adm.settle("a3")
    assert adm.admit("b3", "B", now=3.0) == ["b1"]  # B over its limit with an old one
    assert adm.admit("c1", "C", now=3.1) == []
    assert adm.admit("c2", "C", now=3.2) == ["a4"]
    assert adm.count("A") == 0 and adm.count("B") == 2 and adm.count("C") == 2
    assert adm.evicted == 4
    assert adm.report(now=3.2) == 4 and adm.report(now=4.0) == 0
    assert adm.admit("d1", "D", now=5.0) == ["b2"]
    assert adm.report(now=5.0) == 0  # at most one report per 10 s...
    assert adm.report(now=13.5) == 1  # ...which then carries the count
    assert "unproven=4/4" in repr(adm)


async def test_flood_and_slowloris_do_not_lock_out_honest_peers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 idle connections and slowloris trickles at the server and at a peer's
    port: the peers still meet, exchange a message and run collectives within
    seconds, and every attacking connection is closed within its deadline."""
    caplog.set_level(logging.WARNING)
    hs = 1.0
    attackers: list[socket.socket] = []
    try:
        with loop_errors() as errors:
            async with RendezvousServer(SECRET.encode(), handshake_timeout=hs) as srv:
                attackers += await open_many(srv.address, 200)
                register = hp.encode(hp.Register("W", "r", 0, (LOOPBACK, 9)))
                trickle_srv = [await open_raw(srv.address) for _ in range(5)]
                attackers += trickle_srv
                cut_srv = [asyncio.create_task(slowloris(s, register)) for s in trickle_srv]
                start = time.monotonic()
                # connect_timeout well above hs: the handshake deadline is what cuts them off
                config = config_for(srv, connect_timeout=10.0, handshake_timeout=hs)
                async with communicators(config, 3) as comms:
                    opened = time.monotonic() - start
                    port = comms[1]._channels["tcp"]
                    assert isinstance(port, TCPChannel) and port.listen_address is not None
                    addr = port.listen_address
                    attackers += await open_many(addr, 200)
                    challenge = hp.encode(hp.Challenge("W", "r", 2, 1, b"n" * hp.NONCE_LEN))
                    trickle_peer = [await open_raw(addr) for _ in range(5)]
                    attackers += trickle_peer
                    cut_peer = [asyncio.create_task(slowloris(s, challenge)) for s in trickle_peer]
                    start = time.monotonic()
                    await asyncio.wait_for(check_group(comms), 10.0)
                    worked = time.monotonic() - start
                    # The attackers' side: every connection closed within its deadline.
                    cut = await asyncio.wait_for(asyncio.gather(*cut_srv, *cut_peer), 10.0)
                    await wait_closed(attackers, within=hs + 2.0)
            assert not errors, errors
    finally:
        close_all(attackers)
    assert opened < 5.0 and worked < 5.0, (opened, worked)
    assert max(cut) < hs + 1.5, cut
    evictions = [r for r in caplog.records if "evicted to make room" in r.message]
    assert evictions, "the peer's 200 idle connections exceed max_unproven: some were evicted"


async def test_per_source_limit_spares_other_sources() -> None:
    """A source over its limit pushes out its own old connections, not another source's."""
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(SECRET.encode()) as srv:
        config = config_for(srv, handshake_timeout=5.0, max_unproven=16, max_unproven_per_source=4)
        async with tcp_channels(config, [0, 1], 2, run) as chans:
            addr = chans[1].listen_address
            assert addr is not None
            bystanders = await open_many(addr, 3, source="127.0.0.3")
            first = await open_many(addr, 10, source="127.0.0.2")
            await asyncio.sleep(0.7)  # older than the admission's grace now
            second = await open_many(addr, 10, source="127.0.0.2")
            try:
                await wait_closed(first, within=2.0)  # the flooding source paid
                assert not any(is_closed(s) for s in bystanders + second)
                assert chans[1]._unproven.count("127.0.0.3") == 3
                assert await exchange(chans[0], chans[1], "through") == "through"
            finally:
                close_all(bystanders + first + second)


def _garbage(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    header = hp.encode(hp.Ok())[: hp.HEADER_SIZE]
    samples = [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FMR\x01\xff\xff\xff\xff",  # oversize
        b"FMR\x09\x00\x00\x00\x02ab",  # unknown version
        header[:4] + (5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1",  # invalid msgpack
        hp.encode(hp.Ok()),  # a valid message nobody asked for
        hp.encode(hp.Response(3, b"x" * 32, commit=True)),
    ]
    samples += [rng.randbytes(rng.randint(1, 2000)) for _ in range(20)]
    samples += [b"FMR\x01" + rng.randbytes(rng.randint(4, 300)) for _ in range(10)]
    return samples


async def test_garbage_closes_the_connection_and_crashes_nothing() -> None:
    run = uuid.uuid4().hex[:12]
    with loop_errors() as errors:
        async with RendezvousServer(SECRET.encode(), handshake_timeout=1.0) as srv:
            config = config_for(srv, handshake_timeout=1.0)
            async with tcp_channels(config, [0, 1], 2, run) as chans:
                addr = chans[1].listen_address
                assert addr is not None
                socks: list[socket.socket] = []
                try:
                    loop = asyncio.get_running_loop()
                    for target in (srv.address, addr):
                        for data in _garbage(seed=len(socks)):
                            sock = await open_raw(target)
                            socks.append(sock)
                            with contextlib.suppress(OSError):
                                await loop.sock_sendall(sock, data)
                    await wait_closed(socks, within=3.0)
                finally:
                    close_all(socks)
                assert await exchange(chans[0], chans[1], "unharmed") == "unharmed"
                assert await exchange(chans[1], chans[0], "likewise") == "likewise"
                assert len(chans[1]._unproven) == 0
    assert not errors, errors


async def test_server_cuts_off_a_slow_second_message_and_frees_the_registration() -> None:
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(insecure=True, handshake_timeout=0.6) as srv:
        sock = await open_raw(srv.address)
        try:
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, hp.encode(hp.Register("W", run, 1, (LOOPBACK, 9))))
            for _ in range(100):
                if srv.registry.get(("W", run, 1), srv._clock()) is not None:
                    break
                await asyncio.sleep(0.02)
            lookup = hp.encode(hp.Lookup("W", run, 0, 1.0))
            assert await slowloris(sock, lookup) < 0.6 + 1.0
        finally:
            sock.close()
        # Its owner is gone, so the honest peer 1 registers and is found.
        async with tcp_channels(config_for(srv), [0, 1], 2, run) as chans:
            assert await exchange(chans[0], chans[1], "after the trickle") == "after the trickle"


async def test_honest_handshake_gets_in_past_a_flood_from_its_own_address() -> None:
    """Peers on one host share a source address with each other (and here with the
    attacker): with tiny limits, 40 idle connections still cannot keep them out."""
    run = uuid.uuid4().hex[:12]
    async with RendezvousServer(SECRET.encode()) as srv:
        config = config_for(srv, max_unproven=8, max_unproven_per_source=2)
        async with tcp_channels(config, [0, 1, 2, 3], 4, run) as chans:
            addr = chans[0].listen_address
            assert addr is not None
            flood = await open_many(addr, 40)
            try:
                values = await asyncio.gather(
                    *(exchange(c, chans[0], c.peer_id * 10) for c in chans[1:])
                )
                assert values == [10, 20, 30]
                assert sum(is_closed(s) for s in flood) >= 40 - 8  # evicted to make room
            finally:
                close_all(flood)


async def test_a_handshake_cut_off_by_eviction_is_tried_again() -> None:
    """A peer evicts the handshake of an honest peer (as under a flood): the honest
    peer connects again and its message arrives; the evicting side sees it once."""
    run = uuid.uuid4().hex[:12]
    seen: list[int] = []
    async with RendezvousServer(SECRET.encode()) as srv:
        async with tcp_channels(config_for(srv, connect_timeout=5.0), [0, 1], 2, run) as chans:
            target = chans[1].listen_address
            assert target is not None

            async def evict_first(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                seen.append(len(seen))
                if len(seen) == 1:  # read the challenge, then reset as an eviction does
                    await reader.read(1)
                    w.transport.abort()
                    return
                up_reader, up_writer = await asyncio.open_connection(*target)

                async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                    with contextlib.suppress(OSError):
                        while data := await src.read(65536):
                            dst.write(data)
                            await dst.drain()
                    dst.close()

                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, w))

            proxy = await asyncio.start_server(evict_first, LOOPBACK, 0)
            try:
                # Peer 1 "moves" to the evicting endpoint (a member may re-register).
                client = RendezvousClient(*srv.address, SECRET.encode())
                await client.register("W", run, 1, proxy.sockets[0].getsockname()[:2])
                assert await exchange(chans[0], chans[1], "second try") == "second try"
                assert seen == [0, 1]
            finally:
                proxy.close()
                await asyncio.gather(*(c.close() for c in chans))
                await proxy.wait_closed()
