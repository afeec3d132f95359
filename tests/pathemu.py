"""A network path emulated in user space: delay, jitter, reordering, loss, duplication.

This kernel has no netem, so paths with a real round trip and real disorder
are emulated by forwarders on loopback:

* :class:`UDPPath` stands between two UDP endpoints ``a`` and ``b``.  ``a``
  sends to :attr:`UDPPath.facing_a`, and the datagram leaves the emulator's
  other socket (:attr:`UDPPath.facing_b`) towards ``b`` after the path's
  delay; ``b``'s datagrams go the other way.  Each datagram independently is
  lost, duplicated, and delayed by ``delay`` plus a uniform draw from
  ``[-jitter, +jitter]`` (so jitter reorders, as netem's does), optionally
  after waiting its turn at a ``rate`` bottleneck.  What a direction holds
  is bounded (``queue`` bytes; beyond it datagrams are dropped and counted,
  as a full router queue drops them).  One seeded :class:`random.Random`
  per direction makes a run repeatable.
* :class:`TCPPath` is a TCP forwarder with the same delay and jitter (bytes
  keep their order, as TCP delivers them); it holds at most ``queue`` bytes
  per direction, which bounds its throughput to ``queue / delay`` as a
  socket buffer would.  It splits the connection, so the TCP sender sees a
  loopback round trip to the forwarder: only an approximation of TCP over
  the path, good enough to print the two channels side by side.
* :class:`StaticDiscovery` tells UDP channels where their peers are (the
  emulator's sockets) instead of a rendezvous server.

Run alone it forwards between two given endpoints and prints its two ports
as one JSON line (the benchmark runs it in a process of its own)::

    python tests/pathemu.py --a 127.0.0.1:5000 --b 127.0.0.1:5001 --delay 0.01 --jitter 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import random
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PathSpec", "UDPPath", "TCPPath", "StaticDiscovery"]

logger = logging.getLogger(__name__)

Address = tuple[str, int]
LOOPBACK = "127.0.0.1"
_SOCKET_BUFFER = 8 * 1024 * 1024


@dataclass(frozen=True)
class PathSpec:
    """One direction of a path.  Times in seconds, probabilities per datagram."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    dup: float = 0.0
    rate: float | None = None  # bytes per second at a bottleneck, None: unlimited
    queue: int = 8 * 1024 * 1024  # bytes held at most
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0 or not 0 <= self.loss < 1 or not 0 <= self.dup < 1:
            raise ValueError(f"bad path {self}")


@dataclass
class _Direction:
    spec: PathSpec
    rng: random.Random = field(init=False)
    counters: Counter[str] = field(default_factory=Counter)
    held: int = 0
    busy_until: float = 0.0  # when the bottleneck is free
    sent_index: int = 0
    high_delivered: int = -1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.spec.seed)

    def schedule(self, now: float, size: int) -> list[float]:
        """When each copy of a datagram arrives; empty if it is lost."""
        spec, rng = self.spec, self.rng
        self.counters["offered"] += 1
        if spec.loss and rng.random() < spec.loss:
            self.counters["lost"] += 1
            return []
        copies = 2 if spec.dup and rng.random() < spec.dup else 1
        self.counters["duplicated"] += copies - 1
        times = []
        for _ in range(copies):
            if self.held + size > spec.queue:
                self.counters["overflow"] += 1
                continue
            start = now
            if spec.rate:
                start = self.busy_until = max(now, self.busy_until) + size / spec.rate
            wobble = rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0
            times.append(start + max(0.0, spec.delay + wobble))
            self.held += size
        return times


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, path: UDPPath, side: int) -> None:
        self.path, self.side = path, side
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.path._received(self.side, data)

    def error_received(self, exc: Exception) -> None:
        self.path.counters["socket_error"] += 1


class UDPPath:
    """A datagram forwarder between ``a`` and ``b`` with an emulated path each way."""

    def __init__(self, a_to_b: PathSpec, b_to_a: PathSpec | None = None) -> None:
        back = b_to_a or PathSpec(**{**a_to_b.__dict__, "seed": a_to_b.seed + 1})
        self.directions = (_Direction(a_to_b), _Direction(back))
        self.counters: Counter[str] = Counter()
        self.ends: list[Address] = []
        self._sockets: list[_Socket] = []
        self._heap: list[tuple[float, int, int, int, bytes]] = []  # at, order, side, index, data
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0

    def __repr__(self) -> str:
        return f"<UDPPath {self.ends} a->b {self.directions[0].spec} held={len(self._heap)}>"

    @property
    def facing_a(self) -> Address:
        """Where ``a`` sends its datagrams for ``b``."""
        return self._address(0)

    @property
    def facing_b(self) -> Address:
        """Where ``b`` sends its datagrams for ``a``."""
        return self._address(1)

    def _address(self, side: int) -> Address:
        assert self._sockets[side].transport is not None
        host, port = self._sockets[side].transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    async def start(self, a: Address, b: Address, host: str = LOOPBACK) -> UDPPath:
        loop = asyncio.get_running_loop()
        self.ends = [a, b]
        for side in (0, 1):
            _, proto = await loop.create_datagram_endpoint(
                lambda side=side: _Socket(self, side), local_addr=(host, 0)
            )
            sock = proto.transport.get_extra_info("socket") if proto.transport else None
            if sock is not None:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            self._sockets.append(proto)
        return self

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for proto in self._sockets:
            if proto.transport is not None:
                proto.transport.close()
        self._heap.clear()

    async def __aenter__(self) -> UDPPath:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "a->b": dict(self.directions[0].counters),
            "b->a": dict(self.directions[1].counters),
        }

    def _received(self, side: int, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        direction = self.directions[side]
        index = direction.sent_index
        direction.sent_index += 1
        for at in direction.schedule(now, len(data)):
            heapq.heappush(self._heap, (at, next(self._order), side, index, data))
        self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._heap:
            return
        first = self._heap[0][0]
        if self._timer is not None:
            if self._when <= first:
                return
            self._timer.cancel()
        self._when = first
        self._timer = loop.call_at(first, self._release)

    def _release(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for _ in range(100_000):  # bounded: what is due now
            if not self._heap or self._heap[0][0] > now:
                break
            _, _, side, index, data = heapq.heappop(self._heap)
            direction = self.directions[side]
            direction.held -= len(data)
            if index < direction.high_delivered:
                direction.counters["reordered"] += 1
            direction.high_delivered = max(direction.high_delivered, index)
            out = self._sockets[1 - side].transport  # leaves by the other side's socket
            if out is not None and not out.is_closing():
                out.sendto(data, self.ends[1 - side])
                direction.counters["delivered"] += 1
        self._arm(loop)


class TCPPath:
    """A TCP forwarder to ``upstream`` with a delay (and jitter) each way, bounded."""

    def __init__(self, spec: PathSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.upstream: Address | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters: Counter[str] = Counter()

    @property
    def address(self) -> Address:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return (str(host), int(port))

    async def start(self, upstream: Address, host: str = LOOPBACK) -> TCPPath:
        self.upstream = upstream
        self._server = await asyncio.start_server(self._accept, host, 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.upstream is not None
        self.counters["connections"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.spec.queue // 65536))  # 64 KiB chunks at most

        async def deliver() -> None:
            while True:
                at, chunk = await queue.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, at - loop.time()))
                writer.write(chunk)
                await writer.drain()
                room.release()
            with contextlib.suppress(OSError):
                writer.write_eof()

        task = asyncio.create_task(deliver())
        last = 0.0
        try:
            while True:
                await room.acquire()
                chunk = await reader.read(65536)
                if not chunk:
                    break
                wobble = self.rng.uniform(-self.spec.jitter, self.spec.jitter)
                last = max(last, loop.time() + max(0.0, self.spec.delay + wobble))
                self.counters["bytes"] += len(chunk)
                queue.put_nowait((last, chunk))
            queue.put_nowait((0.0, b""))
            await task
        finally:
            task.cancel()
            writer.close()


class StaticDiscovery:
    """Peers at fixed addresses (an emulator's sockets); nothing is published."""

    def __init__(self, addresses: dict[int, Address] | None = None) -> None:
        self.addresses: dict[int, Address] = dict(addresses or {})
        self._known = asyncio.Event()

    def set(self, peer: int, address: Address) -> None:
        self.addresses[peer] = address
        self._known.set()

    async def publish(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        return None

    async def locate(
        self, peer: int, transport: asyncio.DatagramTransport, timeout: float
    ) -> Address:
        async with asyncio.timeout(timeout):
            while peer not in self.addresses:
                self._known.clear()
                await self._known.wait()
        return self.addresses[peer]

    def handle_datagram(self, data: bytes, addr: Address) -> bool:
        return False

    async def close(self) -> None:
        return None


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return (host, int(port))


async def _serve(args: argparse.Namespace) -> None:
    spec = PathSpec(args.delay, args.jitter, args.loss, args.dup, args.rate, seed=args.seed)
    path = await UDPPath(spec).start(_address(args.a), _address(args.b))
    a, b = path.facing_a, path.facing_b
    print(json.dumps({"facing_a": list(a), "facing_b": list(b)}), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    try:
        await asyncio.wait_for(stop, args.lifetime)  # ends when the parent closes stdin
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(sys.stdin.fileno())
        print(json.dumps(path.stats()), flush=True)
        await path.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="host:port of one end")
    parser.add_argument("--b", required=True, help="host:port of the other end")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="+- seconds, uniform")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--dup", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=None, help="bytes per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=600.0, help="exit after, seconds")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
