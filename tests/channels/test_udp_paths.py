"""The UDP channel on paths with a real round trip: jitter, reordering, loss, duplication.

Three levels:

* the sans-IO parts (:class:`Congestion`, duplicate reports, the sender's
  reordering window) with a virtual clock, deterministic;
* real UDP channels on loopback through :class:`tests.pathemu.UDPPath`, a
  user-space path emulator (this kernel has no netem): every byte arrives
  exactly once and in order per message, within the config deadline;
* kernel-level loss: two network namespaces joined by a veth pair whose
  nftables rules drop a share of UDP at random (root only, skipped otherwise).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fmi_async.channels.base import ChannelContext
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.udp.channel import UDPChannel
from fmi_async.channels.udp.congestion import MIN_CWND, Congestion
from fmi_async.channels.udp.datagram import Ack, decode, encode_ack, encode_data, session_tag
from fmi_async.channels.udp.reliable import Endpoint, LinkParams
from fmi_async.config import Config
from fmi_async.wire import dumps, encode_frame
from tests.channels.test_reliable import Net, _InFlight, values
from tests.helpers import recv, same, send
from tests.pathemu import PathSpec, StaticDiscovery, UDPPath

TAG = session_tag("W", "run", b"secret")
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- sans-IO


class JitterNet(Net):
    """Every datagram takes ``delay`` plus a uniform draw from +-``jitter``: it reorders."""

    def __init__(self, params: LinkParams, seed: int, jitter: float, **kw: Any) -> None:
        super().__init__(params, seed=seed, **kw)
        self.jitter = jitter

    def _emit(self, src: int, data: bytes) -> None:
        self.sent += 1
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            at = self.now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
            heapq.heappush(self.wire, _InFlight(at, next(self.order), 1 - src, data))


WAN = LinkParams()  # the defaults: mtu 1200, window 256


def test_an_ack_carries_a_duplicate_report() -> None:
    ack = decode(encode_ack(TAG, 1, 0, 7, 10, 64, [(12, 15)], duplicate=3), TAG)
    assert isinstance(ack, Ack) and ack.duplicate == 3 and ack.ranges == ((12, 15),)
    plain = decode(encode_ack(TAG, 1, 0, 7, 10, 64, [(12, 15)]), TAG)
    assert isinstance(plain, Ack) and plain.duplicate is None


def test_the_receiver_reports_the_duplicate_it_got() -> None:
    end = Endpoint(1, 2, TAG, WAN)
    frame = b"".join(encode_frame(("u", 0), dumps("once")))
    data = encode_data(TAG, 0, 1, 7, 0, True, frame)
    end.receive(data, 0.0)
    end.link(0).poll(0.0)
    end.receive(data, 0.001)
    ack, _ = end.link(0).poll(0.001)
    assert ack is not None
    parsed = decode(ack, TAG)
    assert isinstance(parsed, Ack) and parsed.duplicate == 0 and parsed.cumulative == 1
    later, _ = end.link(0).poll(1.0)
    assert later is None  # reported once
    assert len(end.link(0).receiver.messages) == 1


def test_random_loss_below_the_tolerance_keeps_the_window() -> None:
    counters: Counter[str] = Counter()
    cc = Congestion(256.0, 0.1, counters)
    rng = random.Random(4)
    for _ in range(200):  # rounds of 5 % random loss
        lost = sum(rng.random() < 0.05 for _ in range(int(cc.cwnd)))
        cc.on_acked(int(cc.cwnd) - lost)
        cc.on_lost(lost)
        cc.end_round()
    assert cc.cwnd == 256.0 and counters["congestion"] == 0


def test_heavy_loss_halves_the_window_once_per_round_and_spurious_ones_are_undone() -> None:
    counters: Counter[str] = Counter()
    cc = Congestion(256.0, 0.1, counters)
    cc.on_acked(190)  # slow start: 10 + 190
    assert cc.cwnd == 200.0
    cc.on_lost(80)
    for _ in range(3):
        cc.on_retransmit()
    cc.end_round()
    assert cc.cwnd == 100.0 and cc.ssthresh == 100.0 and counters["congestion"] == 1
    cc.end_round()  # too few fragments since: no judgement, no second halving
    assert cc.cwnd == 100.0
    for _ in range(3):  # the receiver had all three already
        cc.on_spurious()
    assert cc.cwnd == 200.0 and cc.ssthresh == 256.0 and counters["undo"] == 1


def test_a_real_loss_among_the_retransmissions_keeps_the_reduction() -> None:
    cc = Congestion(256.0, 0.1, Counter())
    cc.on_acked(190)
    cc.on_lost(80)
    cc.on_retransmit()
    cc.on_retransmit()
    cc.end_round()
    cc.on_spurious()  # one of two was needless, the other repaired a real loss
    assert cc.cwnd == 100.0


def test_two_timeouts_collapse_the_window_and_it_grows_back() -> None:
    cc = Congestion(256.0, 0.1, Counter())
    cc.on_acked(90)
    cc.on_timeout(1)
    assert cc.cwnd == 100.0
    cc.on_timeout(2)
    assert cc.cwnd == MIN_CWND and cc.ssthresh == 50.0
    cc.on_acked(48)  # slow start again up to the threshold
    assert cc.cwnd == 50.0 and not cc.slow_start


def test_pacing_spaces_fragments_by_a_share_of_the_round_trip() -> None:
    cc = Congestion(256.0, 0.1, Counter())
    cc.on_acked(90)  # cwnd 100, slow start: gain 2
    cc.sent(1.0, None)
    assert cc.may_send(1.0)  # nothing measured yet: no pacing
    for _ in range(50):
        cc.sent(1.0, 0.1)
    assert not cc.may_send(1.0)
    assert cc.pace_next == pytest.approx(1.0 - 0.002 + 50 * 0.1 / 200)  # 2 ms of credit


def test_a_sender_spreads_its_window_over_the_round_trip() -> None:
    end = Endpoint(0, 2, TAG, WAN)
    sender = end.link(1).sender
    sender.queue([bytes(WAN.payload_size * 400)], copy=True)
    sender.timer.sample(0.02)
    sender.cc.cwnd = 100.0  # slow start, gain 2: a fragment every 0.1 ms
    bursts = []
    for ms in range(5):
        out: list[bytes] = []
        sender.poll(1.0 + ms / 1000, out)
        bursts.append(len(out))
        assert sender.deadline is not None and sender.deadline <= 1.0 + ms / 1000 + 0.0002
    # 2 ms of credit at first, then what each millisecond allows (not all 100 at once)
    assert bursts[0] in (20, 21) and all(b in (10, 11) for b in bursts[1:])
    assert sender._inflight == sum(bursts) < 100


def test_jitter_without_loss_costs_no_congestion_and_few_retransmissions() -> None:
    net = JitterNet(WAN, seed=11, jitter=0.01, delay=0.01)
    blob = bytes(range(256)) * 8192  # 2 MiB
    net.send(0, blob)
    net.run(max_steps=500_000)
    assert values(net, 1) == [blob]
    counters, sender = net.ends[0].counters, net.ends[0].link(1).sender
    assert counters["congestion"] == 0 and sender.cwnd == WAN.window
    fragments = len(blob) // WAN.payload_size
    assert counters["retransmit"] < fragments // 50  # it was every fourth
    assert counters["spurious"] == net.ends[1].counters["duplicate"]
    assert sender._reordering


def test_jitter_loss_and_duplication_deliver_every_message_once_in_order() -> None:
    params = replace(WAN, window=64, recv_buffer=256 * 1024)
    net = JitterNet(params, seed=5, jitter=0.008, delay=0.01, loss=0.05, dup=0.02)
    sent = [bytes([i]) * (i * 9001 % 70_000) for i in range(24)]
    for m in sent:
        net.send(0, m)
        net.send(1, m[::-1])
    net.run(max_steps=500_000)
    assert values(net, 1) == sent
    assert values(net, 0) == [m[::-1] for m in sent]
    assert net.ends[0].counters["retransmit"] > 0
    for end in net.ends:
        for link in end.links.values():
            assert link.sender.idle and link.sender.error is None
            assert not link.receiver.mid_message


# ---------------------------------------------------------------- emulated paths


def make_config(**options: Any) -> Config:
    return Config.from_dict(
        {
            "backends": {
                "UDP": {"enabled": True, "host": "127.0.0.1", "port": 9, "traversal": "off"}
                | options
            },
            "timeout": 30.0,
            "security": {"secret": "path-secret"},
        }
    )


@asynccontextmanager
async def pair_over(
    spec: PathSpec, **options: Any
) -> AsyncIterator[tuple[list[UDPChannel], UDPPath]]:
    """Two UDP channels whose datagrams cross an emulated path both ways."""
    config = make_config(**options)
    run_id = uuid.uuid4().hex[:12]
    chans = [UDPChannel(ChannelContext(i, 2, "P", run_id, config, Mailbox(i))) for i in (0, 1)]
    found = [StaticDiscovery(), StaticDiscovery()]
    for chan, discovery in zip(chans, found, strict=True):
        chan.discovery = discovery
    await asyncio.gather(*(c.open() for c in chans))
    a, b = chans[0].address, chans[1].address
    assert a is not None and b is not None
    path = await UDPPath(spec).start(a, b)
    found[0].set(1, path.facing_a)
    found[1].set(0, path.facing_b)
    try:
        yield chans, path
    finally:
        await asyncio.gather(*(c.close() for c in chans))
        await path.close()


MESSAGES: list[Any] = [
    b"",
    "tiny",
    b"x" * 50_000,
    np.arange(150_000, dtype=np.int64),  # 1.2 MB: sent from the caller's memory
    [1, {"two": np.ones(3)}],
    b"y" * 5_000,
]

PATHS = {
    "jitter": PathSpec(delay=0.005, jitter=0.005),
    "jitter-loss-dup": PathSpec(delay=0.005, jitter=0.005, loss=0.05, dup=0.02),
    "lossy-bottleneck": PathSpec(delay=0.002, loss=0.1, rate=4e6, queue=256 * 1024),
}


@pytest.mark.parametrize("name", list(PATHS))
async def test_messages_cross_an_emulated_path_exactly_once_in_order(name: str) -> None:
    async with pair_over(replace(PATHS[name], seed=len(name))) as (chans, path):

        async def one_way(src: int, dst: int) -> None:
            for tag, value in enumerate(MESSAGES):
                await send(chans[src], dst, value, tag=tag % 2)

        async def receive(src: int, dst: int) -> list[Any]:
            return [await recv(chans[dst], src, tag % 2, 30.0) for tag in range(len(MESSAGES))]

        _, _, got01, got10 = await asyncio.gather(
            one_way(0, 1), one_way(1, 0), receive(0, 1), receive(1, 0)
        )
        for got in (got01, got10):
            assert len(got) == len(MESSAGES) and all(map(same, got, MESSAGES))
        stats = path.stats()
        assert stats["a->b"]["delivered"] > 0 and stats["b->a"]["delivered"] > 0
        if PATHS[name].loss:
            assert stats["a->b"]["lost"] > 0
            assert chans[0].stats.requests["retransmit"] > 0
        if PATHS[name].jitter:
            assert stats["a->b"]["reordered"] > 0
        await asyncio.sleep(0)
        for chan in chans:  # nothing extra is waiting: exactly once
            assert chan.mailbox.pending() == 0


# ---------------------------------------------------------------- kernel-level loss

PREFIX = "fmiudp-"
BINDS = ("10.77.0.1", "10.77.0.2")

PEER = textwrap.dedent(
    """
    import asyncio, hashlib, json, sys
    import numpy as np
    import fmi_async as fmi

    async def main():
        peer, run_id, host, port, secret, bind = sys.argv[1:7]
        config = fmi.Config.from_dict({
            "backends": {"UDP": {"host": host, "port": int(port), "bind": bind,
                                 "traversal": "off", "connect_timeout": 5.0}},
            "security": {"secret": secret}, "timeout": 60.0,
        })
        comm = fmi.Communicator(int(peer), 2, config, run_id=run_id)
        data = np.random.default_rng(7).integers(0, 255, 1024 * 1024, dtype=np.uint8)
        async with comm:
            if comm.rank == 0:
                for i in range(3):
                    await comm.send(data[i:], 1, tag=i)
                digest = await comm.recv(1, tag=9)
            else:
                got = [await comm.recv(0, tag=i) for i in range(3)]
                ok = all(np.array_equal(g, data[i:]) for i, g in enumerate(got))
                digest = hashlib.sha256(b"".join(g.tobytes() for g in got)).hexdigest()
                await comm.send([ok, digest], 0, tag=9)
            stats = comm.stats()["channels"]["udp"]["requests"]
        print(json.dumps({"peer": int(peer), "digest": digest, "requests": stats}), flush=True)

    asyncio.run(main())
    """
)


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "kernel loss tests need Linux network namespaces"
    if os.geteuid() != 0:
        return "kernel loss tests need root (network namespaces, nftables)"
    from shutil import which

    for tool in ("ip", "nft"):
        if which(tool) is None:
            return f"kernel loss tests need `{tool}` (apt-get install iproute2 nftables)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*args: str, ns: str | None = None, input: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


@pytest.fixture
def lossy_namespaces() -> Iterator[list[str]]:
    """Namespaces a (10.77.0.1) and b (10.77.0.2) on a veth pair; each drops 5 % of UDP in."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    names = [f"{PREFIX}{tag}-a", f"{PREFIX}{tag}-b"]
    try:
        for name in names:
            _sh("ip", "netns", "add", name)
            _sh("ip", "link", "set", "lo", "up", ns=name)
        _sh("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", ns=names[0])
        _sh("ip", "link", "set", "vb", "netns", names[1], ns=names[0])
        for name, dev, addr in zip(names, ("va", "vb"), ("10.77.0.1", "10.77.0.2"), strict=True):
            _sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=name)
            _sh("ip", "link", "set", dev, "up", ns=name)
            rules = f"""
                table inet lossy {{
                  chain input {{
                    type filter hook input priority filter; policy accept;
                    iifname "{dev}" meta l4proto udp numgen random mod 100 < 5 counter drop
                  }}
                }}
            """
            _sh("nft", "-f", "-", ns=name, input=textwrap.dedent(rules))
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.netns
def test_kernel_level_loss_between_namespaces(lossy_namespaces: list[str], tmp_path: Path) -> None:
    secret = uuid.uuid4().hex
    (tmp_path / "secret").write_text(secret)
    (tmp_path / "peer.py").write_text(PEER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("FMI_NAT_GATEWAY", None)
    server_cmd = [sys.executable, "-m", "fmi_async", "rendezvous", "--host", "10.77.0.1"]
    server_cmd += ["--port", "10000", "--secret-file", str(tmp_path / "secret")]
    server = subprocess.Popen(
        ["ip", "netns", "exec", lossy_namespaces[0], *server_cmd],
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
        for i, (ns, bind) in enumerate(zip(lossy_namespaces, BINDS, strict=True)):
            argv = [str(i), run_id, "10.77.0.1", "10000", secret, bind]
            peers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, str(tmp_path / "peer.py"), *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        results = []
        deadline = time.monotonic() + 90.0
        for proc in peers:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in [*peers, server]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    sender, receiver = results
    ok, digest = sender["digest"]
    assert ok and digest == receiver["digest"]
    assert sender["requests"].get("retransmit", 0) > 0  # the kernel did drop
