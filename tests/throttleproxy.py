"""An HTTP proxy that throttles a share of DynamoDB requests, in front of a moto server.

DynamoDB throttles by answering HTTP 400 with the error type
``ProvisionedThroughputExceededException`` (or ``ThrottlingException``) in
a JSON body; the connection stays open.  :class:`ThrottleProxy` does the
same to a random ``rate`` of the requests whose ``X-Amz-Target`` starts
with ``DynamoDB_20120810.`` (optionally only some operations), and forwards
everything else to the upstream server unchanged, one request at a time
per connection as aiohttp sends them.  The random draws come from a seeded
generator, so a run can be repeated.

It runs in the test's event loop (:meth:`ThrottleProxy.start`), or as a
process of its own for benchmarks, which prints its port::

    python -m tests.throttleproxy UPSTREAM_HOST UPSTREAM_PORT RATE [SEED]

Counts: :attr:`ThrottleProxy.forwarded`, :attr:`ThrottleProxy.throttled`
(per operation in :attr:`ThrottleProxy.by_operation`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections import Counter

from tests.faultproxy import _parse_head, _pump_body, _read_head, _Sink, _status

__all__ = ["ThrottleProxy"]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DYNAMODB = "DynamoDB_20120810."
THROTTLE_TYPE = "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException"


class ThrottleProxy:
    """Throttle ``rate`` of the DynamoDB requests (``operations``: only these, e.g. GetItem;
    ``limit``: at most that many)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        rate: float,
        *,
        seed: int = 1,
        operations: frozenset[str] | None = None,
        limit: int | None = None,
        s3: bool = False,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate
        self.operations = operations
        self.limit = limit  # throttle at most this many (rate 1.0: exactly the first ones)
        self.s3 = s3  # throttle S3's requests instead (503 SlowDown; operations: HTTP methods)
        self.rng = random.Random(seed)
        self.forwarded = 0
        self.throttled = 0
        self.by_operation: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<ThrottleProxy -> {self.upstream[0]}:{self.upstream[1]} rate={self.rate} "
            f"forwarded={self.forwarded} throttled={self.throttled}>"
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    async def start(self, port: int = 0) -> ThrottleProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ThrottleProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _throttle(self, target: str, method: str) -> bool:
        if self.s3:
            if target:
                return False
            operation = method
        elif not target.startswith(DYNAMODB):
            return False
        else:
            operation = target[len(DYNAMODB) :]
        if self.operations is not None and operation not in self.operations:
            return False
        if self.limit is not None and self.throttled >= self.limit:
            return False
        if self.rng.random() >= self.rate:
            return False
        self.throttled += 1
        self.by_operation[operation] += 1
        return True

    def _answer(self, method: str) -> bytes:
        """DynamoDB's 400 ProvisionedThroughputExceededException, or S3's 503 SlowDown."""
        if self.s3:
            xml = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                b"<Message>throttled by the test proxy</Message></Error>"
            )
            body = b"" if method == "HEAD" else xml
            return (
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(xml)}\r\n\r\n".encode()
                + body
            )
        body = json.dumps({"__type": THROTTLE_TYPE, "message": "throttled by the test proxy"})
        return (
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.0\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body.encode()
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            await self._serve(reader, writer, up_reader, up_writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, Exception) as exc:
            logger.debug("throttle proxy: connection ended: %r", exc)
        finally:
            for w in (writer, up_writer):
                if w is not None and not w.transport.is_closing():
                    w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            head = await _read_head(reader)
            if head is None:
                return
            method, _, headers = _parse_head(head)
            continue_100 = headers.get("expect", "").lower() == "100-continue"
            if self._throttle(headers.get("x-amz-target", ""), method):
                if not continue_100:
                    await _pump_body(reader, _Sink(), headers, None, None)
                writer.write(self._answer(method))
                await writer.drain()
                if continue_100:
                    return  # the body was never sent: this connection cannot go on
                continue
            self.forwarded += 1
            up_writer.write(head)
            if continue_100:
                interim = await _read_head(up_reader)
                if interim is None:
                    return
                writer.write(interim)
                if _status(interim) != 100:
                    await _pump_body(up_reader, writer, _parse_head(interim)[2], method, interim)
                    continue
            await _pump_body(reader, up_writer, headers, None, None)
            await up_writer.drain()
            reply = await _read_head(up_reader)
            while reply is not None and 100 <= _status(reply) < 200:
                writer.write(reply)
                reply = await _read_head(up_reader)
            if reply is None:
                return
            writer.write(reply)
            await _pump_body(up_reader, writer, _parse_head(reply)[2], method, reply)
            await writer.drain()


async def _main(host: str, port: int, rate: float, seed: int) -> None:
    proxy = await ThrottleProxy(host, port, rate, seed=seed).start()
    print(proxy.address[1], flush=True)
    try:
        # Until the parent closes our stdin (or dies): bounded by the parent's life.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        print(
            json.dumps({"forwarded": proxy.forwarded, "throttled": proxy.throttled}),
            file=sys.stderr,
            flush=True,
        )
        await proxy.close()


if __name__ == "__main__":
    asyncio.run(
        _main(
            sys.argv[1],
            int(sys.argv[2]),
            float(sys.argv[3]),
            int(sys.argv[4]) if len(sys.argv) > 4 else 1,
        )
    )
