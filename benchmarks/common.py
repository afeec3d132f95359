"""What the benchmark scripts share: the rendezvous server, worker processes, loops.

A benchmark script is its own worker: the orchestrating process starts copies
of the script (``--worker`` plus the script's own arguments), each prints one
JSON line ``{"result": ...}``, and the orchestrator collects them.  The tcp
channel's peers find each other through a :class:`Rendezvous` this process
runs on 127.0.0.1.  :class:`RawMesh` is the raw-socket baseline of a small
collective: the same exchanges as recursive doubling, over plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Coroutine
from typing import Any

import fmi_async as fmi
from fmi_async.holepunch.server import RendezvousServer

logger = logging.getLogger(__name__)

SECRET = "bench-secret"


class Rendezvous:
    """A rendezvous server on its own thread and event loop, for the workers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = RendezvousServer(secret=SECRET.encode())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(10)
        host, port = self.server.address
        return f"{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


DOUBLE = struct.Struct("d")
PEER = struct.Struct("!I")


class RawMesh:
    """An 8-byte allreduce by recursive doubling over raw asyncio streams: in
    round k a peer writes its value to peer ``rank ^ 2**k``, reads that peer's
    and adds.  The connections (one per pair, TCP_NODELAY) are opened first,
    with the ports exchanged through the communicator."""

    def __init__(self, links: list[tuple[Any, Any]], server: asyncio.Server) -> None:
        self.links, self.server = links, server

    @classmethod
    async def open(cls, comm: fmi.Communicator, timeout: float = 60) -> RawMesh:
        rank, rounds = comm.rank, comm.size.bit_length() - 1
        if comm.size != 1 << rounds:
            raise SystemExit(f"the raw exchange needs a power of two peers, not {comm.size}")
        partners = [rank ^ (1 << k) for k in range(rounds)]
        loop = asyncio.get_running_loop()
        accepted: dict[int, asyncio.Future[tuple[Any, Any]]] = {
            p: loop.create_future() for p in partners if p < rank
        }

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            (peer,) = PEER.unpack(await reader.readexactly(PEER.size))
            accepted[peer].set_result((reader, writer))

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        ports = await comm.allgather(server.sockets[0].getsockname()[1])
        links = []
        for p in partners:  # a peer waits only for lower ranks, which never wait for it
            if p > rank:
                reader, writer = await asyncio.open_connection("127.0.0.1", ports[p])
                writer.write(PEER.pack(rank))
            else:
                reader, writer = await asyncio.wait_for(accepted[p], timeout)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            links.append((reader, writer))
        await comm.barrier()
        return cls(links, server)

    async def allreduce(self, value: float) -> float:
        for reader, writer in self.links:
            writer.write(DOUBLE.pack(value))
            value += DOUBLE.unpack(await reader.readexactly(8))[0]
        return value

    async def close(self) -> None:
        for _, writer in self.links:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


def tcp_config(rendezvous: str, timeout: float) -> dict[str, Any]:
    """The config of a tcp-channel peer that meets the others at ``rendezvous`` (host:port)."""
    host, port = rendezvous.split(":")
    return {
        "backends": {"TCP": {"enabled": True, "host": host, "port": int(port)}},
        "security": {"secret": SECRET},
        "timeout": timeout,
    }


def spawn(script: str, argv: list[str]) -> subprocess.Popen[str]:
    """One worker process: ``script --worker *argv``, its stdout piped."""
    return subprocess.Popen(
        [sys.executable, script, "--worker", *argv], stdout=subprocess.PIPE, text=True
    )


def result_of(proc: subprocess.Popen[str], timeout: float = 600) -> Any:
    """What a worker printed as its ``{"result": ...}`` line, once it exits."""
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"benchmark worker failed with exit code {proc.returncode}")
    for line in out.splitlines():
        if line.startswith('{"result"'):
            return json.loads(line)["result"]
    raise SystemExit(f"benchmark worker printed no result: {out!r}")


def run_peers(script: str, size: int, argv: list[str], timeout: float) -> list[Any]:
    """``size`` workers of ``script``, one peer each (``--peer p``); their results in
    peer order.  A failed peer leaves the others waiting: they are stopped."""
    procs = [spawn(script, [*argv, "--peer", str(p)]) for p in range(size)]
    try:
        return [result_of(proc, timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                logger.debug("stopping worker %d", proc.pid)
                proc.kill()
                proc.wait(10)


def default_loop() -> str:
    """The loop ``fmi.run`` would use: uvloop when it is installed, else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion on a new event loop of type ``loop`` (asyncio or uvloop)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
