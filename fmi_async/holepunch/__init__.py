"""Rendezvous, hole punching, relaying and a simulated NAT for the direct channels.

See ``docs/holepunching.md``.  The UDP channel's contract lives in
:class:`~fmi_async.holepunch.udp.UDPHolePuncher`.
"""

from __future__ import annotations

from .udp import RESERVED_MIN, UDPHolePuncher

__all__ = ["UDPHolePuncher", "RESERVED_MIN"]
