"""How UDP channels find each other: plain rendezvous, or hole punching with a relay.

A :class:`Discovery` publishes this peer's datagram endpoint and locates the
others'.  Two implementations:

* :class:`RendezvousDiscovery` (``traversal: off``) registers the bound (or
  advertised) address at the rendezvous server over a long-lived TCP control
  connection (which renews it, and to which the registration stays bound)
  and looks peers up there.  Nothing crosses a NAT.
* :class:`PunchDiscovery` (``traversal: auto``, the default, or ``punch``)
  is backed by :class:`~fmi_async.holepunch.udp.UDPHolePuncher`.  It
  registers over UDP *from the channel's own socket*, so the server records
  the endpoint it observed (the NAT's mapping) and knows who is behind NAT.
  A first send looks the destination up; if it is behind NAT (``auto``), or
  always (``punch``), both sides punch with the server's help, and the
  server's verdict, the same for both, says ``direct`` (the endpoint the
  other's probes came from) or ``relay`` (a relay address: the pair's
  datagrams go through the server's UDP port).  Every datagram the channel
  sends goes through :meth:`PunchDiscovery.wrap`, so it crosses a simulated
  NAT and reaches relayed peers; datagrams unwrapped from either come back
  through the callback given to :meth:`PunchDiscovery.attach`.

Both record in the channel's ``stats.pairs`` whether a pair is ``direct`` or
``relayed``; a punched pair is recorded on both sides, also on the side that
was invited and has not sent yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal, Protocol

from ...holepunch import protocol as p
from ...holepunch.client import ControlConnection, RendezvousClient
from ...holepunch.net import Address, DatagramSender
from ...holepunch.udp import RELAY_HOST, UDPHolePuncher

__all__ = ["Discovery", "DatagramSender", "RendezvousDiscovery", "PunchDiscovery", "Traversal"]

logger = logging.getLogger(__name__)

Traversal = Literal["auto", "punch", "off"]


class Discovery(Protocol):
    """How a peer publishes its datagram endpoint and finds the others'.

    A discovery may also offer ``wrap(transport) -> DatagramSender`` (the
    sender for every datagram of the channel) and ``attach(deliver)`` (where
    datagrams it unwraps go); the channel uses them when present.
    """

    async def publish(self, transport: asyncio.DatagramTransport, address: Address) -> None: ...

    async def locate(
        self, peer: int, transport: asyncio.DatagramTransport, timeout: float
    ) -> Address: ...

    def handle_datagram(self, data: bytes, addr: Address) -> bool: ...

    async def close(self) -> None: ...


class RendezvousDiscovery:
    """No NAT in the way: register the bound address, look the others up (TCP rendezvous).

    The register goes over a :class:`~fmi_async.holepunch.client.ControlConnection`,
    which renews it and reconnects by itself; on a rendezvous server without a
    secret the registration belongs to that connection, so nobody else can
    replace it while this peer is there.
    """

    def __init__(self, client: RendezvousClient, comm: str, run_id: str, peer: int) -> None:
        self.client = client
        self.comm = f"{comm}/udp"  # distinct from the TCP channel's registrations
        self.run_id = run_id
        self.peer = peer
        self._control: ControlConnection | None = None

    def __repr__(self) -> str:
        return f"<RendezvousDiscovery {self.comm!r} peer={self.peer} via {self.client!r}>"

    async def publish(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        def no_invites(invite: p.Invite) -> None:  # nothing to punch with traversal off
            logger.debug("peer %d: ignoring %r (udp traversal is off)", self.peer, invite)

        control = ControlConnection(
            self.client,
            self.comm,
            self.run_id,
            self.peer,
            address,
            no_invites,
            renew=min(15.0, max(1.0, self.client.timeout)),
        )
        await control.start()
        self._control = control

    async def locate(
        self, peer: int, transport: asyncio.DatagramTransport, timeout: float
    ) -> Address:
        host, port = await self.client.lookup(self.comm, self.run_id, peer, timeout)
        return (host, port)

    def handle_datagram(self, data: bytes, addr: Address) -> bool:
        return False  # no hole punching here: such datagrams are foreign

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()


class PunchDiscovery:
    """Publish and locate through :class:`UDPHolePuncher`; see the module doc.

    ``client`` answers lookups (over TCP, through the same simulated NAT as
    the puncher, if any); ``pairs`` is the channel's ``stats.pairs``.
    """

    def __init__(
        self,
        puncher: UDPHolePuncher,
        client: RendezvousClient,
        comm: str,
        run_id: str,
        peer: int,
        traversal: Traversal,
        pairs: dict[int, str],
    ) -> None:
        self.puncher = puncher
        self.client = client
        self.comm = f"{comm}/udp"
        self.run_id = run_id
        self.peer = peer
        self.traversal = traversal
        self.pairs = pairs
        puncher.on_result = self._decided

    def __repr__(self) -> str:
        return (
            f"<PunchDiscovery {self.comm!r} peer={self.peer} traversal={self.traversal} "
            f"pairs={self.pairs} {self.puncher!r}>"
        )

    def wrap(self, transport: Any) -> DatagramSender:
        out: DatagramSender = self.puncher.wrap(transport)
        return out

    def attach(self, deliver: Callable[[bytes, Address], None]) -> None:
        self.puncher.attach(deliver)

    async def publish(self, transport: asyncio.DatagramTransport, address: Address) -> None:
        await self.puncher.publish_udp(self.comm, self.run_id, self.peer, transport)

    async def locate(
        self, peer: int, transport: asyncio.DatagramTransport, timeout: float
    ) -> Address:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # The lookup also waits until the peer has registered, so the server can invite it.
        info = await self.client.lookup_info(self.comm, self.run_id, peer, timeout)
        if self.traversal == "auto" and not info.nat:
            self.pairs[peer] = "direct"
            return info.addr
        remaining = max(0.001, deadline - loop.time())
        start = loop.time()
        remote = await self.puncher.punch_udp(
            self.comm, self.run_id, self.peer, peer, transport, remaining
        )
        if remote is None:
            remote = self.puncher.relay_address(self.comm, self.run_id, peer)
            assert remote is not None, "a relay verdict leaves a relay address"
        self._decided(peer, remote)
        logger.debug(
            "peer %d -> peer %d (udp): %s after %.1f ms at %s:%d",
            self.peer, peer, self.pairs[peer], (loop.time() - start) * 1e3, *remote,
        )  # fmt: skip
        return remote

    def _decided(self, peer: int, remote: Address) -> None:
        self.pairs[peer] = "relayed" if remote[0] == RELAY_HOST else "direct"

    def handle_datagram(self, data: bytes, addr: Address) -> bool:
        return self.puncher.handle_datagram(data, addr)

    async def close(self) -> None:
        await self.puncher.close()
