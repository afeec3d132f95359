"""The receiving half of a UDP link: reorders fragments, acknowledges, reassembles.

Sans-IO like all of :mod:`.reliable`: the caller passes the time and the
datagrams in, and takes acknowledgements and completed messages out.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from typing import Final

from ...errors import ProtocolError
from ...wire import FrameReader, Key, Payload
from .datagram import (
    ACK_HEADER,
    RANGE_SIZE,
    Data,
    encode_ack,
)
from .params import LinkParams, newer

__all__ = ["Receiver"]

logger = logging.getLogger(__name__)

_MAX_RANGES: Final = 64
_DUPLICATE_SIZE: Final = 8  # the duplicate report's u64


class Receiver:
    """The receiving half: reorders, drops duplicates, bounds what it buffers, acks.

    Fragments beyond a gap are kept only within the advertised window and
    ``recv_buffer`` bytes; anything further is dropped (the sender will
    retransmit), so a peer cannot make us buffer without bound.  An ack goes
    out at once for a message's last fragment, a duplicate, the first gap,
    a fragment dropped over a bound, and every ``ack_every`` fragments, in
    order or not; otherwise after ``ack_delay`` (delayed acks, RFC 5681
    section 4.2).  Not every fragment out of order is acknowledged at once:
    under jitter nearly every one is, and an ack with dozens of selective
    ranges per fragment cost both ends more than the sender's time-based
    loss detection gains from it.  A duplicate is
    reported in the next ack (a D-SACK, RFC 2883), so that the sender learns
    which of its retransmissions were spurious.
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
        self._duplicate: int | None = None  # the latest seq received twice, until acked
        self.ack_due: float | None = None

    @property
    def mid_message(self) -> bool:
        return self.reader.mid_frame or bool(self._held)

    def on_data(self, data: Data, now: float) -> None:
        if self.error is not None:
            self.counters["dropped"] += 1
            return
        if self.epoch is None or newer(data.epoch, self.epoch):
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
            self._duplicate = seq
            self._ack_now = True
            return
        if seq != self.next:
            if (
                seq >= self.next + self.params.recv_window
                or self._held_bytes + payload.nbytes > self.params.recv_buffer
            ):
                self.counters["dropped"] += 1
                self._ack_now = True
                return
            if not self._ranges:
                self._ack_now = True  # a first gap: the sender should know soon
            self._held[seq] = payload
            self._held_bytes += payload.nbytes
            self._add_range(seq)
            self._count(now, data.last)
            return
        self._feed(payload)
        while self.next in self._held:
            held = self._held.pop(self.next)
            self._held_bytes -= held.nbytes
            self._feed(held)
        while self._ranges and self._ranges[0][1] <= self.next:
            self._ranges.pop(0)
        self._count(now, data.last)

    def _count(self, now: float, last: bool) -> None:
        """One more fragment to acknowledge: now, or after ``ack_delay``."""
        self._pending += 1
        if last or self._pending >= self.params.ack_every:
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
        duplicate, self._duplicate = self._duplicate, None
        room = (self.params.mtu - ACK_HEADER - _DUPLICATE_SIZE) // RANGE_SIZE
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
            duplicate,
        )
