"""A TCP proxy that injects faults on a schedule, for tests of the storage channels.

Put a :class:`FaultProxy` between a channel and its server (redis-server, the
moto server), point the channel at :attr:`FaultProxy.address`, and tell the
proxy what to break:

* :meth:`FaultProxy.add` a :class:`Rule`: when a request matches (a byte
  pattern in a client's data for a raw TCP protocol like Redis's; method,
  path, ``X-Amz-Target`` or a byte pattern in the body of an HTTP request),
  apply its action to that
  request, ``times`` times after skipping ``skip`` matches:

  ``reset``       send a TCP RST to the client (SO_LINGER 0) instead of forwarding;
  ``delay``       forward after ``seconds``;
  ``drop_reply``  forward, then reset instead of returning the reply (the
                  server acted, the client cannot know): after ``hold`` is
                  set, if given, and ``seconds`` more (raw TCP: time for the
                  server to read the rest of a request sent in pieces);
  ``truncate``    forward, return the first ``keep`` bytes of the reply
                  (HTTP: of its body, after the head), then reset;
  ``status``      HTTP only: answer ``status`` (500, 503...) without forwarding.

* :meth:`FaultProxy.reset_all` resets every open connection now (a network
  blip); :meth:`FaultProxy.down` resets them and every new one until
  :meth:`FaultProxy.up` (a server restarting, or gone); ``blackhole=True``
  instead accepts and never answers (a hung path).

The proxy listens on an ephemeral loopback port and only ever connects to
the upstream it was given (tests keep it on loopback).  HTTP mode handles one
request at a time per connection, as aiohttp sends them (keep-alive, no
pipelining), with ``Content-Length`` or chunked bodies and ``Expect:
100-continue``.  What it did is in :attr:`FaultProxy.events`; HTTP requests
and the status the client got are in :attr:`FaultProxy.requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FaultProxy", "Request", "Rule"]

logger = logging.getLogger(__name__)

Action = Literal["reset", "delay", "drop_reply", "truncate", "status"]
LOOPBACK = "127.0.0.1"
_CHUNK = 64 * 1024
_HEAD_LIMIT = 64 * 1024
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Request:
    """One HTTP request as the proxy saw it (``status``: what the client got, 0 if nothing)."""

    method: str
    path: str
    target: str = ""  # X-Amz-Target (DynamoDB's operation)
    body: bytes = b""  # read before deciding only while a rule has a pattern
    status: int = 0
    action: str = "pass"


@dataclass
class Rule:
    """Apply ``action`` to matching requests: ``times`` of them (None: all) after ``skip``."""

    action: Action
    pattern: bytes | None = None  # bytes in the client's data (HTTP: in the request body)
    method: str | None = None  # HTTP
    path: str | None = None  # HTTP: a substring of the path
    target: str | None = None  # HTTP: a substring of X-Amz-Target
    times: int | None = 1
    skip: int = 0
    seconds: float = 0.0
    status: int = 503
    keep: int = 0
    hold: asyncio.Event | None = None
    applied: int = field(default=0, init=False)

    def matches_bytes(self, data: bytes) -> bool:
        return self.pattern is not None and self.pattern in data

    def matches_request(self, request: Request) -> bool:
        return (
            (self.method is None or request.method == self.method)
            and (self.path is None or self.path in request.path)
            and (self.target is None or self.target in request.target)
            and (self.pattern is None or self.pattern in request.body)
        )


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Reset(Exception):
    """Internal: a fault ended this connection."""


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.reply_rule: Rule | None = None  # raw TCP: what to do to the next reply

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class FaultProxy:
    """See the module docstring.  ``async with FaultProxy(host, port) as proxy: ...``"""

    def __init__(self, upstream_host: str, upstream_port: int, *, http: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.http = http
        self.rules: list[Rule] = []
        self.events: list[tuple[str, str]] = []
        self.requests: list[Request] = []
        self.connections = 0
        self._open: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._down: Literal["", "reset", "blackhole"] = ""

    def __repr__(self) -> str:
        state = self._down or "up"
        return (
            f"<FaultProxy {self.address if self._server else '-'} -> {self.upstream} {state} "
            f"rules={len(self.rules)} open={len(self._open)}>"
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._open):
            conn.reset()
        # The handlers end by themselves once their sockets are reset
        # (cancelling a start_server handler makes asyncio log an error).
        if self._tasks:
            _, stragglers = await asyncio.wait(list(self._tasks), timeout=5)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- the schedule

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def reset_all(self) -> int:
        """Reset every open connection now; returns how many."""
        conns = list(self._open)
        for conn in conns:
            conn.reset()
        self.events.append(("reset_all", str(len(conns))))
        return len(conns)

    def down(self, *, blackhole: bool = False) -> None:
        """Until :meth:`up`: reset (or, ``blackhole``, swallow the traffic of) every
        connection, open or new."""
        self._down = "blackhole" if blackhole else "reset"
        if not blackhole:
            self.reset_all()
        self.events.append(("down", self._down))

    def up(self) -> None:
        self._down = ""
        self.events.append(("up", ""))

    def _take_rule(self, request: Request | None, data: bytes | None) -> Rule | None:
        for rule in self.rules:
            hit = (
                rule.matches_request(request)
                if request is not None
                else data is not None and rule.matches_bytes(data)
            )
            if not hit:
                continue
            if rule.skip > 0:
                rule.skip -= 1
                continue
            if rule.times is not None and rule.applied >= rule.times:
                continue
            rule.applied += 1
            what = f"{request.method} {request.path}" if request is not None else repr(rule.pattern)
            self.events.append((rule.action, what))
            return rule
        return None

    # ---------------------------------------------------------------- connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(writer)
        self._open.add(conn)
        self.connections += 1
        try:
            if self._down == "reset":
                conn.reset()
                return
            if self._down == "blackhole":
                while await reader.read(_CHUNK):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            conn.upstream = up_writer
            if self.http:
                await self._serve_http(conn, reader, writer, up_reader, up_writer)
            else:
                await self._serve_tcp(conn, reader, writer, up_reader, up_writer)
        except (_Reset, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._open.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.close()
            self._tasks.discard(task)

    # ---------------------------------------------------------------- raw TCP (Redis)

    async def _serve_tcp(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        async def client_to_server() -> None:
            while data := await reader.read(_CHUNK):
                if self._down == "blackhole":
                    continue  # a hung path: nothing gets through
                rule = self._take_rule(None, data)
                if rule is not None:
                    if rule.action == "reset":
                        conn.reset()
                        return
                    if rule.action == "delay":
                        await asyncio.sleep(rule.seconds)
                    elif rule.action in ("drop_reply", "truncate"):
                        conn.reply_rule = rule
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(_CHUNK):
                if self._down == "blackhole":
                    continue
                rule, conn.reply_rule = conn.reply_rule, None
                if rule is not None:
                    if rule.hold is not None:
                        await rule.hold.wait()
                    await asyncio.sleep(rule.seconds)
                    if rule.action == "truncate":
                        writer.write(data[: rule.keep])
                        await writer.drain()
                    conn.reset()
                    return
                writer.write(data)
                await writer.drain()

        pumps = [
            asyncio.ensure_future(client_to_server()),
            asyncio.ensure_future(server_to_client()),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    # ---------------------------------------------------------------- HTTP (moto)

    async def _serve_http(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            while self._down == "blackhole":
                if not await reader.read(_CHUNK):  # a hung path: swallow, never answer
                    return
            method, path, headers = _parse_head(head)
            request = Request(method, path, headers.get("x-amz-target", ""))
            buffered = (
                any(r.pattern is not None for r in self.rules)
                and "content-length" in headers
                and headers.get("expect", "").lower() != "100-continue"
            )
            if buffered:
                request.body = await reader.readexactly(int(headers["content-length"]))
            self.requests.append(request)
            rule = self._take_rule(request, None)
            request.action = rule.action if rule is not None else "pass"
            if rule is not None and rule.action == "reset":
                conn.reset()
                raise _Reset
            if rule is not None and rule.action == "delay":
                await asyncio.sleep(rule.seconds)
            if rule is not None and rule.action == "status":
                if headers.get("expect", "").lower() != "100-continue" and not buffered:
                    await _pump_body(reader, _Sink(), headers, None, None)
                await self._answer(writer, rule.status)
                request.status = rule.status
                raise _Reset  # Connection: close was sent; the body need not be read
            up_writer.write(head)
            if headers.get("expect", "").lower() == "100-continue":
                interim = await _read_head(up_reader)
                if interim is None:
                    raise _Reset
                writer.write(interim)
                if _status(interim) != 100:  # the server refused early: no body follows
                    await _pump_body(up_reader, writer, _parse_head(interim)[2], method, interim)
                    request.status = _status(interim)
                    continue
            if buffered:
                up_writer.write(request.body)
            else:
                await _pump_body(reader, up_writer, headers, None, None)
            reply = await _read_head(up_reader)
            while reply is not None and 100 <= _status(reply) < 200:
                writer.write(reply)
                reply = await _read_head(up_reader)
            if reply is None:
                raise _Reset
            request.status = _status(reply)
            if rule is not None and rule.action == "drop_reply":
                if rule.hold is not None:
                    await rule.hold.wait()
                request.status = 0
                conn.reset()
                raise _Reset
            writer.write(reply)
            if rule is not None and rule.action == "truncate":
                body = await up_reader.read(rule.keep) if rule.keep else b""
                writer.write(body)
                await writer.drain()
                conn.reset()
                raise _Reset
            await _pump_body(up_reader, writer, _parse_head(reply)[2], method, reply)
            await writer.drain()

    async def _answer(self, writer: asyncio.StreamWriter, status: int) -> None:
        reason = _REASONS.get(status, "Error")
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
            + ("InternalError" if status == 500 else "ServiceUnavailable")
            + f"</Code><Message>injected {status}</Message></Error>"
        ).encode()
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()


class _Sink:
    """Where the body of a request answered by the proxy itself goes."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """A message head up to its blank line; None at a clean end of stream."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    except asyncio.LimitOverrunError as exc:
        raise _Reset from exc


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """``(method or version, path or status, lower-cased headers)`` of a head."""
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0].split(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return first[0], first[1] if len(first) > 1 else "", headers


def _status(head: bytes) -> int:
    return int(_parse_head(head)[1])


async def _pump_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter | _Sink,
    headers: dict[str, str],
    request_method: str | None,
    response_head: bytes | None,
) -> None:
    """Copy one message body: by Content-Length, chunked, none, or (responses) to EOF."""
    if response_head is not None:
        status = _status(response_head)
        if request_method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    line = await reader.readuntil(b"\r\n")
                    writer.write(line)
                    if line == b"\r\n":
                        return
            writer.write(await reader.readexactly(size + 2))
            await writer.drain()
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, _CHUNK))
            if not data:
                raise _Reset
            writer.write(data)
            await writer.drain()
            left -= len(data)
        return
    if response_head is not None:  # no length: the body runs to the end of the stream
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        raise _Reset
