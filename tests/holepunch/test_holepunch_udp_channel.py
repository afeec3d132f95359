"""The UDP channel through simulated NATs: punched pairs, the server's UDP relay, stats.

Every peer sits behind its own NAT box.  Port-restricted cones (endpoint-
independent mapping) punch, so every pair must be direct; symmetric NATs on
both sides cannot, so every pair is relayed through the rendezvous server's
UDP port, and the results must be the same.  Loss, duplication and reordering
injected by the boxes must be repaired by the channel's reliability.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.holepunch import UDPHolePuncher
from fmi_async.holepunch.server import RendezvousServer
from fmi_async.holepunch.udp import RELAY_HOST, UDP_RELAY
from fmi_async.natsim import NATBehavior, NATBox, network_from_options
from tests.helpers import nat_udp_group
from tests.holepunch.test_holepunch_collectives import _all, _suite

EXPECTED = {"port-restricted": "direct", "symmetric": "relayed"}
CASES = [("port-restricted", n) for n in (2, 3, 5, 8)] + [("symmetric", n) for n in (2, 5)]


def pairs_of(comms: list[fmi.Communicator]) -> list[dict[int, str]]:
    return [c.stats()["channels"]["udp"]["pairs"] for c in comms]


def assert_agree(pairs: list[dict[int, str]]) -> None:
    """Both sides of a pair were told the same verdict."""
    for i, mine in enumerate(pairs):
        for j, how in mine.items():
            if i in pairs[j]:
                assert pairs[j][i] == how, (i, j, pairs)


@pytest.mark.parametrize(("kind", "size"), CASES)
async def test_collectives_behind_nat_over_udp(kind: str, size: int) -> None:
    start = time.monotonic()
    async with nat_udp_group(kind)(size, timeout=20.0) as comms:
        await _suite(comms)
        pairs = pairs_of(comms)
    assert all(pairs), "every peer paired with someone"
    assert {how for p in pairs for how in p.values()} == {EXPECTED[kind]}, pairs
    assert_agree(pairs)
    assert time.monotonic() - start < 30.0


async def test_stats_show_direct_and_relayed_pairs() -> None:
    """Two symmetric NATs cannot punch each other; each punches a full cone."""
    kinds = ["symmetric", "symmetric", "full-cone"]
    async with nat_udp_group(kinds)(3, timeout=20.0) as comms:
        got = await _all(comms, lambda c: c.allgather(np.full(1000, c.peer_id)))
        for g in got:
            assert [int(a[0]) for a in g] == [0, 1, 2]
        pairs = pairs_of(comms)
    assert pairs[0] == {1: "relayed", 2: "direct"}, pairs
    assert pairs[1] == {0: "relayed", 2: "direct"}, pairs
    assert pairs[2] == {0: "direct", 1: "direct"}, pairs


@pytest.mark.parametrize("kind", ["port-restricted", "symmetric"])
async def test_loss_duplication_and_reordering_are_repaired(kind: str) -> None:
    """Seeded impairments on every datagram the boxes let in, punched or relayed."""
    behaviors = [
        NATBehavior(
            mapping="endpoint-independent"
            if kind == "port-restricted"
            else "address-and-port-dependent",
            filtering="address-and-port-dependent",
            port_preserving=kind == "port-restricted",
            loss=0.1,
            duplicate=0.05,
            reorder=0.2,
            seed=seed,
        )
        for seed in (11, 12)
    ]
    expected = EXPECTED[kind]
    # small datagrams, so a message is many fragments; punching gets 1 s under loss
    group = nat_udp_group(behaviors, punch_timeout=1.0, mtu=1200, rto_min=0.02)
    async with group(2, timeout=20.0) as comms:
        a, b = comms
        big = [np.arange(40_000, dtype=np.int64) * (r + 1) for r in range(2)]
        await asyncio.wait_for(
            asyncio.gather(a.send(big[0], 1), b.send(big[1], 0), a.send("x", 1, tag=1)), 20.0
        )
        got_b, got_a, tagged = await asyncio.wait_for(
            asyncio.gather(b.recv(0), a.recv(1), b.recv(0, tag=1)), 20.0
        )
        assert np.array_equal(got_b, big[0]) and np.array_equal(got_a, big[1]) and tagged == "x"
        total = await _all(comms, lambda c: c.allreduce(np.arange(5) + c.peer_id))
        assert all(np.array_equal(t, 2 * np.arange(5) + 1) for t in total)
        stats = [c.stats()["channels"]["udp"] for c in comms]
    assert [s["pairs"] for s in stats] == [{1: expected}, {0: expected}]
    assert sum(s["requests"].get("retransmit", 0) for s in stats) > 0, stats
    assert sum(s["requests"].get("duplicate", 0) for s in stats) > 0, stats


async def test_keepalives_hold_an_idle_pair_open() -> None:
    """Mappings that expire after 0.5 s idle stay open through 1.5 s of silence."""
    short = NATBehavior(lifetime=0.5)
    fast_fail = {"keepalive": 0.1, "rto_initial": 0.05, "rto_max": 0.2, "retries": 4}
    async with nat_udp_group(short, **fast_fail)(2, timeout=5.0) as comms:
        a, b = comms
        await a.send("before", 1)
        assert await b.recv(0) == "before"
        await asyncio.sleep(1.5)
        await asyncio.wait_for(asyncio.gather(a.send("after", 1), b.send("back", 0)), 5.0)
        assert await b.recv(0) == "after" and await a.recv(1) == "back"
        assert pairs_of(comms) == [{1: "direct"}, {0: "direct"}]


async def test_server_relays_only_for_the_pair() -> None:
    """A relayed datagram from anyone but the pair's two endpoints goes nowhere."""
    secret = b"udp-secret"
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
    async with (
        RendezvousServer(secret) as srv,
        NATBox("symmetric") as box_a,
        NATBox("symmetric") as box_b,
    ):
        run = uuid.uuid4().hex[:8]
        punchers, transports = [], []
        for box in (box_a, box_b):
            net = network_from_options({"nat": box.options()})
            assert net is not None
            puncher = UDPHolePuncher(*srv.address, secret, datagrams=net.datagrams(),
                                     punch_timeout=0.2)  # fmt: skip
            puncher.attach(lambda data, addr: got.put_nowait((data, addr)))
            transport, _ = await loop.create_datagram_endpoint(
                lambda p=puncher: _Handler(p), local_addr=("127.0.0.1", 0)
            )
            punchers.append(puncher)
            transports.append(transport)
        try:
            (a, b), (ta, tb) = punchers, transports
            await a.publish_udp("W/udp", run, 0, ta)
            await b.publish_udp("W/udp", run, 1, tb)
            assert await asyncio.wait_for(a.punch_udp("W/udp", run, 0, 1, ta, 5.0), 10.0) is None
            assert await asyncio.wait_for(b.punch_udp("W/udp", run, 1, 0, tb, 5.0), 5.0) is None
            relay_b = a.relay_address("W/udp", run, 1)
            assert relay_b is not None and relay_b[0] == RELAY_HOST
            a.wrap(ta).sendto(b"\x75 via the server", relay_b)
            data, src = await asyncio.wait_for(got.get(), 5.0)
            assert data == b"\x75 via the server"
            assert src == b.relay_address("W/udp", run, 0)  # acks go back the same way
            assert srv.relayed_datagrams == 1
            # The nonce alone is not enough: a stranger's copy is not forwarded.
            nonce = a._relay_out[relay_b[1]]
            stranger, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
            )
            stranger.sendto(bytes([UDP_RELAY]) + nonce + b"\x75 spoofed", srv.address)
            await asyncio.sleep(0.2)
            stranger.close()
            assert srv.relayed_datagrams == 1 and got.empty()
        finally:
            for puncher in punchers:
                await puncher.close()
            for transport in transports:
                transport.close()


class _Handler(asyncio.DatagramProtocol):
    def __init__(self, puncher: UDPHolePuncher) -> None:
        self.puncher = puncher

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.puncher.handle_datagram(data, (addr[0], addr[1]))
