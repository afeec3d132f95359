"""The sans-IO reliability of the UDP channel, without sockets or sleeping.

A simulated network with a virtual clock carries datagrams between two
:class:`Endpoint` objects and loses, duplicates and reorders them from a
seeded random source; hypothesis picks the loss pattern and the messages.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmi_async.channels.backoff import Backoff
from fmi_async.channels.udp.datagram import (
    DATA_HEADER,
    MAGIC,
    Ack,
    Data,
    decode,
    encode_ack,
    encode_data,
    session_tag,
)
from fmi_async.channels.udp.reliable import Endpoint, LinkParams
from fmi_async.channels.udp.retransmit import RetransmitTimer
from fmi_async.errors import ConfigError, ProtocolError
from fmi_async.wire import Payload, dumps, encode_frame, loads

TAG = session_tag("W", "run", b"secret")
PARAMS = LinkParams(
    mtu=160, window=32, recv_buffer=64 * 1024, ack_delay=0.002, rto_min=0.005, retries=12
)


@dataclass(order=True)
class _InFlight:
    at: float
    order: int
    dst: int = field(compare=False)
    data: bytes = field(compare=False)


class Net:
    """Two endpoints, a virtual clock and a lossy, reordering, duplicating path."""

    def __init__(
        self,
        params: LinkParams = PARAMS,
        seed: int = 0,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.001,
    ) -> None:
        self.rng = random.Random(seed)
        self.ends = [
            Endpoint(i, 2, TAG, params, epoch=7, rng=random.Random(seed + i)) for i in (0, 1)
        ]
        self.loss, self.dup, self.reorder, self.delay = loss, dup, reorder, delay
        self.now = 0.0
        self.wire: list[_InFlight] = []
        self.order = itertools.count()
        self.sent = 0
        self.down: set[int] = set()  # endpoints whose datagrams vanish (crashed peers)
        self.received: list[list[tuple[object, Payload]]] = [[], []]

    def send(self, src: int, value: object, copy: bool = True) -> int:
        frame = encode_frame(("u", 0), dumps(value))
        return self.ends[src].link(1 - src).sender.queue(frame, copy)

    def _emit(self, src: int, data: bytes) -> None:
        assert data[0] == MAGIC < 0xF0
        self.sent += 1
        if src in self.down or self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            extra = self.rng.uniform(0, 5 * self.delay) if self.rng.random() < self.reorder else 0
            at = self.now + self.delay + extra
            heapq.heappush(self.wire, _InFlight(at, next(self.order), 1 - src, data))

    def pump(self) -> None:
        for i, end in enumerate(self.ends):
            if i in self.down:
                continue
            for link in end.links.values():
                ack, datagrams = link.poll(self.now)
                if ack is not None:
                    self._emit(i, ack)
                for d in datagrams:
                    self._emit(i, d)
                self.received[i].extend(link.receiver.messages)
                link.receiver.messages.clear()

    def step(self) -> bool:
        """Advance to the next event; False when nothing is left to happen."""
        self.pump()
        times = [t for e in self.ends for link in e.links.values() if (t := link.deadline())]
        if self.wire:
            times.append(self.wire[0].at)
        if not times:
            return False
        self.now = max(self.now, min(times))
        while self.wire and self.wire[0].at <= self.now:
            item = heapq.heappop(self.wire)
            if item.dst not in self.down:
                self.ends[item.dst].receive(item.data, self.now)
                self.pump()  # as the channel does: answer each datagram at once
        return True

    def run(self, max_steps: int = 200_000, until: float = 600.0) -> None:
        for _ in range(max_steps):
            if not self.step() or self.now > until:
                return
        raise AssertionError(f"not settled after {max_steps} steps at t={self.now:.3f}")


def values(net: Net, peer: int) -> list[object]:
    return [loads(p) for _, p in net.received[peer]]


# ---------------------------------------------------------------- delivery


def test_clean_path_delivers_in_order_with_few_acks() -> None:
    net = Net()
    sent = [bytes([i]) * (i * 37) for i in range(40)]
    for value in sent:
        net.send(0, value)
    net.run()
    assert values(net, 1) == sent
    sender = net.ends[0].link(1).sender
    assert sender.idle and sender.buffered == 0
    assert net.ends[0].counters["retransmit"] == 0


messages_st = st.lists(st.binary(max_size=3000), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=messages_st,
    seed=st.integers(0, 2**16),
    loss=st.floats(0, 0.3),
    dup=st.floats(0, 0.3),
    reorder=st.floats(0, 0.5),
    both_ways=st.booleans(),
)
def test_any_loss_duplication_and_reordering_delivers_exactly_once_in_order(
    messages: list[bytes], seed: int, loss: float, dup: float, reorder: float, both_ways: bool
) -> None:
    net = Net(seed=seed, loss=loss, dup=dup, reorder=reorder)
    for m in messages:
        net.send(0, m)
        if both_ways:
            net.send(1, m[::-1])
    net.run()
    assert values(net, 1) == messages
    assert values(net, 0) == ([m[::-1] for m in messages] if both_ways else [])
    for end in net.ends:
        for link in end.links.values():
            assert link.sender.error is None
            assert link.sender.idle or not link.sender.next_seq
            assert link.receiver.error is None and not link.receiver.mid_message


def test_heavy_loss_is_recovered_and_counted() -> None:
    net = Net(seed=5, loss=0.25, dup=0.1, reorder=0.3)
    blob = bytes(range(256)) * 200
    net.send(0, blob)
    net.run()
    assert values(net, 1) == [blob]
    counters = net.ends[0].counters
    assert counters["retransmit"] > 0
    assert net.ends[1].counters["duplicate"] > 0


def test_in_flight_never_exceeds_the_window() -> None:
    params = replace(PARAMS, window=8)
    net = Net(params, seed=1, reorder=0.5)
    net.send(0, b"x" * 20_000)
    peak = 0
    for _ in range(100_000):
        sender = net.ends[0].link(1).sender
        peak = max(peak, sender._inflight)
        if not net.step():
            break
    assert values(net, 1) == [b"x" * 20_000]
    assert 0 < peak <= 8 + 2  # a timeout's two probes may go beyond the window


def test_views_of_the_callers_buffer_can_be_released_by_own_buffers() -> None:
    net = Net(seed=2, loss=0.2)
    buf = bytearray(b"a" * 50_000)
    net.send(0, buf, copy=False)
    for _ in range(20):
        net.step()
    net.ends[0].link(1).sender.own_buffers()
    buf[:] = b"b" * len(buf)  # the caller reuses its memory after a cancelled send
    net.run()
    assert values(net, 1) == [b"a" * 50_000]


# ---------------------------------------------------------------- failure


def test_a_silent_peer_exhausts_the_retries_in_bounded_time() -> None:
    params = replace(PARAMS, rto=Backoff(0.05, 0.4, 2.0, 0.1), retries=5)
    net = Net(params)
    net.down.add(1)
    net.send(0, b"hello?")
    net.run()
    sender = net.ends[0].link(1).sender
    assert sender.error is not None and "5 retransmission timeouts" in sender.error
    # waits: 0.05, then about 0.1, 0.2, 0.4, 0.4, 0.4 (jitter takes off at most 10 %)
    assert 1.2 < net.now < 1.7
    assert net.ends[0].counters["retransmit"] == 5


def test_the_peer_closing_with_data_outstanding_breaks_the_sender() -> None:
    net = Net()
    net.down.add(1)
    net.send(0, b"late")
    net.pump()
    link = net.ends[0].link(1)
    closing = encode_ack(TAG, 1, 0, 0, 0, 8, [], closing=True)
    net.ends[0].receive(closing, net.now)
    assert link.remote_closed
    assert link.sender.error is not None and "closed" in link.sender.error


def test_a_restarted_sender_resets_the_receiver() -> None:
    net = Net(seed=3)
    net.send(0, b"one")
    net.run()
    link = net.ends[0].link(1)
    link.restart_sender()
    net.send(0, b"two")
    net.run()
    assert values(net, 1) == [b"one", b"two"]
    assert net.ends[1].link(0).receiver.restarted


# ---------------------------------------------------------------- bounds and garbage


def test_receive_buffer_is_bounded_and_overflow_dropped() -> None:
    params = replace(PARAMS, recv_buffer=1000)
    end = Endpoint(1, 2, TAG, params)
    payload = b"z" * params.payload_size
    for seq in range(1, 200):  # seq 0 never arrives: everything is out of order
        end.receive(encode_data(TAG, 0, 1, 7, seq, False, payload), 0.0)
    receiver = end.link(0).receiver
    assert receiver._held_bytes <= 1000
    assert end.counters["dropped"] >= 190


def test_far_ahead_sequence_numbers_are_dropped() -> None:
    end = Endpoint(1, 2, TAG, PARAMS)
    end.receive(encode_data(TAG, 0, 1, 7, 2**40, False, b"x"), 0.0)
    assert end.counters["dropped"] == 1 and not end.link(0).receiver._held


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_dropped_never_raised(data: bytes) -> None:
    end = Endpoint(1, 2, TAG, PARAMS)
    assert end.receive(data, 0.0) is None
    assert end.counters["dropped"] == 1


header = struct.Struct("!BBBBIIII")


@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(0, 4),
    flags=st.integers(0, 255),
    src=st.sampled_from([0, 1, 3]),  # anything but peer 2, the witness below
    epoch=st.integers(0, 2**32 - 1),
    body=st.binary(max_size=300),
)
def test_random_bodies_behind_a_valid_header_never_raise(
    kind: int, flags: int, src: int, epoch: int, body: bytes
) -> None:
    end = Endpoint(1, 3, TAG, PARAMS, epoch=5)
    end.link(0).sender.queue([b"q" * 500], copy=True)  # so that random acks meet state
    end.link(0).poll(0.0)
    end.receive(header.pack(MAGIC, 1, kind, flags, TAG, src, 1, epoch) + body, 0.0)
    for link in list(end.links.values()):
        link.poll(1.0)  # timers and acks run on whatever state the garbage left
    # Whatever it did to peer 0's link, peer 2's traffic is untouched.
    frame = b"".join(encode_frame(("u", 9), dumps("intact")))
    end.receive(encode_data(TAG, 2, 1, 3, 0, True, frame), 2.0)
    ((key, payload),) = end.link(2).receiver.messages
    assert key == ("u", 9) and loads(payload) == "intact"


def test_garbage_frames_from_a_peer_break_only_its_receiver() -> None:
    end = Endpoint(1, 3, TAG, PARAMS)
    end.receive(encode_data(TAG, 0, 1, 7, 0, True, b"definitely not a frame"), 0.0)
    assert end.link(0).receiver.error is not None
    frame = encode_frame(("u", 1), dumps("fine"))
    end.receive(encode_data(TAG, 2, 1, 7, 0, True, b"".join(frame)), 0.0)
    ((key, payload),) = end.link(2).receiver.messages
    assert key == ("u", 1) and loads(payload) == "fine"


def test_decode_checks_every_field() -> None:
    good = encode_data(TAG, 0, 1, 7, 3, True, b"abc")
    msg = decode(good, TAG)
    assert isinstance(msg, Data) and msg.seq == 3 and msg.last and bytes(msg.payload) == b"abc"
    bad = {
        "shorter": good[:5],
        "starts with": bytes([0xF3]) + good[1:],
        "version": good[:1] + b"\x09" + good[2:],
        "another communicator": encode_data(TAG ^ 1, 0, 1, 7, 3, True, b"abc"),
        "empty": good[:DATA_HEADER],
        "unknown datagram type": good[:2] + b"\x07" + good[3:],
    }
    for reason, data in bad.items():
        with pytest.raises(ProtocolError, match=reason):
            decode(data, TAG)
    ack = encode_ack(TAG, 1, 0, 7, 10, 64, [(12, 15), (20, 21)])
    parsed = decode(ack, TAG)
    assert isinstance(parsed, Ack) and parsed.ranges == ((12, 15), (20, 21))
    with pytest.raises(ProtocolError, match="ranges"):
        decode(encode_ack(TAG, 1, 0, 7, 10, 64, [(12, 15), (14, 16)]), TAG)
    with pytest.raises(ProtocolError, match="announces"):
        decode(ack[:-1], TAG)


def test_acks_for_data_never_sent_are_dropped() -> None:
    end = Endpoint(0, 2, TAG, PARAMS, epoch=7)
    end.link(1).sender.queue([b"x" * 10], copy=True)
    end.link(1).poll(0.0)
    end.receive(encode_ack(TAG, 1, 0, 7, 99, 8, []), 0.0)
    assert end.counters["dropped"] == 1 and end.link(1).sender.una == 0


def test_session_tags_separate_runs_and_secrets() -> None:
    tags = {session_tag(c, r, s) for c in ("A", "B") for r in ("1", "2") for s in (None, b"k")}
    assert len(tags) == 8


# ---------------------------------------------------------------- timer and params


def test_retransmit_timer_follows_rfc6298_and_doubles() -> None:
    timer = RetransmitTimer(Backoff(0.2, 1.0, 2.0, 0.0), 0.01, 3, random.Random(0))
    timer.arm(0.0)
    assert timer.deadline == pytest.approx(0.2)
    timer.sample(0.1)  # first sample: SRTT = R, RTTVAR = R/2, RTO = SRTT + 4 RTTVAR
    assert timer.rto == pytest.approx(0.3)
    timer.sample(0.1)
    assert timer.srtt == pytest.approx(0.1) and timer.rttvar == pytest.approx(0.0375)
    timer.restart(1.0)
    waits = []
    now = 1.0
    while timer.deadline is not None and timer.back_off(now):
        assert timer.deadline is not None
        waits.append(timer.deadline - now)
        now = timer.deadline
    assert waits == pytest.approx([0.5, 1.0, 1.0])  # 2 x 0.25, doubling, capped
    assert timer.expiries == 4 and timer.deadline is None


def test_rto_is_clamped_to_the_minimum() -> None:
    timer = RetransmitTimer(Backoff(0.2, 1.0, 2.0, 0.0), 0.05, 3, random.Random(0))
    for _ in range(50):
        timer.sample(0.0001)
    assert timer.rto == pytest.approx(0.05)


@pytest.mark.parametrize(
    "changes",
    [{"mtu": 60}, {"mtu": 70000}, {"window": 0}, {"recv_buffer": 10}, {"rto_min": 5.0}],
)
def test_bad_params_are_config_errors(changes: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match=r"backends\.UDP"):
        replace(PARAMS, **changes)  # type: ignore[arg-type]


def test_counters_can_be_shared_with_the_channel_stats() -> None:
    shared: Counter[str] = Counter()
    end = Endpoint(1, 2, TAG, PARAMS, counters=shared)
    end.receive(b"\x00" * 40, 0.0)
    assert shared["dropped"] == 1
