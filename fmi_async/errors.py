"""One exception hierarchy for the whole library.

Every error the library raises is an :class:`FMIError`.  Families subclass the
matching built-in where one fits, so ``except TimeoutError`` or
``except ValueError`` keep working (``CommTimeout`` *is* a ``TimeoutError``);
none of them shadows a built-in name.

"You closed it" (:class:`ClosedError`), "it broke" (:class:`BrokenChannelError`)
and "the other side ended the stream" (:class:`EndOfStream`) are distinct.
"""

from __future__ import annotations

__all__ = [
    "FMIError",
    "ConfigError",
    "ArgumentError",
    "RootError",
    "SizeMismatchError",
    "ShapeMismatchError",
    "OperatorError",
    "SerializationError",
    "MessageTooLarge",
    "ProtocolError",
    "CommTimeout",
    "PeerError",
    "PlanMismatchError",
    "ChannelError",
    "ClosedError",
    "BrokenChannelError",
    "EndOfStream",
    "BackendError",
    "AuthenticationError",
    "AbortedError",
    "BrokenCommunicatorError",
    "JobConflictError",
    "JobConflictTimeout",
    "JobMismatchError",
    "LeaseLostError",
    "BackendUnavailable",
    "RendezvousExpired",
]


class FMIError(Exception):
    """Root of every error raised by fmi-async."""


class ConfigError(FMIError, ValueError):
    """The configuration is missing, malformed or inconsistent."""


class ArgumentError(FMIError, ValueError):
    """A call was made with arguments that cannot work; raised before anything is sent."""


class RootError(ArgumentError):
    """The ``root`` of a rooted collective is not a peer of the communicator."""


class SizeMismatchError(ArgumentError):
    """A list or array does not have the length the operation needs."""


class ShapeMismatchError(ArgumentError):
    """Values combined by a reduction have different shapes or dtypes."""


class OperatorError(FMIError, TypeError):
    """The reduction operator is unknown or cannot be applied to the values."""


class SerializationError(FMIError, TypeError):
    """A value cannot be carried by the configured serializer."""


class MessageTooLarge(ArgumentError):
    """A message this peer is sending exceeds its own limits (the frame :class:`Limits
    <fmi_async.wire.Limits>` or a rendezvous message's ``max_body``); raised before
    anything is sent.  The same excess in a message *received* from a peer is a
    :class:`ProtocolError`."""


class ProtocolError(FMIError):
    """A peer or server sent bytes this side cannot accept: a malformed, truncated or
    oversized frame or message, or one of the wrong kind at this point of a protocol
    (also raised when a rendezvous server answers ``bad_request``: the two sides do
    not speak the same protocol).  A message this side is about to send that is over
    its own limits is a :class:`MessageTooLarge` instead."""


class CommTimeout(FMIError, TimeoutError):
    """An operation did not complete before its deadline."""


class PeerError(FMIError):
    """A peer failed, disappeared or reported an error.

    Raised by :meth:`Communicator.close <fmi_async.Communicator.close>` (after
    closing everything) when the final barrier with the other peers failed, so
    objects this peer stored were deleted while peers may still read them; the
    cause is chained.  The base of
    :class:`AbortedError` (another peer abandoned a collective) and
    :class:`BrokenCommunicatorError` (the communicator cannot be used any more),
    so ``except PeerError`` catches every failure that came from another peer.
    """


class PlanMismatchError(FMIError):
    """Two peers chose different plans (algorithm, shapes) for the same collective."""


class ChannelError(FMIError):
    """Base of the channel families."""


class ClosedError(ChannelError):
    """The channel or communicator was closed by this process."""


class BrokenChannelError(ChannelError, ConnectionError):
    """The channel broke: the connection was reset, a backend failed."""


class EndOfStream(ChannelError):
    """The peer closed its side of the stream cleanly."""


class BackendError(ChannelError):
    """A storage backend (Redis, S3, DynamoDB) returned an error."""


class AuthenticationError(FMIError, PermissionError):
    """A peer or join failed to prove knowledge of the shared secret."""


class AbortedError(PeerError):
    """Another peer abandoned the collective this peer is running, and said why.

    ``peer`` is the peer that gave up, ``cause`` the name of the error it
    raised (``RootError``, ``PlanMismatchError``, ``CommTimeout``, ...).  The
    collective's sequence number stays aligned on every peer, so the
    communicator can be used again.
    """

    def __init__(self, message: str, *, peer: int = -1, cause: str = "") -> None:
        super().__init__(message)
        self.peer = peer
        self.cause = cause


class BrokenCommunicatorError(PeerError):
    """The communicator cannot be used any more (its job lease was lost, or it closed
    with an error); every later call raises this, with the first cause chained."""


class JobConflictError(FMIError):
    """Another job holds, or opened at the same moment, this communicator's name and run id.

    Peers of two jobs with the same ``comm_name`` and run id would read each
    other's messages; the job lease (:mod:`fmi_async.jobs.lease`) turns every such
    collision it can see into this error.  Give each job a distinct ``run_id``
    (``fmi run`` makes one per run).
    """


class JobConflictTimeout(JobConflictError, CommTimeout):
    """The deadline passed while waiting (``job.on_conflict: "wait"``) for another job's lease.

    Both a :class:`JobConflictError` and a :class:`CommTimeout` (so a
    ``TimeoutError``): the wait was for another job, and it ran out of time.
    """


class JobMismatchError(FMIError):
    """Peers of one communicator disagree on ``num_peers``; found when the communicator opens."""


class LeaseLostError(FMIError):
    """An open communicator's job lease was lost: another job took its name and run id after
    the lease expired, or the lease could not be renewed for longer than its TTL."""


class BackendUnavailable(BrokenChannelError):
    """A storage backend kept failing (connection lost, restarting, HTTP 5xx), or did not
    answer, until the operation's deadline, after retries with backoff.  A receive that
    runs out of time this way raises :class:`CommTimeout` instead, naming this failure."""


class RendezvousExpired(LeaseLostError, CommTimeout):
    """The server no longer holds what a request referred to: it lapsed (code ``expired``).

    A job lease that lapsed and was taken by another job is lost
    (:class:`~fmi_async.errors.LeaseLostError`); a pairing that lapsed before
    this side reported is a step that did not complete in time
    (:class:`~fmi_async.errors.CommTimeout`).  One class is both, so either
    caller catches it as what it expects.
    """
