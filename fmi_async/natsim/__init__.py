"""A userspace NAT, so that hole punching runs on one machine without privileges.

For tests and ``fmi run --nat`` only: no production module imports this
package.  A channel reaches it through one plug point,
:func:`fmi_async.holepunch.net.simulated_network`, which loads
:mod:`.client` only when a simulated NAT gateway is configured.

One module per job:

* :mod:`.behavior` -- how a box maps and filters (RFC 4787 for UDP, RFC 5382
  for TCP), the named presets (full-cone, restricted, port-restricted,
  symmetric) and the seeded UDP impairments.
* :mod:`.box` -- :class:`NATBox`, one simulated NAT in front of one private
  network: real sockets on its own loopback address, a mapping table, the
  filter.
* :mod:`.gateway` -- the sans-IO codec between a peer and its box (requests
  on a gateway connection, encapsulated datagrams).
* :mod:`.client` -- the peer's side: :class:`NATNetwork` (a
  :class:`~fmi_async.holepunch.net.Network`), its datagram path, and
  :func:`network_from_options`.
"""

from __future__ import annotations

from .behavior import PRESETS, Dependence, NATBehavior
from .box import NATBox
from .client import NATDatagramPath, NATDatagramTransport, NATNetwork, network_from_options
from .gateway import UDP_NAT, decapsulate, encapsulate

__all__ = [
    "Dependence",
    "NATBehavior",
    "PRESETS",
    "NATBox",
    "NATNetwork",
    "NATDatagramPath",
    "NATDatagramTransport",
    "network_from_options",
    "encapsulate",
    "decapsulate",
    "UDP_NAT",
]
