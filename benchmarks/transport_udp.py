"""UDP over an emulated wide-area path: jitter, loss and duplication against a clean path.

This kernel has no netem, so the path is emulated in user space
(``tests/pathemu.py``, in a process of its own): 10 ms each way (a 20 ms
round trip), and per case

* ``clean``            no jitter, no loss (the baseline of every ratio);
* ``jitter``           +-10 ms uniform jitter per datagram each way (it reorders);
* ``jitter+loss``      the same and 5 % loss each way;
* ``jitter+loss+dup``  the same and 1 % duplication each way.

Each repetition sends one 8 MiB array from peer 0 to peer 1 on fresh UDP
channels (slow start included; ``mtu`` 1200) and times it until peer 1 holds
it.  The targets (issue 16): ``jitter`` >= 0.5x ``clean``, ``jitter+loss`` >=
0.25x.  The tcp channel over a TCP forwarder with the same delay and jitter
is printed beside them (the forwarder splits the connection and holds at most
4 MiB per direction, see ``tests/pathemu.py``).  Medians of ``--repeat``;
both peers run on one event loop in this process.

    python benchmarks/transport_udp.py [--repeat 3] [--mib 8] [--cases clean,jitter]

``run(args)`` returns the rows, for ``benchmarks/transport.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fmi_async and tests.pathemu from this checkout

from fmi_async.channels.base import ChannelContext  # noqa: E402
from fmi_async.channels.mailbox import Mailbox  # noqa: E402
from fmi_async.channels.tcp import TCPChannel  # noqa: E402
from fmi_async.channels.udp.channel import UDPChannel  # noqa: E402
from fmi_async.config import Config  # noqa: E402
from fmi_async.holepunch.server import RendezvousServer  # noqa: E402
from fmi_async.wire import dumps, loads  # noqa: E402
from tests.pathemu import PathSpec, StaticDiscovery, TCPPath  # noqa: E402

logger = logging.getLogger(__name__)

SECRET = "bench-secret"
DELAY = 0.010  # each way
CASES: dict[str, dict[str, float]] = {
    "clean": {},
    "jitter": {"jitter": 0.010},
    "jitter+loss": {"jitter": 0.010, "loss": 0.05},
    "jitter+loss+dup": {"jitter": 0.010, "loss": 0.05, "dup": 0.01},
}
TARGETS = {"jitter": 0.5, "jitter+loss": 0.25}


def _config(backend: str, timeout: float, **options: Any) -> Config:
    return Config.from_dict(
        {
            "backends": {backend: {"enabled": True, **options}},
            "timeout": timeout,
            "security": {"secret": SECRET},
        }
    )


async def _transfer(chans: list[Any], nbytes: int, timeout: float) -> float:
    array = np.arange(nbytes, dtype=np.uint8)
    start = time.perf_counter()

    async def receive() -> Any:
        return loads(await chans[1].recv(0, ("u", 0), timeout))

    _, got = await asyncio.gather(chans[0].send(1, ("u", 0), dumps(array)), receive())
    seconds = time.perf_counter() - start
    if not np.array_equal(got, array):
        raise SystemExit("the array arrived changed")
    return seconds


async def udp_once(
    case: dict[str, float], nbytes: int, seed: int, timeout: float
) -> dict[str, Any]:
    """One transfer on fresh channels through a fresh emulator process."""
    config = _config("UDP", timeout, host="127.0.0.1", port=9, traversal="off")
    run_id = uuid.uuid4().hex[:12]
    chans = [UDPChannel(ChannelContext(i, 2, "bench", run_id, config, Mailbox(i))) for i in (0, 1)]
    discoveries = [StaticDiscovery(), StaticDiscovery()]
    for chan, discovery in zip(chans, discoveries, strict=True):
        chan.discovery = discovery
    await asyncio.gather(*(c.open() for c in chans))
    emulator = None
    try:
        a, b = (c.address for c in chans)
        assert a is not None and b is not None
        argv = [f"--a={a[0]}:{a[1]}", f"--b={b[0]}:{b[1]}", f"--delay={DELAY}"]
        argv += [f"--{k}={v}" for k, v in case.items()] + [f"--seed={seed}"]
        emulator = await asyncio.create_subprocess_exec(
            *(sys.executable, str(ROOT / "tests" / "pathemu.py"), *argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert emulator.stdout is not None
        ports = json.loads(await asyncio.wait_for(emulator.stdout.readline(), 30))
        discoveries[0].set(1, tuple(ports["facing_a"]))  # type: ignore[arg-type]
        discoveries[1].set(0, tuple(ports["facing_b"]))  # type: ignore[arg-type]
        seconds = await _transfer(chans, nbytes, timeout)
        counters = dict(chans[0].stats.requests)
        duplicates = chans[1].stats.requests["duplicate"]
    finally:
        await asyncio.gather(*(c.close() for c in chans))
        if emulator is not None:
            out, _ = await asyncio.wait_for(emulator.communicate(b""), 30)
    path = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "seconds": seconds,
        "retransmit": counters.get("retransmit", 0),
        "timeout": counters.get("timeout", 0),
        "duplicate": duplicates,
        "reordered": path["a->b"].get("reordered", 0),
    }


async def tcp_once(case: dict[str, float], nbytes: int, seed: int, timeout: float) -> float:
    """The tcp channel through a TCP forwarder with the same delay and jitter."""
    async with RendezvousServer(SECRET.encode()) as srv:
        host, port = srv.address
        config = _config("TCP", timeout, host=host, port=port, traversal="off")
        run_id = uuid.uuid4().hex[:12]
        chans = [
            TCPChannel(ChannelContext(i, 2, "bench", run_id, config, Mailbox(i))) for i in (0, 1)
        ]
        await asyncio.gather(*(c.open() for c in chans))
        spec = PathSpec(DELAY, case.get("jitter", 0.0), queue=4 * 1024 * 1024, seed=seed)
        path = await TCPPath(spec).start(chans[1].listen_address)
        real_lookup = chans[0]._lookup

        async def through_path(dst: int) -> Any:  # peer 0 dials the forwarder, not peer 1
            info = await real_lookup(dst)
            return type(info)(info.peer, path.address, info.id, info.nat)

        chans[0]._lookup = through_path  # type: ignore[method-assign]
        try:
            return await _transfer(chans, nbytes, timeout)
        finally:
            await asyncio.gather(*(c.close() for c in chans))
            await path.close()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of this section: one per case and channel, medians, ratios to ``clean``."""
    nbytes = int(args.mib * 1024 * 1024)
    names = [c for c in args.cases.split(",") if c]
    rows: list[dict[str, Any]] = []
    base: float | None = None
    for name in names:
        case = CASES[name]
        runs = [
            asyncio.run(udp_once(case, nbytes, seed, args.timeout)) for seed in range(args.repeat)
        ]
        seconds = statistics.median(r["seconds"] for r in runs)
        if name == "clean":
            base = seconds
        row: dict[str, Any] = {
            "section": "udp",
            "case": name,
            "channel": "udp",
            "seconds": seconds,
            "MB/s": nbytes / seconds / 1e6,
            "ratio": (base / seconds) if base else None,
            "target": TARGETS.get(name),
            "runs": [round(r["seconds"], 3) for r in runs],
            "retransmit": statistics.median(r["retransmit"] for r in runs),
            "duplicate": statistics.median(r["duplicate"] for r in runs),
            "timeout": statistics.median(r["timeout"] for r in runs),
        }
        rows.append(row)
        if args.tcp and "loss" not in case:  # the forwarder emulates delay and jitter only
            tcp = [
                asyncio.run(tcp_once(case, nbytes, seed, args.timeout))
                for seed in range(args.repeat)
            ]
            tcp_seconds = statistics.median(tcp)
            rows.append(
                {
                    "section": "udp",
                    "case": name,
                    "channel": "tcp",
                    "seconds": tcp_seconds,
                    "MB/s": nbytes / tcp_seconds / 1e6,
                    "udp/tcp": tcp_seconds / seconds,
                    "runs": [round(s, 3) for s in tcp],
                }
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="transfers per case (median)")
    parser.add_argument("--mib", type=float, default=8.0, help="MiB per transfer")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--timeout", type=float, default=180.0, help="config timeout, seconds")
    parser.add_argument("--no-tcp", dest="tcp", action="store_false", help="skip the tcp rows")


def show(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<18}{'channel':<8}{'seconds':>9}{'MB/s':>8}{'ratio':>7}{'target':>7}  notes")
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else ""
        target = f"{r['target']:.2f}" if r.get("target") else ""
        if r["channel"] == "udp":
            notes = f"retx {r['retransmit']:g}, dup {r['duplicate']:g}, rto {r['timeout']:g}"
        else:
            notes = f"udp/tcp speed {r['udp/tcp']:.2f}"
        notes += f"  runs {r['runs']}"
        print(
            f"{r['case']:<18}{r['channel']:<8}{r['seconds']:>9.3f}{r['MB/s']:>8.2f}"
            f"{ratio:>7}{target:>7}  {notes}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    rows = run(args)
    show(rows)


if __name__ == "__main__":
    main()
