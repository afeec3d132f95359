"""What the first byte of a datagram means: the one table, read by everybody.

A UDP channel's socket carries its own datagrams and, on the same port (a NAT
maps it once, RFC 4787 section 4.1), every datagram of discovery, punching,
relay and -- in tests and ``fmi run --nat`` -- the simulated NAT's
encapsulation.  The first byte tells them apart:

======  =====================================================================
0x75    the UDP channel's own datagram (data or ack, :mod:`.datagram`)
0x76    the same, sealed (``security.encrypt``, :mod:`.sealing`)
0xF0    a rendezvous protocol message (envelope of ``holepunch.protocol``),
        to or from the rendezvous server's UDP port (same port as its TCP
        port)
0xF1    punch probe, peer to peer:  msgpack [comm, run_id, from, to, mac]
0xF2    probe answer, same layout; the mac covers the kind, so neither can
        be replayed as the other
0xF3    keep-alive towards a punched peer (contents ignored)
0xF4    relayed datagram, peer to server to peer: the pairing's 16-byte
        nonce, then the payload; the server forwards it only for pairings
        it decided ``relay`` and only between the two observed endpoints
0xFE    datagram between a peer and its simulated NAT box (``fmi_async.natsim``)
======  =====================================================================

Every first byte from :data:`RESERVED_MIN` up belongs to hole punching
(:mod:`fmi_async.holepunch.udp`): the channel hands such datagrams to it and
never reads them itself.  The channel's own datagrams start below that range.

This module imports nothing, so the rendezvous server, the punching client and
the NAT simulator read it without loading the channel.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CHANNEL",
    "SEALED",
    "RESERVED_MIN",
    "RENDEZVOUS",
    "PROBE",
    "PROBE_ACK",
    "KEEPALIVE",
    "RELAY",
    "NAT",
    "NAMES",
]

CHANNEL: Final = 0x75
"""The UDP channel's own datagrams (``"u"``)."""
SEALED: Final = 0x76
"""The UDP channel's datagrams in their authenticated, encrypted envelope (``"v"``)."""
RESERVED_MIN: Final = 0xF0
"""First byte of hole punching's range 0xF0-0xFF."""
RENDEZVOUS: Final = 0xF0
PROBE: Final = 0xF1
PROBE_ACK: Final = 0xF2
KEEPALIVE: Final = 0xF3
RELAY: Final = 0xF4
NAT: Final = 0xFE

NAMES: Final[dict[int, str]] = {
    CHANNEL: "channel",
    SEALED: "sealed",
    RENDEZVOUS: "rendezvous",
    PROBE: "probe",
    PROBE_ACK: "probe-ack",
    KEEPALIVE: "keepalive",
    RELAY: "relay",
    NAT: "natsim",
}
"""Every kind by its first byte, for logs and for the tests that check the table."""

assert CHANNEL < SEALED < RESERVED_MIN
assert all(kind >= RESERVED_MIN for kind in NAMES if kind not in (CHANNEL, SEALED))
