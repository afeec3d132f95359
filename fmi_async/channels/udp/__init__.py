"""The UDP channel and its stack, one module per job.

* :mod:`.kinds` -- the one table of reserved first bytes: what the first byte
  of a datagram on a UDP channel's socket means (channel data, hole punching,
  rendezvous, relay, simulated NAT).
* :mod:`.datagram` -- the channel's datagram format (sans-IO).
* :mod:`.reliable` -- fragments, acknowledgements, ordering (sans-IO).
* :mod:`.retransmit` -- the retransmission timer.
* :mod:`.discovery` -- how a peer's address is found (rendezvous, punching).
* :mod:`.channel` -- :class:`~fmi_async.channels.udp.channel.UDPChannel`, the
  asyncio adapter that binds the socket and drives the others.

UDP hole punching itself (:mod:`fmi_async.holepunch.udp`) stays with the
rendezvous code it speaks to; it reads the same table from :mod:`.kinds`.

Nothing is imported here, so reading the table does not load the channel.
"""
