"""How a simulated NAT box maps and filters, as RFC 4787 (UDP) and RFC 5382 (TCP) name it.

* **Mapping** (RFC 4787 section 4.1, RFC 5382 section 4.1): one public port
  per internal endpoint (*endpoint-independent*), per internal endpoint and
  destination address (*address-dependent*), or per internal endpoint and
  destination address and port (*address-and-port-dependent*, the classic
  "symmetric" NAT).
* **Port assignment** (RFC 4787 section 4.2.1): *port preservation* keeps
  the internal port number when free; otherwise the kernel picks one.
* **Filtering** (RFC 4787 section 5, RFC 5382 section 5): inbound traffic to
  a mapping is let in from anyone (*endpoint-independent*), only from
  addresses the internal endpoint sent to (*address-dependent*), or only from
  address-and-port pairs it sent to (*address-and-port-dependent*).
* **Impairments** for UDP (seeded): loss, duplication, reordering of the
  datagrams the box forwards, for testing the UDP channel.

:data:`PRESETS` names the classic NAT types of RFC 3489 in those terms.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ArgumentError
from ..holepunch.net import Address

__all__ = ["Dependence", "NATBehavior", "PRESETS", "PortMapping"]

logger = logging.getLogger(__name__)

Dependence = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
_DEPENDENCE = ("endpoint-independent", "address-dependent", "address-and-port-dependent")


@dataclass(frozen=True)
class NATBehavior:
    """How a NAT box maps and filters (RFC 4787 sections 4-5, RFC 5382 sections 4-5)."""

    mapping: Dependence = "endpoint-independent"
    filtering: Dependence = "address-and-port-dependent"
    port_preserving: bool = True
    lifetime: float = 60.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        """Raises :class:`~fmi_async.errors.ArgumentError` for an unknown rule or probability."""
        if self.mapping not in _DEPENDENCE or self.filtering not in _DEPENDENCE:
            raise ArgumentError(f"NAT mapping and filtering must be one of {_DEPENDENCE}")
        for name in ("loss", "duplicate", "reorder"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ArgumentError(f"NAT {name} must be a probability in [0, 1)")


PRESETS: dict[str, NATBehavior] = {
    # RFC 3489's names, mapped onto RFC 4787's terms (RFC 4787 section 3).
    "full-cone": NATBehavior("endpoint-independent", "endpoint-independent"),
    "restricted": NATBehavior("endpoint-independent", "address-dependent"),
    "port-restricted": NATBehavior("endpoint-independent", "address-and-port-dependent"),
    "symmetric": NATBehavior(
        "address-and-port-dependent", "address-and-port-dependent", port_preserving=False
    ),
}


@dataclass(eq=False)
class PortMapping:
    """One mapping of the box: an internal port, its public port, what its filter admits."""

    proto: str
    internal: int
    public_port: int
    allowed: set[Address] = field(default_factory=set)
    users: int = 0
    idle_since: float = 0.0
    server: asyncio.Server | None = None
    udp: asyncio.DatagramTransport | None = None
    client: Address | None = None  # udp: the peer socket behind this internal port

    def admits(self, remote: Address, filtering: Dependence) -> bool:
        """RFC 4787 section 5 / RFC 5382 section 5."""
        if filtering == "endpoint-independent":
            return True
        if filtering == "address-dependent":
            return any(host == remote[0] for host, _ in self.allowed)
        return remote in self.allowed
