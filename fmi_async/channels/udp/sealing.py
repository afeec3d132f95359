"""Sealed datagrams of the UDP channel (sans-IO): the envelope and its keys.

With ``security.encrypt`` (the default whenever a secret is set) every
datagram of :mod:`.datagram` -- data and acks alike, session tag and epoch
included -- travels inside an envelope, network byte order::

    kind     u8   0x76 (:data:`.kinds.SEALED`)
    src      u32  sending peer (picks the key; authenticated)
    session  u64  the sender's random session id, drawn when its channel is built
    counter  u64  the nonce: 0, 1, 2, ... per destination, never reused
    sealed   the inner datagram, AES-256-GCM with the 21 bytes above as AAD,
             then its 16-byte tag

The key of ``src -> dst`` is HKDF(secret; salt = the sender's session id;
info = job, src, dst) (:func:`~fmi_async.wire.seal.derive_key`): one key per
direction and per incarnation of the sending channel.  The receiver keeps a
replay window (:class:`~fmi_async.wire.seal.ReplayWindow`) per sender
session: a datagram that fails authentication (``forged``), carries a counter
seen before (``replayed``) or is older than the window (``too_old``), is
dropped and counted in the channel's ``stats.requests``, never fatal; the
reliability layer retransmits what was really lost, under a new counter.

Sessions of a sender are remembered while the channel lives (up to
:data:`MAX_SESSIONS` per peer, the oldest forgotten first), so a datagram
recorded earlier in a session is refused however late it is replayed.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections import Counter, OrderedDict
from typing import Final

from ...config import Config
from ...errors import AuthenticationError
from ...wire.seal import TAG_LEN, DatagramOpener, DatagramSealer, derive_key
from ..base import ChannelStats
from .kinds import SEALED

__all__ = ["HEADER", "MAX_SESSIONS", "OVERHEAD", "Sealing"]

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!BIQQ")
HEADER: Final = _HEADER.size
OVERHEAD: Final = HEADER + TAG_LEN  # bytes an envelope adds to a datagram
MAX_SESSIONS: Final = 8  # sender sessions remembered per peer
WINDOW: Final = 4096  # counters a datagram may lag behind the newest and still count


class Sealing:
    """One channel's keys: sealing towards each peer, opening from each peer's sessions.

    ``counters`` is the channel's ``stats.requests``: dropped datagrams are
    counted there as ``dropped`` and by reason: ``forged``, ``replayed``,
    ``too_old``, or ``unsealed`` (a plain datagram where sealed ones were expected).
    """

    def __init__(
        self,
        secret: bytes,
        comm: str,
        run_id: str,
        me: int,
        counters: Counter[str],
        *,
        session: int | None = None,
    ) -> None:
        self._secret = secret
        self._comm = comm
        self._run_id = run_id
        self.me = me
        self.session = secrets.randbits(64) if session is None else session
        self.counters = counters
        self._sealers: dict[int, DatagramSealer] = {}
        self._openers: dict[int, OrderedDict[int, DatagramOpener]] = {}

    def __repr__(self) -> str:
        return f"<Sealing peer={self.me} session={self.session:016x} to={sorted(self._sealers)}>"

    @classmethod
    def of(
        cls, config: Config, comm: str, run_id: str, me: int, stats: ChannelStats
    ) -> Sealing | None:
        """The sealing of a channel under ``config``, or None if it does not encrypt."""
        if not config.encrypts or config.secret is None:
            return None
        return cls(config.secret, comm, run_id, me, stats.requests)

    def _key(self, src: int, dst: int, session: int) -> bytes:
        salt = session.to_bytes(8, "big")
        return derive_key(self._secret, "datagram", self._comm, self._run_id, src, dst, salt)

    def seal(self, dst: int, datagram: bytes) -> bytes:
        """``datagram`` (to peer ``dst``) in its envelope."""
        sealer = self._sealers.get(dst)
        if sealer is None:
            sealer = self._sealers[dst] = DatagramSealer(self._key(self.me, dst, self.session))
        header = _HEADER.pack(SEALED, self.me, self.session, sealer.counter)
        return sealer.seal(header, datagram)

    def open(self, data: bytes) -> bytes | None:
        """The inner datagram, or None (dropped and counted) if it may not be trusted."""
        if not data or data[0] != SEALED:
            return self._drop("unsealed")
        if len(data) < OVERHEAD + 1:
            return self._drop("forged")
        _, src, session, counter = _HEADER.unpack_from(data)
        view = memoryview(data)
        sessions = self._openers.get(src)
        opener = None if sessions is None else sessions.get(session)
        fresh = opener is None
        if opener is None:
            if src == self.me:
                return self._drop("forged")
            opener = DatagramOpener(self._key(src, self.me, session), window=WINDOW)
        try:
            plain = opener.open(view[:HEADER], counter, view[HEADER:])
        except AuthenticationError as exc:
            logger.debug("peer %d: dropped a datagram from peer %d: %s", self.me, src, exc)
            return self._drop(str(exc).split(":", 1)[0].replace(" ", "_"))
        if fresh:  # remembered only once a datagram of it authenticated
            sessions = self._openers.setdefault(src, OrderedDict())
            sessions[session] = opener
            while len(sessions) > MAX_SESSIONS:
                sessions.popitem(last=False)
        return plain

    def _drop(self, why: str) -> bytes | None:
        """Count a dropped datagram (``dropped`` and its reason); None, for ``open``."""
        self.counters["dropped"] += 1
        self.counters[why] += 1
        return None
