"""The price of sealing the tcp channel: against TLS 1.3 and against no encryption.

Per event loop (asyncio and uvloop), each case on loopback with both ends on
one loop in this process, medians of ``--repeat`` rounds run in turn:

* ``tls``       a TLS 1.3 stream (asyncio's ``ssl``; a self-signed certificate
                made by ``cryptography`` at start): the client writes the bytes
                in 1 MiB writes, the server reads until it has them all -- no
                framing, no message, the bare cost of TLS;
* ``sealed``    the tcp channel as configured by default (``security.encrypt``):
                one array of ``--mib`` MiB sent and received;
* ``plain``     the same with ``security.encrypt: false`` (printed beside);
* ``small``     ``--pings`` 8-byte messages, sealed and plain, sent one after
                the other and received (the CPU cost per message: the target's
                measure), and as many ping-pongs (latency, printed beside).

Connections are opened (and warmed) before the clock starts.  Targets
(issue 16): ``sealed`` >= 0.9x ``tls`` at 64 MiB, and a sealed 8-byte message
<= 10 us more than a plain one.  The AEAD row measures both candidates
(AES-256-GCM, ChaCha20-Poly1305) on this machine, best of interleaved trials
(load only slows a trial down): the channel uses AES-256-GCM.

    python benchmarks/transport_crypto.py [--repeat 5] [--mib 64] [--loops asyncio,uvloop]

``run(args)`` returns the rows, for ``benchmarks/transport.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fmi_async from this checkout

from fmi_async.channels.base import ChannelContext  # noqa: E402
from fmi_async.channels.mailbox import Mailbox  # noqa: E402
from fmi_async.channels.tcp import TCPChannel  # noqa: E402
from fmi_async.config import Config  # noqa: E402
from fmi_async.holepunch.server import RendezvousServer  # noqa: E402
from fmi_async.wire import dumps, loads  # noqa: E402

logger = logging.getLogger(__name__)

SECRET = "bench-secret"
MiB = 1024 * 1024
WRITE = MiB  # bytes per write of the TLS client
TARGET_TLS = 0.9
TARGET_SMALL_US = 10.0


# ---------------------------------------------------------------- TLS 1.3 baseline


def tls_contexts(directory: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client context for 127.0.0.1, TLS 1.3 only, a fresh self-signed cert."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fmi-async benchmark")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_verify_locations(cert_path)
    return server, client


async def tls_rounds(
    nbytes: int, rounds: int, ctx: tuple[ssl.SSLContext, ssl.SSLContext]
) -> list[float]:
    """Seconds to move ``nbytes`` over one warm TLS 1.3 connection, ``rounds`` times."""
    server_ctx, client_ctx = ctx
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(reader)
        await done.wait()  # held open until the rounds are over
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    try:
        peer = await asyncio.wait_for(accepted, 30)
        cipher = writer.get_extra_info("ssl_object").cipher()
        logger.info("TLS: %s", cipher)
        data = memoryview(np.arange(nbytes, dtype=np.uint8).data)
        await _tls_move(writer, peer, data[:WRITE])  # warm
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            await _tls_move(writer, peer, data)
            out.append(time.perf_counter() - start)
        return out
    finally:
        done.set()
        writer.close()
        server.close()
        await server.wait_closed()
        del reader


async def _tls_move(
    writer: asyncio.StreamWriter, peer: asyncio.StreamReader, data: memoryview
) -> None:
    async def write() -> None:
        for off in range(0, data.nbytes, WRITE):
            writer.write(data[off : off + WRITE])
            await writer.drain()

    async def read() -> None:
        left = data.nbytes
        for _ in range(data.nbytes):  # bounded: every read returns at least one byte
            if left <= 0:
                return
            chunk = await peer.read(4 * WRITE)
            if not chunk:
                raise SystemExit("the TLS stream ended early")
            left -= len(chunk)

    await asyncio.wait_for(asyncio.gather(write(), read()), 120)


# ---------------------------------------------------------------- the tcp channel


@asynccontextmanager
async def channel_pair(encrypt: bool, timeout: float = 120.0) -> AsyncIterator[list[TCPChannel]]:
    async with RendezvousServer(SECRET.encode()) as srv:
        host, port = srv.address
        config = Config.from_dict(
            {
                "backends": {"TCP": {"enabled": True, "host": host, "port": port}},
                "timeout": timeout,
                "security": {"secret": SECRET, "encrypt": encrypt},
            }
        )
        run_id = uuid.uuid4().hex[:12]
        chans = [
            TCPChannel(ChannelContext(i, 2, "bench", run_id, config, Mailbox(i))) for i in (0, 1)
        ]
        await asyncio.gather(*(c.open() for c in chans))
        try:
            for a, b in ((0, 1), (1, 0)):  # open and warm both connections
                await chans[a].send(b, ("u", 0), dumps(b"warm"))
                await chans[b].recv(a, ("u", 0), 30)
            yield chans
        finally:
            await asyncio.gather(*(c.close() for c in chans))


async def bulk_rounds(encrypt: bool, nbytes: int, rounds: int) -> list[float]:
    """Seconds to send and receive one array of ``nbytes`` on the channel, ``rounds`` times."""
    array = np.arange(nbytes, dtype=np.uint8)
    out = []
    async with channel_pair(encrypt) as chans:
        for _ in range(rounds):
            start = time.perf_counter()
            _, payload = await asyncio.gather(
                chans[0].send(1, ("u", 1), dumps(array)), chans[1].recv(0, ("u", 1), 120)
            )
            out.append(time.perf_counter() - start)
            got = loads(payload)
            if got.nbytes != nbytes or got[-1] != array[-1]:
                raise SystemExit("the array arrived changed")
    return out


async def stream_rounds(encrypt: bool, count: int, rounds: int) -> list[float]:
    """Microseconds per 8-byte message in a stream of ``count``, ``rounds`` times."""
    value = dumps(b"x" * 8)
    out = []
    async with channel_pair(encrypt) as (a, b):

        async def drain() -> None:
            for _ in range(count):
                await b.recv(0, ("u", 3), 30)

        for _ in range(rounds):
            start = time.perf_counter()
            task = asyncio.create_task(drain())
            for _ in range(count):
                await a.send(1, ("u", 3), value)
            await task
            out.append((time.perf_counter() - start) / count * 1e6)
    return out


async def ping_rounds(encrypt: bool, pings: int, rounds: int) -> list[float]:
    """Microseconds per 8-byte message in ``pings`` ping-pongs, ``rounds`` times."""
    value = dumps(b"x" * 8)
    out = []
    async with channel_pair(encrypt) as (a, b):

        async def echo() -> None:
            for _ in range(pings):
                await b.recv(0, ("u", 2), 30)
                await b.send(0, ("u", 2), value)

        for _ in range(rounds):
            task = asyncio.create_task(echo())
            start = time.perf_counter()
            for _ in range(pings):
                await a.send(1, ("u", 2), value)
                await a.recv(1, ("u", 2), 30)
            out.append((time.perf_counter() - start) / (2 * pings) * 1e6)
            await task
    return out


# ---------------------------------------------------------------- the AEAD choice


def aead_rates(
    sizes: tuple[int, ...] = (40, 1200, 256 * 1024), trials: int = 9
) -> dict[str, float]:
    """Microseconds to seal one record of each size, per candidate AEAD: the best of
    ``trials`` interleaved trials (this machine, this build of ``cryptography``)."""
    out: dict[str, float] = {}
    nonce = bytes(12)
    candidates: dict[str, Any] = {
        "AES-256-GCM": AESGCM(AESGCM.generate_key(256)),
        "ChaCha20-Poly1305": ChaCha20Poly1305(ChaCha20Poly1305.generate_key()),
    }
    for size in sizes:
        data = memoryview(bytearray(os.urandom(size)))
        dest = bytearray(size + 16)
        count = max(20, min(5000, 4_000_000 // size))
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(trials):
            for name, aead in candidates.items():
                start = time.perf_counter()
                for _ in range(count):
                    aead.encrypt_into(nonce, data, b"aad!", dest)
                best[name] = min(best[name], (time.perf_counter() - start) / count)
        for name, seconds in best.items():
            out[f"{name} {size} B us"] = round(seconds * 1e6, 2)
    return out


# ---------------------------------------------------------------- the section


def _run_loop(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def _cases(args: argparse.Namespace, nbytes: int, ctx: Any) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {
        "tls": [],
        "sealed": [],
        "plain": [],
        "small+": [],
        "small": [],
        "ping+": [],
        "ping": [],
    }
    for _ in range(args.repeat):  # in turn, so that load on the machine hits every case alike
        times["tls"] += await tls_rounds(nbytes, 1, ctx)
        times["sealed"] += await bulk_rounds(True, nbytes, 1)
        times["plain"] += await bulk_rounds(False, nbytes, 1)
        times["small+"] += await stream_rounds(True, args.pings, 1)
        times["small"] += await stream_rounds(False, args.pings, 1)
        times["ping+"] += await ping_rounds(True, args.pings // 5, 1)
        times["ping"] += await ping_rounds(False, args.pings // 5, 1)
    return times


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of this section: per loop, TLS against sealed and plain; the 8-byte cost."""
    nbytes = int(args.mib * MiB)
    rows: list[dict[str, Any]] = []
    rows.append({"section": "crypto", "case": "aead", **aead_rates()})
    with tempfile.TemporaryDirectory() as directory:
        ctx = tls_contexts(directory)
        for loop in [name for name in args.loops.split(",") if name]:
            times = _run_loop(loop, _cases(args, nbytes, ctx))
            med = {name: statistics.median(values) for name, values in times.items()}
            mbps = {name: nbytes / med[name] / 1e6 for name in ("tls", "sealed", "plain")}
            rows.append(
                {
                    "section": "crypto",
                    "case": f"{args.mib:g} MiB",
                    "loop": loop,
                    "tls MB/s": round(mbps["tls"], 1),
                    "sealed MB/s": round(mbps["sealed"], 1),
                    "plain MB/s": round(mbps["plain"], 1),
                    "ratio": med["tls"] / med["sealed"],
                    "target": TARGET_TLS,
                    "runs": {
                        k: [round(v, 3) for v in times[k]] for k in ("tls", "sealed", "plain")
                    },
                }
            )
            rows.append(
                {
                    "section": "crypto",
                    "case": "8 B messages",
                    "loop": loop,
                    "sealed us/msg": round(med["small+"], 2),
                    "plain us/msg": round(med["small"], 2),
                    "extra us": med["small+"] - med["small"],
                    "target us": TARGET_SMALL_US,
                    "ping sealed us/msg": round(med["ping+"], 2),
                    "ping plain us/msg": round(med["ping"], 2),
                    "runs": {
                        k: [round(v, 2) for v in times[k]]
                        for k in ("small+", "small", "ping+", "ping")
                    },
                }
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=5, help="rounds per case (median)")
    parser.add_argument("--mib", type=float, default=64.0, help="MiB per bulk transfer")
    parser.add_argument(
        "--pings", type=int, default=5000, help="8 B messages per small round (a fifth as pings)"
    )
    parser.add_argument("--loops", default="asyncio,uvloop", help="comma-separated event loops")


def show(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        if r["case"].startswith("aead"):
            rates = ", ".join(
                f"{k[:-3]} {v:.2f} us" for k, v in r.items() if k not in ("section", "case")
            )
            print(f"AEAD sealing one record (best of interleaved trials): {rates}")
        elif "ratio" in r:
            print(
                f"{r['loop']:<8} {r['case']:>8}: TLS 1.3 {r['tls MB/s']:8.1f} MB/s, sealed "
                f"{r['sealed MB/s']:8.1f} MB/s (ratio {r['ratio']:.2f}, target >= {r['target']}), "
                f"plain {r['plain MB/s']:8.1f} MB/s"
            )
        else:
            print(
                f"{r['loop']:<8} {r['case']}: sealed {r['sealed us/msg']:.2f} us/msg, plain "
                f"{r['plain us/msg']:.2f} us/msg: +{r['extra us']:.2f} us (target <= "
                f"{r['target us']:g}); ping-pong sealed {r['ping sealed us/msg']:.2f}, plain "
                f"{r['ping plain us/msg']:.2f} us/msg"
            )
    print("(medians; the machine is shared, other work runs beside these numbers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    show(run(args))


if __name__ == "__main__":
    main()
