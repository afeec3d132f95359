"""The retransmission timer of the UDP channel: one small object, no I/O.

RFC 6298 computes the retransmission timeout from measured round trips and
doubles it on every expiry; RFC 8085 section 3.1.1 asks every UDP application
that retransmits to back off like that.  The doubling waits come from the
shared :class:`~fmi_async.channels.backoff.Backoff` policy (with a little
jitter, so peers that lost the same burst do not retransmit in step), and a
retry limit turns "no answer, however long we wait" into "unreachable".
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

from ..backoff import Backoff

__all__ = ["RetransmitTimer"]


class RetransmitTimer:
    """One retransmission timer: RFC 6298 estimator, doubling wait, retry limit.

    Armed while data is unacknowledged.  Round-trip samples (never from a
    retransmitted fragment: Karn's rule, section 3) set the timeout to
    ``SRTT + 4 RTTVAR`` clamped to ``[rto_min, rto.maximum]``.  Each expiry
    backs off along the :class:`Backoff` series starting at twice the timeout;
    ``retries`` expiries in a row without progress mean the peer is gone.
    """

    def __init__(self, policy: Backoff, rto_min: float, retries: int, rng: random.Random) -> None:
        self.policy = policy
        self.rto_min = rto_min
        self.retries = retries
        self.rng = rng
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = policy.initial
        self.deadline: float | None = None
        self.expiries = 0
        self._waits: Iterator[float] | None = None

    def __repr__(self) -> str:
        return f"<RetransmitTimer rto={self.rto:.4f} expiries={self.expiries}/{self.retries}>"

    def sample(self, rtt: float) -> None:
        if self.srtt is None:  # section 2.2
            self.srtt, self.rttvar = rtt, rtt / 2
        else:  # section 2.3, alpha 1/8, beta 1/4
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.rto_min), self.policy.maximum)

    def restart(self, now: float) -> None:
        """New data was acknowledged: forget the backoff (section 5.3)."""
        self.expiries = 0
        self._waits = None
        self.deadline = now + self.rto

    def arm(self, now: float) -> None:
        if self.deadline is None:
            self.deadline = now + self.rto

    def stop(self) -> None:
        """Everything was acknowledged (progress too: the backoff is forgotten)."""
        self.expiries = 0
        self._waits = None
        self.deadline = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def back_off(self, now: float) -> bool:
        """Handle an expiry: False once the retry limit is exceeded."""
        self.expiries += 1
        if self.expiries > self.retries:
            self.deadline = None
            return False
        if self._waits is None:
            start = min(2 * self.rto, self.policy.maximum)
            self._waits = replace(self.policy, initial=start, multiplier=2.0).delays(self.rng)
        self.deadline = now + next(self._waits)
        return True
