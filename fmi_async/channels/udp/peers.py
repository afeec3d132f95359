"""The UDP channel's per-peer I/O state and its socket protocol.

:class:`Peer` is the channel's side of one reliable link (where to send,
its retransmission timer, who waits on it); :class:`Socket` is the thin
:class:`asyncio.DatagramProtocol` that hands every datagram to the channel
and remembers flow control (see :mod:`fmi_async.channels.udp.channel`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ...holepunch.net import Address
from .reliable import Link

if TYPE_CHECKING:
    from .channel import UDPChannel

__all__ = ["Peer", "Socket"]

logger = logging.getLogger(__name__)


class Peer:
    """I/O state of one link: where to send, its timer, who waits on it."""

    __slots__ = (
        "addr",
        "id",
        "link",
        "lock",
        "reply_addr",
        "reported",
        "timer",
        "waiters",
        "when",
    )

    def __init__(self, link: Link) -> None:
        self.id = link.peer
        self.link = link
        self.addr: Address | None = None  # where its socket is (discovery)
        self.reply_addr: Address | None = None  # where its datagrams come from
        self.timer: asyncio.Handle | None = None
        self.when = 0.0  # when the timer fires
        self.waiters: list[asyncio.Future[None]] = []
        self.lock = asyncio.Lock()
        self.reported: set[str] = set()  # failures already passed to the mailbox

    def __repr__(self) -> str:
        return f"<Peer {self.id} addr={self.addr} {self.link.sender!r}>"

    def wake(self) -> None:
        """Resolve every future waiting on this link."""
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class Socket(asyncio.DatagramProtocol):
    """Thin: every datagram goes to the channel; flow control is remembered."""

    def __init__(self, channel: UDPChannel) -> None:
        self.channel = channel

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.channel._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) on an unconnected socket: the
        # retransmission timer decides whether the peer is gone.
        self.channel.stats.requests["socket_error"] += 1
        logger.debug("peer %d: udp socket error: %s", self.channel.peer_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._socket_lost(exc)

    def pause_writing(self) -> None:
        self.channel._paused = True

    def resume_writing(self) -> None:
        self.channel._paused = False
        self.channel._flush_all()
