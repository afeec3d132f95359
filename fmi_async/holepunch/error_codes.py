"""What the rendezvous server's error codes mean to a client: one table, one function.

Every client of the server (registering and looking up, pairing over TCP and
UDP, relaying, holding a job lease) turns an ``error`` answer into a library
error with :func:`server_error`, so a code means the same wherever it comes
back.  The server's text says what happened and what to check; the client
adds what it asked and where.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from ..errors import (
    AuthenticationError,
    BrokenChannelError,
    CommTimeout,
    FMIError,
    JobConflictError,
    JobConflictTimeout,
    JobMismatchError,
    ProtocolError,
    RendezvousExpired,
)
from .messages import Error, Message

__all__ = ["ERRORS", "server_error"]

logger = logging.getLogger(__name__)


ERRORS: Final[Mapping[str, type[FMIError]]] = {
    "auth": AuthenticationError,  # a proof that does not match, or a registration held by another
    "timeout": CommTimeout,  # what the request waited for did not happen in time
    "bad_request": ProtocolError,  # the server cannot serve this request (here)
    "overloaded": BrokenChannelError,  # a server limit is reached; retry later
    "internal": BrokenChannelError,  # the server failed; its log says why
    "expired": RendezvousExpired,
    "conflict": JobConflictError,  # another job holds (or opened at once) the name
    "mismatch": JobMismatchError,  # peers disagree on num_peers
    "busy": JobConflictTimeout,  # waited for another job until the deadline
}
"""The error each code of :data:`~fmi_async.holepunch.messages.ERROR_CODES` raises."""


def server_error(answer: Message, where: str, what: str) -> FMIError:
    """The library error for ``answer`` to the request ``what`` sent to ``where``.

    An ``error`` answer maps through :data:`ERRORS`; any other answer than
    the one expected is a :class:`~fmi_async.errors.ProtocolError`.
    """
    if not isinstance(answer, Error):
        return ProtocolError(f"unexpected {answer.TYPE!r} answer from {where} to {what}")
    error = ERRORS.get(answer.code, BrokenChannelError)
    return error(f"{where}, {what}: {answer.message}")
