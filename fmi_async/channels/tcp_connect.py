"""How a TCP peer connects to a listening peer: dial, then prove membership.

The plain path of :class:`~fmi_async.channels.tcp.TCPChannel` (towards a
peer that is not behind NAT): connect to the address the peer registered,
through this peer's NAT if any, and run the membership handshake of
:func:`~fmi_async.holepunch.punch.authenticate` as the committing side.
The punched path is :func:`~fmi_async.holepunch.punch.pair_tcp`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from ..errors import AuthenticationError, BrokenChannelError, CommTimeout
from ..holepunch import protocol as hp
from ..holepunch.net import Network, close_socket
from ..holepunch.punch import Membership, authenticate

__all__ = ["connect_plain", "dial"]

logger = logging.getLogger(__name__)


CONNECT_ATTEMPTS = 4  # handshakes a connecting peer tries when the other side drops them


async def connect_plain(
    net: Network,
    member: Membership,
    peer_id: int,
    dst: int,
    addr: hp.Address,
    connect_timeout: float,
) -> socket.socket:
    """Connect to a listening peer (through our NAT, if any) and prove membership.

    A peer under a flood of connections may evict our handshake before
    it completes (its oldest unproven connection goes first): a
    handshake cut off like that is tried again, a few times, within
    ``connect_timeout``.  An endpoint that stays silent through the
    handshake is not treated as a slow peer: it did not prove
    membership, so :class:`~fmi_async.errors.AuthenticationError`.  Raises
    :class:`~fmi_async.errors.BrokenChannelError` when every handshake was
    cut off, and what :func:`dial` raises.
    """
    host, port = addr
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        sock = await dial(
            net, peer_id, dst, addr, max(0.001, deadline - loop.time()), connect_timeout
        )
        try:
            await authenticate(sock, member, peer_id, committer=True, other=dst, deadline=deadline)
        except BrokenChannelError as exc:
            close_socket(sock)
            if attempt == CONNECT_ATTEMPTS or loop.time() >= deadline:
                raise BrokenChannelError(
                    f"peer {dst} at {host}:{port} closed {attempt} membership handshake(s) "
                    f"of peer {peer_id} before they completed ({exc}); has it "
                    "crashed, or is its port flooded with connections?"
                ) from exc
            logger.info(
                "peer %d: handshake with peer %d cut off (%s); trying again",
                peer_id, dst, exc,
            )  # fmt: skip
            await asyncio.sleep(min(0.02 * attempt, max(0.0, deadline - loop.time())))
            continue
        except CommTimeout as exc:
            close_socket(sock)
            raise AuthenticationError(
                f"peer {dst} at {host}:{port} did not prove membership to peer "
                f"{peer_id} within {connect_timeout:.3g}s (it stayed silent): "
                f"whoever listens there may not be peer {dst} (a rendezvous server "
                "without a secret lets anyone register), or it is too busy to answer"
            ) from exc
        except BaseException:
            close_socket(sock)
            raise
        logger.debug("peer %d: connected to peer %d at %s:%d", peer_id, dst, host, port)
        return sock
    raise AssertionError("unreachable: the last attempt returns or raises")


async def dial(
    net: Network, peer_id: int, dst: int, addr: hp.Address, timeout: float, connect_timeout: float
) -> socket.socket:
    """A connection to ``addr`` within ``timeout``.

    Raises :class:`~fmi_async.errors.CommTimeout` when it takes longer (naming
    ``connect_timeout``), :class:`~fmi_async.errors.BrokenChannelError` when it
    is refused or unreachable.
    """
    host, port = addr
    try:
        sock, _ = await net.connect(addr, timeout=timeout)
    except TimeoutError:
        raise CommTimeout(
            f"peer {peer_id} could not connect to peer {dst} at {host}:{port} within "
            f"{connect_timeout:.3g}s (backends.TCP.connect_timeout)"
        ) from None
    except OSError as exc:
        raise BrokenChannelError(
            f"peer {peer_id} cannot connect to peer {dst} at {host}:{port}: "
            f"{exc.strerror or exc}; has peer {dst} closed or crashed?"
        ) from exc
    return sock


# ---------------------------------------------------------------- receive side
