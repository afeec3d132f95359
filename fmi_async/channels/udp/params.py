"""The tunables of a UDP link, and the serial-number order of epochs (sans-IO)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ...errors import ConfigError
from ...wire import DEFAULT_LIMITS, Limits
from ..backoff import Backoff
from .datagram import (
    DATA_HEADER,
    MAX_DATAGRAM,
    MIN_DATAGRAM,
)

__all__ = ["LinkParams", "newer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkParams:
    """Tunables of one link; :class:`~fmi_async.channels.udp.channel.UDPChannel` reads them
    from options.

    ``rto`` is the retransmission policy: its ``initial`` is the first timeout
    before any round trip was measured (RFC 6298 section 2.1 says 1 s for the
    Internet; loopback and LAN deserve less), ``maximum`` caps it, and after
    each expiry the wait doubles with a little jitter (section 5.5).

    ``loss_tolerance`` is the share of a round trip's fragments that may be
    lost before the loss is read as congestion and the window halves
    (:mod:`.congestion`); below it, loss is repaired but taken for random.
    """

    mtu: int = 1200
    window: int = 256
    recv_buffer: int = 4 * 1024 * 1024
    rto: Backoff = field(default_factory=lambda: Backoff(0.2, 2.0, 2.0, 0.1))
    rto_min: float = 0.02
    retries: int = 8
    ack_delay: float = 0.005
    ack_every: int = 2
    loss_tolerance: float = 0.1
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if not MIN_DATAGRAM <= self.mtu <= MAX_DATAGRAM:
            raise ConfigError(
                f"backends.UDP.mtu must be between {MIN_DATAGRAM} and {MAX_DATAGRAM} bytes, got "
                f"{self.mtu}; 1200 is safe on the Internet, up to 65000 on loopback"
            )
        if not 0 <= self.loss_tolerance < 1:
            raise ConfigError("backends.UDP loss_tolerance must be in [0, 1)")
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


def newer(a: int, b: int) -> bool:
    """Serial-number order of 32-bit epochs (RFC 1982): is ``a`` after ``b``?"""
    return 0 < (a - b) & 0xFFFFFFFF < 2**31
