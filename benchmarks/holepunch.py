"""Hole punching: time to pair, and throughput of direct versus relayed pairs.

Measured in one run, medians over repetitions, with ratios:

* **pair time through the simulated NAT**: first message 0 -> 1 between two
  TCP channels each behind a port-restricted ``NATBox`` (lookup, join,
  invite, punch, proof, verdict), against the same first message with no NAT
  (lookup, connect, proof);
* **pair time through real kernel NAT** (root only; network namespaces with
  nftables masquerade, as in ``tests/holepunch/test_kernel_nat.py``): the same first
  message between peers in two private networks;
* **throughput direct vs relayed** across real kernel NAT: 64 MiB arrays over a
  punched pair (port-preserving masquerade) and over a relayed pair
  (``masquerade fully-random``), each peer its own process.  In-process
  simulated-NAT throughput is not reported: there every byte is copied by
  Python NAT boxes sharing the CPU with the peers, which says nothing about
  either path.

    python benchmarks/holepunch.py [--reps 15] [--mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.tcp import TCPChannel
from fmi_async.config import Config
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.natsim import NATBox
from fmi_async.wire import dumps

SECRET = "bench-secret"


async def first_message_seconds(srv: RendezvousServer, nat: list[dict[str, Any]] | None) -> float:
    host, port = srv.address
    run_id = uuid.uuid4().hex[:12]
    chans = []
    for i in range(2):
        tcp: dict[str, Any] = {"host": host, "port": port}
        if nat is not None:
            tcp["nat"] = nat[i]
        config = Config.from_dict({"backends": {"TCP": tcp}, "security": {"secret": SECRET}})
        chans.append(TCPChannel(ChannelContext(i, 2, "B", run_id, config, Mailbox(i))))
    await asyncio.gather(*(c.open() for c in chans))
    try:
        start = time.perf_counter()
        await chans[0].send(1, ("u", 0), dumps(b"x"))
        await chans[1].recv(0, ("u", 0), 10.0)
        return time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in chans))


async def simulated(reps: int) -> tuple[float, float]:
    async with RendezvousServer(SECRET.encode()) as srv:
        boxes = [NATBox("port-restricted") for _ in range(2)]
        for box in boxes:
            await box.start()
        try:
            options = [b.options() for b in boxes]
            natted = [await first_message_seconds(srv, options) for _ in range(reps)]
            plain = [await first_message_seconds(srv, None) for _ in range(reps)]
        finally:
            for box in boxes:
                await box.close()
    return statistics.median(natted), statistics.median(plain)


PEER = """
import asyncio, json, sys, time
import numpy as np
import fmi_async as fmi

async def main():
    peer, base, host, port, secret, reps, mib = sys.argv[1:8]
    peer, reps, mib = int(peer), int(reps), int(mib)
    pair_times, rates, how = [], [], None
    for rep in range(reps):
        config = fmi.Config.from_dict({
            "backends": {"TCP": {"host": host, "port": int(port), "bind": "0.0.0.0",
                                 "punch_timeout": 1.0}},
            "security": {"secret": secret}, "timeout": 60.0})
        async with fmi.Communicator(peer, 2, config, run_id=f"{base}-{rep}") as comm:
            start = time.perf_counter()
            if peer == 0:
                await comm.send(b"x", 1)
                await comm.recv(1)
            else:
                await comm.recv(0)
                await comm.send(b"x", 0)
            pair_times.append(time.perf_counter() - start)
            if rep == 0:
                data = np.ones(mib * 2**20 // 8)
                for _ in range(3):
                    await comm.barrier()
                    start = time.perf_counter()
                    if peer == 0:
                        await comm.send(data, 1)
                        await comm.recv(1)
                    else:
                        await comm.recv(0)
                        await comm.send(b"ok", 0)
                    rates.append(data.nbytes / (time.perf_counter() - start))
            how = comm.stats()["channels"]["tcp"]["pairs"]
            await comm.barrier()
    print(json.dumps({"pair": pair_times, "rates": rates, "how": how}), flush=True)

asyncio.run(main())
"""


def kernel(reps: int, mib: int, random_ports: bool) -> dict[str, Any] | None:
    """Two peers behind two kernel NATs; None (with a note) when not possible here."""
    import tests.holepunch.test_kernel_nat as k

    reason = k._why_not()
    if reason is not None:
        print(f"  kernel NAT: skipped ({reason})")
        return None
    k.cleanup_leftovers()
    tag = f"b{os.getpid() % 10000}{'r' if random_ports else 'p'}"
    ns = k.build(tag, random_ports)
    server = None
    try:
        tmp = Path(tempfile.mkdtemp())
        (tmp / "secret").write_text(SECRET)
        (tmp / "peer.py").write_text(PEER)
        env = {**os.environ, "PYTHONPATH": str(k.REPO)}
        server = subprocess.Popen(
            [
                *("ip", "netns", "exec", ns["pub"], sys.executable, "-m", "fmi_async"),
                *("rendezvous", "--host", "0.0.0.0", "--port", str(k.PORT)),
                *("--secret-file", str(tmp / "secret")),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert server.stdout is not None and "listening" in server.stdout.readline()
        base = uuid.uuid4().hex[:8]
        procs = [
            subprocess.Popen(
                [
                    *("ip", "netns", "exec", ns[f"lan{i + 1}"], sys.executable),
                    *(str(tmp / "peer.py"), str(i), base, k.SERVER, str(k.PORT), SECRET),
                    *(str(reps), str(mib)),
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        results: dict[str, Any] = json.loads(outs[0].strip().splitlines()[-1])
        return results
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=5)
        k.destroy(ns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    natted, plain = asyncio.run(simulated(args.reps))
    print(f"pair time, simulated port-restricted NAT: {natted * 1e3:.2f} ms (median)")
    print(f"first message, no NAT (plain connect):     {plain * 1e3:.2f} ms")
    print(f"  ratio NAT / no NAT: {natted / plain:.1f}x")
    direct = kernel(args.reps, args.mib, random_ports=False)
    relayed = kernel(args.reps, args.mib, random_ports=True)
    if direct is None or relayed is None:
        return
    d_pair, r_pair = statistics.median(direct["pair"]), statistics.median(relayed["pair"])
    d_rate, r_rate = statistics.median(direct["rates"]), statistics.median(relayed["rates"])
    print(f"pair time, kernel NAT, punched ({direct['how']}): {d_pair * 1e3:.2f} ms")
    print(f"pair time, kernel NAT, relayed ({relayed['how']}): {r_pair * 1e3:.2f} ms")
    print(f"throughput {args.mib} MiB, direct:  {d_rate / 2**20:.0f} MiB/s")
    print(f"throughput {args.mib} MiB, relayed: {r_rate / 2**20:.0f} MiB/s")
    print(f"  ratio relayed / direct: {r_rate / d_rate:.2f}")


if __name__ == "__main__":
    main()
