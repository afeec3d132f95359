"""Sans-IO reliability for message channels over UDP.

UDP delivers datagrams that may be lost, duplicated or reordered; RFC 8085
(UDP usage guidelines) asks an application that needs reliability to bring its
own, with congestion control (section 3.1), datagrams no larger than the path
allows (3.2) and retransmission timers that back off (3.1.1, 3.3).  This
module is that machinery, with no sockets and no clock: callers pass the time
(``now``, seconds on one monotonic clock) and the bytes in, and take datagrams
to send and completed messages out.  So every loss pattern is tested without a
network and without sleeping.

A :class:`Link` joins two peers.  Its :class:`Sender` cuts the stream framing
of :func:`fmi_async.wire.encode_frame` into numbered fragments of at most the
path's payload size; its :class:`Receiver` puts them back in order and feeds
them to a :class:`~fmi_async.wire.FrameReader`, so in-order, exactly-once,
byte-exact delivery is the same guarantee TCP gives the stream channel.

The datagram format is in :mod:`fmi_async.channels.udp.datagram`, the
retransmission timer in :mod:`fmi_async.channels.udp.retransmit`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from ...errors import ConfigError, ProtocolError
from ...wire import DEFAULT_LIMITS, Buffer, FrameReader, Key, Limits, Payload, flat
from ..backoff import Backoff
from .datagram import (
    ACK_HEADER,
    DATA_HEADER,
    MAX_DATAGRAM,
    MIN_DATAGRAM,
    RANGE_SIZE,
    Ack,
    Data,
    data_header,
    decode,
    encode_ack,
)
from .retransmit import RetransmitTimer

__all__ = ["LinkParams", "Sender", "Receiver", "Link", "Endpoint"]

logger = logging.getLogger(__name__)

_MAX_RANGES: Final = 64
_LOSS_THRESHOLD: Final = 3  # RFC 9002 section 6.1.1 packet threshold
_INITIAL_CWND: Final = 10.0  # RFC 6928 initial window, in fragments
_MIN_CWND: Final = 2.0


@dataclass(frozen=True, slots=True)
class LinkParams:
    """Tunables of one link; :class:`~fmi_async.channels.udp.channel.UDPChannel` reads them
    from options.

    ``rto`` is the retransmission policy: its ``initial`` is the first timeout
    before any round trip was measured (RFC 6298 section 2.1 says 1 s for the
    Internet; loopback and LAN deserve less), ``maximum`` caps it, and after
    each expiry the wait doubles with a little jitter (section 5.5).
    """

    mtu: int = 1200
    window: int = 256
    recv_buffer: int = 4 * 1024 * 1024
    rto: Backoff = field(default_factory=lambda: Backoff(0.2, 2.0, 2.0, 0.1))
    rto_min: float = 0.02
    retries: int = 8
    ack_delay: float = 0.005
    ack_every: int = 2
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if not MIN_DATAGRAM <= self.mtu <= MAX_DATAGRAM:
            raise ConfigError(
                f"backends.UDP.mtu must be between {MIN_DATAGRAM} and {MAX_DATAGRAM} bytes, got "
                f"{self.mtu}; 1200 is safe on the Internet, up to 65000 on loopback"
            )
        if self.window < 1 or self.ack_every < 1 or self.retries < 1:
            raise ConfigError("backends.UDP window, ack_every and retries must be at least 1")
        if self.recv_buffer < self.mtu:
            raise ConfigError("backends.UDP.recv_buffer must hold at least one datagram (mtu)")
        if not 0 < self.rto_min <= self.rto.maximum or self.ack_delay * 2 >= self.rto_min * 4:
            raise ConfigError(
                "backends.UDP needs 0 < rto_min <= rto_max, and ack_delay well below rto_min"
            )

    @property
    def payload_size(self) -> int:
        return self.mtu - DATA_HEADER

    @property
    def recv_window(self) -> int:
        """Fragments a receiver buffers beyond a gap (its advertised window)."""
        return max(4, min(self.recv_buffer // self.payload_size, 2**31 - 1))


def _newer(a: int, b: int) -> bool:
    """Serial-number order of 32-bit epochs (RFC 1982): is ``a`` after ``b``?"""
    return 0 < (a - b) & 0xFFFFFFFF < 2**31


class _Frag:
    __slots__ = ("data", "last", "lost", "order", "sent_at", "tx")

    def __init__(self, data: Buffer, last: bool) -> None:
        self.data = data
        self.last = last
        self.sent_at = 0.0
        self.tx = 0  # transmissions so far
        self.order = 0  # transmission number of the latest one
        self.lost = False


class _Message:
    """A queued message's bytes, cut into fragments front to back."""

    __slots__ = ("index", "last_seq", "offset", "views")

    def __init__(self, views: list[memoryview], last_seq: int) -> None:
        self.views = views
        self.last_seq = last_seq
        self.index = 0
        self.offset = 0

    def cut(self, size: int) -> Buffer:
        pieces: list[memoryview] = []
        while size and self.index < len(self.views):
            view = self.views[self.index]
            take = min(size, view.nbytes - self.offset)
            pieces.append(view[self.offset : self.offset + take])
            self.offset += take
            size -= take
            if self.offset == view.nbytes:
                self.index += 1
                self.offset = 0
        # Within one view the fragment stays a view (no copy until the datagram
        # is built); only a fragment across two views is joined here.
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _owned(view: Buffer) -> bool:
    return isinstance(view, bytes) or isinstance(getattr(view, "obj", None), bytes)


class Sender:
    """The sending half: fragments, window, loss detection, congestion control.

    Congestion control is Reno-like and counted in fragments (RFC 5681, as RFC
    8085 section 3.1 asks of bulk transfer): slow start from 10 (RFC 6928),
    one halving per loss episode, down to two fragments after repeated timeouts.  A
    fragment is declared lost as RFC 9002 section 6.1 declares packets lost,
    counting transmissions rather than sequence numbers, so that a
    retransmission is judged by what was sent after it.
    """

    def __init__(
        self,
        params: LinkParams,
        tag: int,
        src: int,
        dst: int,
        epoch: int,
        counters: Counter[str],
        rng: random.Random,
    ) -> None:
        self.params = params
        self.epoch = epoch
        self.counters = counters
        self.timer = RetransmitTimer(params.rto, params.rto_min, params.retries, rng)
        self._header = (tag, src, dst, epoch)
        self.una = 0  # every seq below is acknowledged
        self.next_seq = 0  # first seq not reserved by a queued message
        self._cut = 0  # first seq not yet cut from the queue
        self._queue: deque[_Message] = deque()
        self._unacked: dict[int, _Frag] = {}  # insertion order is seq order
        self._lost: deque[int] = deque()
        self._inflight = 0
        self._order = 0
        self._high_order = 0  # latest transmission acknowledged
        self._high_seq = 0  # every acknowledged seq is below
        self._latest_rtt = 0.0
        self.loss_time: float | None = None
        self._probes = 0  # datagrams a timeout lets out beyond the window
        self.buffered = 0  # bytes queued or unacknowledged
        self.cwnd = min(_INITIAL_CWND, float(params.window))
        self.ssthresh = float(params.window)
        self._recovery = -1
        self.peer_window = params.recv_window  # what the receiver holds beyond a gap
        self.error: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Sender epoch={self.epoch} una={self.una} cut={self._cut} next={self.next_seq} "
            f"inflight={self._inflight} cwnd={self.cwnd:.1f} {self.error or 'ok'}>"
        )

    @property
    def idle(self) -> bool:
        """Everything queued was acknowledged."""
        return self.una >= self.next_seq

    def queue(self, buffers: Sequence[Buffer], copy: bool) -> int:
        """Queue one framed message; returns its last seq (done once ``una`` passes it).

        Without ``copy`` fragments are views of the caller's buffers, which
        must not change until the message is acknowledged or
        :meth:`own_buffers` has run.
        """
        views = [v for v in map(flat, buffers) if v.nbytes]
        if copy and not (len(views) == 1 and _owned(views[0])):
            views = [memoryview(b"".join(views))]
        size = sum(v.nbytes for v in views)
        # Fragments are cut at fixed offsets, so the last seq is known now.
        last = self.next_seq + max(1, -(-size // self.params.payload_size)) - 1
        self.next_seq = last + 1
        self._queue.append(_Message(views, last))
        self.buffered += size
        return last

    def own_buffers(self) -> None:
        """Copy whatever still refers to a caller's memory (its send was cancelled)."""
        for frag in self._unacked.values():
            if not _owned(frag.data):
                frag.data = bytes(frag.data)
        for msg in self._queue:
            msg.views = [v if _owned(v) else memoryview(bytes(v)) for v in msg.views]

    def on_ack(self, ack: Ack, now: float) -> bool:
        """Apply an acknowledgement; False if it acknowledges data never sent."""
        if ack.cumulative > self._cut or (ack.ranges and ack.ranges[-1][1] > self._cut):
            return False
        self.peer_window = max(1, ack.window)
        acked = 0
        newest: _Frag | None = None  # the latest transmission this ack covers
        for start, end in [(self.una, ack.cumulative), *ack.ranges]:
            for seq in range(max(start, self.una), end):
                frag = self._unacked.pop(seq, None)
                if frag is None:
                    continue
                acked += 1
                self.buffered -= len(frag.data)
                if not frag.lost:
                    self._inflight -= 1
                if newest is None or frag.order > newest.order:
                    newest = frag
        self.una = max(self.una, ack.cumulative)
        self._high_seq = max(self._high_seq, ack.ranges[-1][1] if ack.ranges else self.una)
        if newest is not None:
            # One sample per ack, from its latest transmission, and only if that
            # is newer than any acked before and was sent once (Karn's rule;
            # RFC 9002 section 5.1 samples the same way): a fragment acked late
            # behind a gap would inflate the estimate.
            if newest.order > self._high_order:
                self._high_order = newest.order
                if newest.tx == 1:
                    self._latest_rtt = now - newest.sent_at
                    self.timer.sample(self._latest_rtt)
            grow = acked if self.cwnd < self.ssthresh else acked / self.cwnd
            self.cwnd = min(self.cwnd + grow, float(self.params.window))
            if self._unacked:
                self.timer.restart(now)
            else:
                self.timer.stop()
        if ack.ranges or self.loss_time is not None:
            self._detect_losses(now)
        return True

    def _detect_losses(self, now: float) -> None:
        """RFC 9002 section 6.1: a fragment is lost once a transmission three
        later was acknowledged, or one sent later was and 9/8 of a round trip
        has passed since it was sent; until then ``loss_time`` says when to look."""
        self.loss_time = None
        delay = 1.125 * max(self.timer.srtt or self.timer.rto, self._latest_rtt, 0.001)
        threshold = self._high_order - _LOSS_THRESHOLD
        first_lost: int | None = None
        for seq, frag in self._unacked.items():
            if seq >= self._high_seq:
                break
            if frag.lost or frag.order >= self._high_order:
                continue
            if frag.order <= threshold or frag.sent_at + delay <= now:
                frag.lost = True
                self._inflight -= 1
                self._lost.append(seq)
                if first_lost is None:
                    first_lost = seq
            elif self.loss_time is None or frag.sent_at + delay < self.loss_time:
                self.loss_time = frag.sent_at + delay
        if first_lost is not None and first_lost > self._recovery:
            self.ssthresh = max(self.cwnd / 2, _MIN_CWND)
            self.cwnd = self.ssthresh
            self._recovery = self._cut - 1

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self.timer.deadline, self.loss_time) if t is not None]
        return min(times) if times else None

    def poll(self, now: float, out: list[bytes], can_send: bool = True) -> None:
        """Handle expired timers, then append what the window allows to ``out``."""
        if self.error is not None:
            return
        if self.loss_time is not None and now >= self.loss_time:
            self._detect_losses(now)
        if self.timer.expired(now):
            if not self.timer.back_off(now):
                self.error = (
                    f"no acknowledgement after {self.params.retries} retransmission timeouts "
                    f"(rto_max {self.params.rto.maximum:g}s)"
                )
                return
            self.counters["timeout"] += 1
            # Nothing acknowledged for a whole timeout: probe with the two oldest
            # fragments beyond the window (RFC 9002 section 6.2.4) rather than
            # resending everything; twice in a row means persistent congestion
            # (RFC 5681 section 3.1): back to the smallest window.
            self._probes = 2
            oldest = [s for s, f in itertools.islice(self._unacked.items(), 2) if not f.lost]
            for seq in reversed(oldest):
                self._unacked[seq].lost = True
                self._inflight -= 1
                self._lost.appendleft(seq)
            if self.timer.expiries >= 2:
                self.ssthresh = max(self.cwnd / 2, _MIN_CWND)
                self.cwnd = _MIN_CWND
                self._recovery = self._cut - 1
        if not can_send:
            return
        # In flight: the congestion window (at most `window`).  Ahead of the
        # oldest gap: the receiver's window, usually larger, so new data keeps
        # flowing (and keeps loss detection going) while a gap is repaired.
        limit = min(self.cwnd, float(self.peer_window))
        while self._lost and (self._inflight < limit or self._probes):
            seq = self._lost.popleft()
            again = self._unacked.get(seq)
            if again is not None and again.lost:
                self.counters["retransmit"] += 1
                self._transmit(seq, again, now, out)
        edge = self.una + self.peer_window
        size = self.params.payload_size
        while self._queue and (self._inflight < limit or self._probes) and self._cut < edge:
            msg = self._queue[0]
            seq = self._cut
            self._cut += 1
            frag = _Frag(msg.cut(size), seq == msg.last_seq)
            if frag.last:
                self._queue.popleft()
            self._unacked[seq] = frag
            self._transmit(seq, frag, now, out)
        self._probes = 0
        if self._inflight:
            self.timer.arm(now)

    def _transmit(self, seq: int, frag: _Frag, now: float, out: list[bytes]) -> None:
        frag.lost = False
        frag.tx += 1
        self._order += 1
        frag.order = self._order
        frag.sent_at = now
        self._inflight += 1
        if self._probes:
            self._probes -= 1
        out.append(b"".join((data_header(*self._header, seq, frag.last), frag.data)))


class Receiver:
    """The receiving half: reorders, drops duplicates, bounds what it buffers, acks.

    Fragments beyond a gap are kept only within the advertised window and
    ``recv_buffer`` bytes; anything further is dropped (the sender will
    retransmit), so a peer cannot make us buffer without bound.  An ack goes
    out at once for a message's last fragment, anything out of order or
    duplicated, and every ``ack_every`` fragments; otherwise after
    ``ack_delay`` (delayed acks, RFC 5681 section 4.2).
    """

    def __init__(
        self, params: LinkParams, tag: int, src: int, dst: int, counters: Counter[str]
    ) -> None:
        self.params = params
        self.counters = counters
        self._tag, self._src, self._dst = tag, src, dst
        self.epoch: int | None = None
        self.restarted = False  # the peer began a new sending half (set until read)
        self._reset()
        self.error: str | None = None
        self.messages: list[tuple[Key, Payload]] = []

    def __repr__(self) -> str:
        return f"<Receiver epoch={self.epoch} next={self.next} held={len(self._held)}>"

    def _reset(self) -> None:
        self.next = 0
        self._held: dict[int, memoryview] = {}
        self._held_bytes = 0
        self._ranges: list[list[int]] = []  # what _held covers, as sorted [start, end)
        self.reader = FrameReader(self.params.limits)
        self._pending = 0
        self._ack_now = False
        self.ack_due: float | None = None

    @property
    def mid_message(self) -> bool:
        return self.reader.mid_frame or bool(self._held)

    def on_data(self, data: Data, now: float) -> None:
        if self.error is not None:
            self.counters["dropped"] += 1
            return
        if self.epoch is None or _newer(data.epoch, self.epoch):
            if self.epoch is not None:
                self.restarted = True
                if self.mid_message:
                    logger.warning(
                        "peer %d restarted sending in the middle of a message", self._dst
                    )
            self.epoch = data.epoch
            self._reset()
        elif data.epoch != self.epoch:
            self.counters["stale"] += 1
            return
        seq, payload = data.seq, data.payload
        if seq < self.next or seq in self._held:
            self.counters["duplicate"] += 1
            self._ack_now = True
            return
        if seq != self.next:
            if (
                seq >= self.next + self.params.recv_window
                or self._held_bytes + payload.nbytes > self.params.recv_buffer
            ):
                self.counters["dropped"] += 1
            else:
                self._held[seq] = payload
                self._held_bytes += payload.nbytes
                self._add_range(seq)
            self._ack_now = True
            return
        self._feed(payload)
        while self.next in self._held:
            held = self._held.pop(self.next)
            self._held_bytes -= held.nbytes
            self._feed(held)
        while self._ranges and self._ranges[0][1] <= self.next:
            self._ranges.pop(0)
            self._ack_now = True  # a gap was filled: tell the sender at once
        self._pending += 1
        if data.last or self._ranges or self._pending >= self.params.ack_every:
            self._ack_now = True
        elif self.ack_due is None:
            self.ack_due = now + self.params.ack_delay

    def _feed(self, payload: memoryview) -> None:
        self.next += 1
        if self.error is not None:
            return
        try:
            self.messages.extend(self.reader.feed(payload))
        except ProtocolError as exc:  # the stream is out of step for good
            self.error = str(exc)

    def _add_range(self, seq: int) -> None:
        ranges = self._ranges
        i = bisect.bisect_right(ranges, seq, key=lambda r: r[0])
        if i and ranges[i - 1][1] == seq:
            ranges[i - 1][1] = seq + 1
            if i < len(ranges) and ranges[i][0] == seq + 1:
                ranges[i - 1][1] = ranges.pop(i)[1]
        elif i < len(ranges) and ranges[i][0] == seq + 1:
            ranges[i][0] = seq
        else:
            ranges.insert(i, [seq, seq + 1])

    def poll_ack(self, now: float, closing: bool = False) -> bytes | None:
        """The acknowledgement due now, if any."""
        due = self._ack_now or (self.ack_due is not None and now >= self.ack_due)
        if not (due or closing):
            return None
        self._ack_now, self.ack_due, self._pending = False, None, 0
        room = (self.params.mtu - ACK_HEADER) // RANGE_SIZE
        ranges = [(a, b) for a, b in self._ranges[: min(room, _MAX_RANGES)]]
        return encode_ack(
            self._tag,
            self._src,
            self._dst,
            self.epoch or 0,
            self.next,
            self.params.recv_window,
            ranges,
            closing,
        )


class Link:
    """Both halves between this peer and one other."""

    def __init__(
        self,
        local: int,
        peer: int,
        tag: int,
        params: LinkParams,
        epoch: int,
        counters: Counter[str],
        rng: random.Random,
    ) -> None:
        self.local, self.peer, self.tag = local, peer, tag
        self.params, self.counters, self.rng = params, counters, rng
        self.sender = Sender(params, tag, local, peer, epoch, counters, rng)
        self.receiver = Receiver(params, tag, local, peer, counters)
        self.remote_closed = False

    def __repr__(self) -> str:
        return f"<Link {self.local}<->{self.peer} {self.sender!r} {self.receiver!r}>"

    def restart_sender(self) -> Sender:
        """A new sending half (next epoch), after the old one broke."""
        epoch = (self.sender.epoch + 1) & 0xFFFFFFFF
        self.sender = Sender(
            self.params, self.tag, self.local, self.peer, epoch, self.counters, self.rng
        )
        return self.sender

    def on_datagram(self, msg: Data | Ack, now: float) -> None:
        if isinstance(msg, Data):
            self.receiver.on_data(msg, now)
            return
        if msg.closing:
            self.remote_closed = True
        if msg.epoch != self.sender.epoch:
            self.counters["stale"] += 1
        elif not self.sender.on_ack(msg, now):
            self.counters["dropped"] += 1
        if self.remote_closed and not self.sender.idle and self.sender.error is None:
            self.sender.error = f"peer {self.peer} closed its channel before receiving everything"

    def poll(self, now: float, can_send: bool = True) -> tuple[bytes | None, list[bytes]]:
        """The ack due now (goes to where the peer's data came from) and data datagrams."""
        out: list[bytes] = []
        self.sender.poll(now, out, can_send)
        return self.receiver.poll_ack(now), out

    def deadline(self) -> float | None:
        times = [t for t in (self.sender.deadline, self.receiver.ack_due) if t is not None]
        return min(times) if times else None


class Endpoint:
    """All links of one peer's datagram socket; routes datagrams by source peer."""

    def __init__(
        self,
        local: int,
        num_peers: int,
        tag: int,
        params: LinkParams,
        epoch: int = 1,
        counters: Counter[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.local, self.num_peers, self.tag, self.params = local, num_peers, tag, params
        self.epoch = epoch & 0xFFFFFFFF
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.rng = rng or random.Random()
        self.links: dict[int, Link] = {}

    def __repr__(self) -> str:
        return f"<Endpoint peer={self.local}/{self.num_peers} links={sorted(self.links)}>"

    def link(self, peer: int) -> Link:
        link = self.links.get(peer)
        if link is None:
            link = Link(
                self.local, peer, self.tag, self.params, self.epoch, self.counters, self.rng
            )
            self.links[peer] = link
        return link

    def receive(self, data: bytes, now: float) -> Link | None:
        """Take one datagram; the link it concerned, or None when it was dropped."""
        try:
            msg = decode(data, self.tag)
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            logger.debug("peer %d: dropped a datagram: %s", self.local, exc)
            return None
        if msg.dst != self.local or not 0 <= msg.src < self.num_peers or msg.src == self.local:
            self.counters["dropped"] += 1
            logger.debug("peer %d: dropped a datagram %d->%d", self.local, msg.src, msg.dst)
            return None
        link = self.link(msg.src)
        link.on_datagram(msg, now)
        return link
