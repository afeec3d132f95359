"""Hole punching across real kernel NAT: network namespaces, veth pairs, nftables.

Topology (every address exists only inside namespaces this test creates)::

    lan1 (10.1.0.2, peers 0 and 1)        lan2 (10.2.0.2, peers 2 and 3)
        |                                      |
    nat1 (10.1.0.1 | 172.16.1.2)          nat2 (10.2.0.1 | 172.16.2.2)
        |   masquerade                         |   masquerade
        +----------- pub (172.16.1.1, 172.16.2.1; rendezvous server) ---+

Each NAT also drops new inbound connections on its public side, as a home
router's firewall does, so only punched (or reply) traffic passes.  With
plain ``masquerade`` the kernel keeps source ports when it can
(endpoint-independent in practice), so punching succeeds; with
``masquerade fully-random`` every connection gets a random port
(symmetric), punching across the NATs fails and the relay carries those
pairs.  Peers behind the same NAT reach each other at their private address.

Needs root, ``ip`` and ``nft``; skipped with the reason otherwise.  Every
namespace carries a per-run name prefix; leftovers of earlier runs are removed
first, and everything is removed afterwards, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

PREFIX = "fmihp-"
REPO = Path(__file__).resolve().parents[2]
SERVER = "172.16.1.1"
PORT = 10000


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "kernel NAT tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "kernel NAT tests need root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"kernel NAT tests need `{tool}` (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str, ns: str | None = None, input: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def cleanup_leftovers() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def build(tag: str, random_ports: bool) -> dict[str, str]:
    """Create the namespaces; returns role -> namespace name."""
    ns = {role: f"{PREFIX}{tag}-{role}" for role in ("pub", "nat1", "nat2", "lan1", "lan2")}
    for name in ns.values():
        sh("ip", "netns", "add", name)
        sh("ip", "link", "set", "lo", "up", ns=name)
    for i in (1, 2):
        nat, lan = ns[f"nat{i}"], ns[f"lan{i}"]
        # Interface names are created in the namespace that owns them, so they never clash
        # with the host's; veth ends move with `netns`.
        sh("ip", "link", "add", "wan", "type", "veth", "peer", "name", f"up{i}", ns=nat)
        sh("ip", "link", "set", f"up{i}", "netns", ns["pub"], ns=nat)
        sh("ip", "addr", "add", f"172.16.{i}.2/24", "dev", "wan", ns=nat)
        sh("ip", "link", "set", "wan", "up", ns=nat)
        sh("ip", "addr", "add", f"172.16.{i}.1/24", "dev", f"up{i}", ns=ns["pub"])
        sh("ip", "link", "set", f"up{i}", "up", ns=ns["pub"])
        sh("ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", ns=nat)
        sh("ip", "link", "set", "eth0", "netns", lan, ns=nat)
        sh("ip", "addr", "add", f"10.{i}.0.1/24", "dev", "lan", ns=nat)
        sh("ip", "link", "set", "lan", "up", ns=nat)
        sh("ip", "addr", "add", f"10.{i}.0.2/24", "dev", "eth0", ns=lan)
        sh("ip", "link", "set", "eth0", "up", ns=lan)
        sh("ip", "route", "add", "default", "via", f"10.{i}.0.1", ns=lan)
        sh("ip", "route", "add", "default", "via", f"172.16.{i}.1", ns=nat)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=nat)
        how = "masquerade fully-random" if random_ports else "masquerade"
        rules = f"""
            table ip nat {{
              chain post {{
                type nat hook postrouting priority srcnat; policy accept;
                oifname "wan" {how}
              }}
            }}
            table inet fw {{
              chain forward {{
                type filter hook forward priority filter; policy accept;
                iifname "wan" ct state new drop
              }}
              chain input {{
                type filter hook input priority filter; policy accept;
                iifname "wan" ct state new drop
              }}
            }}
        """
        sh("nft", "-f", "-", ns=nat, input=textwrap.dedent(rules))
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns["pub"])
    return ns


def destroy(ns: dict[str, str]) -> None:
    for name in ns.values():
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


PEER = textwrap.dedent(
    """
    import asyncio, json, sys
    import fmi_async as fmi

    async def main():
        peer, n, run_id, host, port, secret, channel, lan_address, punch = sys.argv[1:10]
        options = {"host": host, "port": int(port), "punch_timeout": float(punch),
                   "connect_timeout": 3.0}
        if channel == "tcp":
            backends = {"TCP": {**options, "bind": "0.0.0.0"}}
        else:  # its own LAN address, so that peers behind the same NAT find each other
            backends = {"UDP": {**options, "bind": lan_address}}
        config = fmi.Config.from_dict({
            "backends": backends, "security": {"secret": secret}, "timeout": 20.0,
        })
        comm = fmi.Communicator(int(peer), int(n), config, run_id=run_id)
        async with comm:
            total = await comm.allreduce(int(peer) + 1)
            total = await comm.allreduce(total)  # a second round over the same pairs
            stats = comm.stats()["channels"][channel]
            assert stats["messages_sent"] > 0, stats
            pairs = stats["pairs"]
        print(json.dumps({"peer": int(peer), "total": total, "pairs": pairs}), flush=True)

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def netns_ready() -> Iterator[None]:
    reason = _why_not()
    if reason is not None:
        print(f"skipping kernel NAT tests: {reason}")
        pytest.skip(reason)
    cleanup_leftovers()
    yield
    cleanup_leftovers()


def run_job(
    ns: dict[str, str], tmp: Path, channel: str = "tcp", punch_timeout: float = 1.0
) -> list[dict[str, object]]:
    secret = uuid.uuid4().hex
    (tmp / "secret").write_text(secret)
    (tmp / "peer.py").write_text(PEER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("FMI_NAT_GATEWAY", None)
    server = subprocess.Popen(
        [
            *("ip", "netns", "exec", ns["pub"], sys.executable, "-m", "fmi_async"),
            # Its one public address, not 0.0.0.0: the public namespace has an
            # address per segment, and a wildcard-bound UDP socket answers from
            # the outgoing route's address, which the peer's NAT does not let in.
            *("rendezvous", "--host", SERVER, "--port", str(PORT)),
            *("--secret-file", str(tmp / "secret")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    peers: list[subprocess.Popen[str]] = []
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # bounded: the server prints at once or exits
        assert "listening" in line, line
        run_id = uuid.uuid4().hex[:12]
        for i in range(4):
            lan = ns["lan1"] if i < 2 else ns["lan2"]
            lan_address = "10.1.0.2" if i < 2 else "10.2.0.2"
            argv = [str(i), "4", run_id, SERVER, str(PORT), secret, channel, lan_address,
                    str(punch_timeout)]  # fmt: skip
            peers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", lan, sys.executable, str(tmp / "peer.py"), *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        results = []
        deadline = time.monotonic() + 25.0
        for proc in peers:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in [*peers, server]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.mark.parametrize("channel", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("random_ports", "across"), [(False, "direct"), (True, "relayed")], ids=["preserving", "random"]
)
def test_allreduce_across_kernel_nat(
    netns_ready: None, tmp_path: Path, random_ports: bool, across: str, channel: str
) -> None:
    tag = f"{os.getpid() % 10000}{'r' if random_ports else 'p'}{channel[0]}"
    ns: dict[str, str] = {}
    try:
        ns = build(tag, random_ports)
        # Punchable NATs get a generous bound, so a loaded host cannot turn a
        # slow punch into a relay; unpunchable ones a short one, as each pair
        # across them waits it out before the relay takes over.
        results = run_job(ns, tmp_path, channel, 1.0 if random_ports else 3.0)
    finally:
        destroy(ns or {r: f"{PREFIX}{tag}-{r}" for r in ("pub", "nat1", "nat2", "lan1", "lan2")})
    assert sorted(r["peer"] for r in results) == [0, 1, 2, 3]  # type: ignore[type-var]
    assert all(r["total"] == 40 for r in results)  # 4 * (1 + 2 + 3 + 4)
    for r in results:
        me = int(r["peer"])  # type: ignore[call-overload]
        pairs = {int(k): v for k, v in r["pairs"].items()}  # type: ignore[attr-defined]
        for other, how in pairs.items():
            same_lan = (me < 2) == (other < 2)
            assert how == ("direct" if same_lan else across), (me, pairs)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert f"{PREFIX}{tag}" not in listed.stdout
