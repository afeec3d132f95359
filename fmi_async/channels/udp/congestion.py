"""Congestion control and pacing of a UDP link's sender (sans-IO, counted in fragments).

Reno's window (RFC 5681) reads every loss as congestion.  On the paths a
serverless job crosses, loss is often not congestion: a lossy radio or
policer drops a few percent at random, and reordering makes fragments look
lost that were only late.  Reno's window never grows back under 5 % random
loss (RFC 3649 and Mathis et al. put its window near ``1.2 / sqrt(p)``
segments: five).  So this controller, as BBRv2 does (draft-cardwell-iccrg-bbr-
congestion-control, "loss_thresh"), counts loss per round trip and reads it
as congestion only when a round lost more than ``loss_tolerance`` of what it
sent; a congested drop-tail queue loses far more than that once it
overflows (a slow-start round that overshoots loses about half).  Then the
window halves, as Reno's does, at most once per round.  Two timeouts in a
row still collapse it to two fragments (RFC 5681 section 3.1).

**Undo (RFC 3708, F-RTO and Eifel, RFC 5682 and 3522).**  When every
retransmission sent since a reduction turns out spurious -- the receiver
reports each one as a duplicate it already had (a D-SACK, RFC 2883) -- the
reduction is undone: window and threshold go back to what they were.

**Pacing.**  Fragments leave at ``gain * cwnd / srtt`` (gain 2 in slow
start, 1.25 after, as Linux paces TCP), with bursts of at most
``burst`` seconds' worth, so a window does not arrive at the receiver's
socket buffer all at once (RFC 8085 section 3.1.6 asks for it).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Final

__all__ = ["Congestion"]

logger = logging.getLogger(__name__)

INITIAL_CWND: Final = 10.0  # RFC 6928 initial window, in fragments
MIN_CWND: Final = 2.0
_MIN_ROUND: Final = 256  # fragments a loss rate is judged on at least
_UNDO_ROUNDS: Final = 4  # rounds after a reduction in which it may be undone
_BURST: Final = 0.002  # seconds of pacing credit a late timer may catch up


class Congestion:
    """Window, threshold, loss rounds, undo and pacing of one sender."""

    __slots__ = (
        "_prior",
        "_prior_age",
        "_round_acked",
        "_round_lost",
        "_round_retrans",
        "_round_spurious",
        "_undo_retrans",
        "counters",
        "cwnd",
        "limit",
        "loss_tolerance",
        "pace_next",
        "ssthresh",
    )

    def __init__(self, limit: float, loss_tolerance: float, counters: Counter[str]) -> None:
        self.limit = limit  # the configured window: cwnd never exceeds it
        self.loss_tolerance = loss_tolerance
        self.counters = counters
        self.cwnd = min(INITIAL_CWND, limit)
        self.ssthresh = limit
        self.pace_next = 0.0  # no fragment leaves before this time
        self._round_acked = 0
        self._round_lost = 0
        self._round_retrans = 0  # retransmissions sent in this round
        self._round_spurious = 0  # ... and reported needless
        self._prior: tuple[float, float] | None = None  # (cwnd, ssthresh) before a reduction
        self._prior_age = 0  # rounds since that reduction
        self._undo_retrans = 0  # retransmissions since it not yet known spurious

    def __repr__(self) -> str:
        return f"<Congestion cwnd={self.cwnd:.1f} ssthresh={self.ssthresh:.1f}>"

    @property
    def slow_start(self) -> bool:
        return self.cwnd < self.ssthresh

    # ---------------------------------------------------------------- window

    def on_acked(self, count: int) -> None:
        """``count`` fragments were newly acknowledged: grow (RFC 5681 section 3.1)."""
        self._round_acked += count
        grow = count if self.slow_start else count / self.cwnd
        self.cwnd = min(self.cwnd + grow, self.limit)

    def on_lost(self, count: int) -> None:
        self._round_lost += count

    def not_lost(self) -> None:
        """A fragment declared lost was acknowledged before it was sent again."""
        self._round_lost = max(0, self._round_lost - 1)

    def end_round(self) -> None:
        """A round trip ended: was its loss congestion?"""
        if self._prior is not None:
            # D-SACKs come back within a round trip or two of the retransmission;
            # after that a reduction stands.
            self._prior_age += 1
            if self._prior_age > _UNDO_ROUNDS:
                self._prior = None
        total = self._round_acked + self._round_lost
        if total < _MIN_ROUND:
            return  # too few fragments to tell random loss from congestion: keep counting
        # A loss whose retransmission proved needless was no loss.
        lost = self._round_lost - self._round_spurious
        retrans = self._round_retrans - self._round_spurious
        self._round_acked = self._round_lost = self._round_retrans = self._round_spurious = 0
        if lost > self.loss_tolerance * total:
            self.counters["congestion"] += 1
            self._reduce(max(self.cwnd / 2, MIN_CWND), retrans)

    def on_timeout(self, expiries: int) -> None:
        """A retransmission timeout; the second in a row means persistent congestion."""
        if expiries >= 2:
            self._reduce(MIN_CWND, self._round_retrans - self._round_spurious)

    def _reduce(self, cwnd: float, retrans: int) -> None:
        """Reduce the window; the retransmissions of this round are what undo waits for."""
        if self._prior is None:  # the first of several reductions is what undo restores
            self._prior = (self.cwnd, self.ssthresh)
            self._prior_age = 0
            self._undo_retrans = retrans
        self.ssthresh = max(min(self.cwnd / 2, self.limit), MIN_CWND)
        self.cwnd = cwnd

    # ---------------------------------------------------------------- undo

    def on_retransmit(self) -> None:
        self._round_retrans += 1
        if self._prior is not None:
            self._undo_retrans += 1

    def on_spurious(self) -> None:
        """A retransmission was needless (the original had arrived)."""
        self._round_spurious += 1
        if self._prior is None:
            return
        self._undo_retrans -= 1
        if self._undo_retrans <= 0:
            cwnd, ssthresh = self._prior
            self.cwnd = max(self.cwnd, cwnd)
            self.ssthresh = max(self.ssthresh, ssthresh)
            self._prior = None
            self.counters["undo"] += 1
            logger.debug("reduction undone: every retransmission since was spurious (%r)", self)

    # ---------------------------------------------------------------- pacing

    def may_send(self, now: float) -> bool:
        return now >= self.pace_next

    def sent(self, now: float, srtt: float | None) -> None:
        """A fragment left: the next may leave one pacing interval later."""
        if srtt is None or srtt <= 0:
            return  # no round trip measured yet: the initial window goes at once
        gain = 2.0 if self.slow_start else 1.25
        interval = srtt / (gain * self.cwnd)
        self.pace_next = max(self.pace_next, now - _BURST) + interval
