"""Sans-IO reliability for message channels over UDP.

UDP delivers datagrams that may be lost, duplicated or reordered; RFC 8085
(UDP usage guidelines) asks an application that needs reliability to bring its
own, with congestion control (section 3.1), datagrams no larger than the path
allows (3.2) and retransmission timers that back off (3.1.1, 3.3).  This
module is that machinery, with no sockets and no clock: callers pass the time
(``now``, seconds on one monotonic clock) and the bytes in, and take datagrams
to send and completed messages out.  So every loss pattern is tested without a
network and without sleeping.

A :class:`Link` joins two peers.  Its :class:`Sender` cuts the stream framing
of :func:`fmi_async.wire.encode_frame` into numbered fragments of at most the
path's payload size; its :class:`Receiver` puts them back in order and feeds
them to a :class:`~fmi_async.wire.FrameReader`, so in-order, exactly-once,
byte-exact delivery is the same guarantee TCP gives the stream channel.

The datagram format is in :mod:`fmi_async.channels.udp.datagram`, the
retransmission timer in :mod:`fmi_async.channels.udp.retransmit`, the
tunables in :mod:`.params`, the halves in :mod:`.sender` and :mod:`.receiver`;
this module joins them into a :class:`Link` per peer and an :class:`Endpoint`
per socket.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

from ...errors import ProtocolError
from .datagram import (
    Ack,
    Data,
    decode,
)
from .params import LinkParams
from .receiver import Receiver
from .sender import Sender

__all__ = ["LinkParams", "Sender", "Receiver", "Link", "Endpoint"]

logger = logging.getLogger(__name__)


class Link:
    """Both halves between this peer and one other."""

    def __init__(
        self,
        local: int,
        peer: int,
        tag: int,
        params: LinkParams,
        epoch: int,
        counters: Counter[str],
        rng: random.Random,
    ) -> None:
        self.local, self.peer, self.tag = local, peer, tag
        self.params, self.counters, self.rng = params, counters, rng
        self.sender = Sender(params, tag, local, peer, epoch, counters, rng)
        self.receiver = Receiver(params, tag, local, peer, counters)
        self.remote_closed = False

    def __repr__(self) -> str:
        return f"<Link {self.local}<->{self.peer} {self.sender!r} {self.receiver!r}>"

    def restart_sender(self) -> Sender:
        """A new sending half (next epoch), after the old one broke."""
        epoch = (self.sender.epoch + 1) & 0xFFFFFFFF
        self.sender = Sender(
            self.params, self.tag, self.local, self.peer, epoch, self.counters, self.rng
        )
        return self.sender

    def on_datagram(self, msg: Data | Ack, now: float) -> None:
        if isinstance(msg, Data):
            self.receiver.on_data(msg, now)
            return
        if msg.closing:
            self.remote_closed = True
        if msg.epoch != self.sender.epoch:
            self.counters["stale"] += 1
        elif not self.sender.on_ack(msg, now):
            self.counters["dropped"] += 1
        if self.remote_closed and not self.sender.idle and self.sender.error is None:
            self.sender.error = f"peer {self.peer} closed its channel before receiving everything"

    def poll(self, now: float, can_send: bool = True) -> tuple[bytes | None, list[bytes]]:
        """The ack due now (goes to where the peer's data came from) and data datagrams."""
        out: list[bytes] = []
        self.sender.poll(now, out, can_send)
        return self.receiver.poll_ack(now), out

    def deadline(self) -> float | None:
        times = [t for t in (self.sender.deadline, self.receiver.ack_due) if t is not None]
        return min(times) if times else None


class Endpoint:
    """All links of one peer's datagram socket; routes datagrams by source peer."""

    def __init__(
        self,
        local: int,
        num_peers: int,
        tag: int,
        params: LinkParams,
        epoch: int = 1,
        counters: Counter[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.local, self.num_peers, self.tag, self.params = local, num_peers, tag, params
        self.epoch = epoch & 0xFFFFFFFF
        self.counters: Counter[str] = Counter() if counters is None else counters
        self.rng = rng or random.Random()
        self.links: dict[int, Link] = {}

    def __repr__(self) -> str:
        return f"<Endpoint peer={self.local}/{self.num_peers} links={sorted(self.links)}>"

    def link(self, peer: int) -> Link:
        link = self.links.get(peer)
        if link is None:
            link = Link(
                self.local, peer, self.tag, self.params, self.epoch, self.counters, self.rng
            )
            self.links[peer] = link
        return link

    def receive(self, data: bytes, now: float) -> Link | None:
        """Take one datagram; the link it concerned, or None when it was dropped."""
        try:
            msg = decode(data, self.tag)
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            logger.debug("peer %d: dropped a datagram: %s", self.local, exc)
            return None
        if msg.dst != self.local or not 0 <= msg.src < self.num_peers or msg.src == self.local:
            self.counters["dropped"] += 1
            logger.debug("peer %d: dropped a datagram %d->%d", self.local, msg.src, msg.dst)
            return None
        link = self.link(msg.src)
        link.on_datagram(msg, now)
        return link
