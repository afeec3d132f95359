"""The sending half of a UDP link: fragments, window, loss detection, congestion control.

Sans-IO like all of :mod:`.reliable`: the caller passes the time and takes the
datagrams to send.  Congestion control and pacing are in :mod:`.congestion`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from typing import Final

from ...wire import Buffer, flat
from .congestion import Congestion
from .datagram import (
    Ack,
    data_header,
)
from .params import LinkParams
from .retransmit import RetransmitTimer

__all__ = ["Sender"]

logger = logging.getLogger(__name__)

_LOSS_THRESHOLD: Final = 3  # RFC 9002 section 6.1.1 packet threshold (until reordering is seen)
_REMEMBERED: Final = 4096  # retransmitted seqs remembered for duplicate reports
_REO_STEPS: Final = 8  # at most 8 quarter round trips added to the reordering window
_REO_PERSIST: Final = 16  # rounds without a spurious retransmission take one step off


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

    **Loss detection** is time-based, as RACK (RFC 8985) and RFC 9002
    section 6.1 do it, and judges each *transmission*: a fragment is lost
    once a fragment sent after it was acknowledged and a reordering window
    has passed.  Unacknowledged fragments are kept in the order of their
    latest transmission, so the scan stops at the first one not yet due.
    The window adapts to the path:

    * it is 9/8 of the *largest* recent round trip (a decaying maximum of
      the samples), not of the mean: under jitter a fragment is late by up
      to the spread of the delays, and the maximum covers it;
    * a fragment declared lost that is acknowledged before its
      retransmission left, and each retransmission the receiver reports as
      a duplicate (D-SACK, RFC 2883), add a quarter round trip to it
      (RFC 8985 section 6.2 grows its window on D-SACKs the same way); 16
      rounds without one take a quarter off again;
    * the packet threshold (three later transmissions acknowledged) counts
      only until the first reordering is seen (RFC 8985 section 6.2).

    **Spurious retransmissions** reported as duplicates are counted
    (``stats.requests["spurious"]``) and undo the reduction they caused, as
    RFC 3708 does with D-SACK (:meth:`Congestion.on_spurious`).

    A timeout probes with the two oldest transmissions (RFC 9002 section
    6.2.4) and backs off; pacing and the window are :class:`Congestion`'s.
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
        self.cc = Congestion(float(params.window), params.loss_tolerance, counters)
        self._header = (tag, src, dst, epoch)
        self.una = 0  # every seq below is acknowledged
        self.next_seq = 0  # first seq not reserved by a queued message
        self._cut = 0  # first seq not yet cut from the queue
        self._queue: deque[_Message] = deque()
        # Unacknowledged fragments in the order of their latest transmission
        # (a retransmission moves its fragment to the end).
        self._unacked: dict[int, _Frag] = {}
        self._lost: deque[int] = deque()
        self._sacked: dict[int, int] = {}  # the previous ack's ranges, start -> end
        self._retransmitted: dict[int, int] = {}  # recent seqs sent again: how often
        self._inflight = 0
        self._order = 0
        self._high_order = 0  # latest transmission acknowledged
        self._latest_rtt = 0.0
        self._rtt_max = 0.0  # decaying maximum of the round-trip samples
        self._reordering = False  # a fragment was overtaken by a later one
        self._reo_steps = 0  # quarter round trips added to the reordering window
        self._quiet_rounds = 0  # rounds since the last step
        self._round_end = 1  # a round ends once this transmission is acknowledged
        self._paced = False  # poll stopped for pacing, not for the window
        self.loss_time: float | None = None
        self._probes = 0  # datagrams a timeout lets out beyond the window
        self.buffered = 0  # bytes queued or unacknowledged
        self.peer_window = params.recv_window  # what the receiver holds beyond a gap
        self.error: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Sender epoch={self.epoch} una={self.una} cut={self._cut} next={self.next_seq} "
            f"inflight={self._inflight} cwnd={self.cwnd:.1f} {self.error or 'ok'}>"
        )

    @property
    def cwnd(self) -> float:
        return self.cc.cwnd

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

    # ---------------------------------------------------------------- acknowledgements

    def on_ack(self, ack: Ack, now: float) -> bool:
        """Apply an acknowledgement; False if it acknowledges data never sent."""
        if ack.cumulative > self._cut or (ack.ranges and ack.ranges[-1][1] > self._cut):
            return False
        if ack.duplicate is not None and ack.duplicate < self._cut:
            self._on_duplicate(ack.duplicate)
        self.peer_window = max(1, ack.window)
        acked = 0
        slowest = 0.0  # the longest round trip among fragments sent once
        newest: _Frag | None = None  # the latest transmission this ack covers
        unacked = self._unacked
        # Consecutive acks repeat most ranges: only what is new in each is looked at
        # (an acknowledged fragment is never sent again, so nothing is missed).
        todo = [(self.una, ack.cumulative)]
        seen = self._sacked
        for start, end in ack.ranges:
            done = seen.get(start)
            if done is None:
                todo.append((start, end))
            elif done < end:
                todo.append((done, end))
        self._sacked = dict(ack.ranges)
        for start, end in todo:
            for seq in range(max(start, self.una), end):
                frag = unacked.pop(seq, None)
                if frag is None:
                    continue
                acked += 1
                self.buffered -= len(frag.data)
                if frag.lost:
                    if frag.tx == 1:  # declared lost too early: it was only late
                        self._step_reordering()
                        self.cc.not_lost()
                else:
                    self._inflight -= 1
                if frag.tx == 1:
                    if frag.order < self._high_order:
                        self._reordering = True  # overtaken by a later transmission
                    slowest = max(slowest, now - frag.sent_at)
                if newest is None or frag.order > newest.order:
                    newest = frag
        self.una = max(self.una, ack.cumulative)
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
            srtt = self.timer.srtt or self._latest_rtt
            # Decays towards the mean by 1/32 per ack, jumps to any larger sample.
            self._rtt_max = max(slowest, self._rtt_max - (self._rtt_max - srtt) / 32)
            self.cc.on_acked(acked)
            if newest.order >= self._round_end:
                self._end_round()
            if unacked:
                self.timer.restart(now)
            else:
                self.timer.stop()
        if unacked and (ack.ranges or self.loss_time is not None or self._lost):
            self._detect_losses(now)
        return True

    def _end_round(self) -> None:
        self._round_end = self._order + 1
        self.cc.end_round()
        self._quiet_rounds += 1
        if self._quiet_rounds >= _REO_PERSIST and self._reo_steps:
            self._reo_steps -= 1
            self._quiet_rounds = 0

    def _step_reordering(self) -> None:
        """Loss was declared too early: widen the reordering window."""
        self._reordering = True
        self._quiet_rounds = 0
        self._reo_steps = min(self._reo_steps + 1, _REO_STEPS)

    def _on_duplicate(self, seq: int) -> None:
        """The receiver had ``seq`` already: if we had sent it again, that was needless."""
        again = self._retransmitted.get(seq, 0)
        if again:  # (else a duplicate made by the network)
            if again > 1:
                self._retransmitted[seq] = again - 1
            else:
                del self._retransmitted[seq]
            self.counters["spurious"] += 1
            self._step_reordering()
            self.cc.on_spurious()

    def _detect_losses(self, now: float) -> None:
        """A fragment is lost once a transmission after it was acknowledged and the
        reordering window has passed since it was sent (RFC 8985 section 6.2;
        RFC 9002 section 6.1); until then ``loss_time`` says when to look."""
        self.loss_time = None
        srtt = self.timer.srtt or self.timer.rto
        delay = 1.125 * max(self._rtt_max, srtt, self._latest_rtt, 0.001)
        delay += self._reo_steps * srtt / 4
        threshold = -1 if self._reordering else self._high_order - _LOSS_THRESHOLD
        high = self._high_order
        lost = 0
        for seq, frag in self._unacked.items():
            if frag.lost:
                continue
            if frag.order >= high:
                break  # sent after the latest acknowledged transmission: not judged yet
            if frag.order <= threshold or frag.sent_at + delay <= now:
                frag.lost = True
                self._inflight -= 1
                self._lost.append(seq)
                lost += 1
            else:  # transmission order is time order: the others are later still
                self.loss_time = frag.sent_at + delay
                break
        if lost:
            self.cc.on_lost(lost)

    # ---------------------------------------------------------------- sending

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self.timer.deadline, self.loss_time) if t is not None]
        if self._paced:
            times.append(self.cc.pace_next)
        return min(times) if times else None

    def poll(self, now: float, out: list[bytes], can_send: bool = True) -> None:
        """Handle expired timers, then append what the window and pacing allow to ``out``."""
        self._paced = False
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
            # transmissions beyond the window (RFC 9002 section 6.2.4) rather than
            # resending everything; twice in a row means persistent congestion
            # (RFC 5681 section 3.1): back to the smallest window.
            self._probes = 2
            oldest = [s for s, f in itertools.islice(self._unacked.items(), 4) if not f.lost][:2]
            for seq in reversed(oldest):
                self._unacked[seq].lost = True
                self._inflight -= 1
                self._lost.appendleft(seq)
            self.cc.on_timeout(self.timer.expiries)
        if not can_send:
            return
        # In flight: the congestion window (at most `window`).  Ahead of the
        # oldest gap: the receiver's window, usually larger, so new data keeps
        # flowing (and keeps loss detection going) while a gap is repaired.
        cc = self.cc
        limit = min(cc.cwnd, float(self.peer_window))
        while self._lost and (self._probes or self._inflight < limit):
            if not (self._probes or cc.may_send(now)):
                self._paced = True
                break
            seq = self._lost.popleft()
            again = self._unacked.get(seq)
            if again is not None and again.lost:
                self.counters["retransmit"] += 1
                cc.on_retransmit()
                self._transmit(seq, again, now, out)
        edge = self.una + self.peer_window
        size = self.params.payload_size
        while self._queue and (self._probes or self._inflight < limit) and self._cut < edge:
            if not (self._probes or cc.may_send(now)):
                self._paced = True
                break
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
        if frag.tx:  # a retransmission: to the end of the transmission order
            del self._unacked[seq]
            self._unacked[seq] = frag
            self._retransmitted[seq] = self._retransmitted.get(seq, 0) + 1
            if len(self._retransmitted) > _REMEMBERED:
                del self._retransmitted[next(iter(self._retransmitted))]
        frag.lost = False
        frag.tx += 1
        self._order += 1
        frag.order = self._order
        frag.sent_at = now
        self._inflight += 1
        if self._probes:
            self._probes -= 1
        self.cc.sent(now, self.timer.srtt)
        out.append(b"".join((data_header(*self._header, seq, frag.last), frag.data)))
