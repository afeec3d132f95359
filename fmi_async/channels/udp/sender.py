"""The sending half of a UDP link: fragments, window, loss detection, congestion control.

Sans-IO like all of :mod:`.reliable`: the caller passes the time and takes the
datagrams to send.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from typing import Final

from ...wire import Buffer, flat
from .datagram import (
    Ack,
    data_header,
)
from .params import LinkParams
from .retransmit import RetransmitTimer

__all__ = ["Sender"]

logger = logging.getLogger(__name__)

_LOSS_THRESHOLD: Final = 3  # RFC 9002 section 6.1.1 packet threshold
_INITIAL_CWND: Final = 10.0  # RFC 6928 initial window, in fragments
_MIN_CWND: Final = 2.0


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
