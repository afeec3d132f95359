"""fmi-async: message passing and MPI-style collectives for asyncio.

``import fmi_async as fmi``; see README.md and docs/ for the tour.
"""

from __future__ import annotations

import logging

from .communicator import Communicator
from .config import Config
from .errors import (
    AbortedError,
    ArgumentError,
    AuthenticationError,
    BackendError,
    BackendUnavailable,
    BrokenChannelError,
    BrokenCommunicatorError,
    ChannelError,
    ClosedError,
    CommTimeout,
    ConfigError,
    EndOfStream,
    FMIError,
    JobConflictError,
    JobConflictTimeout,
    JobMismatchError,
    LeaseLostError,
    MessageTooLarge,
    OperatorError,
    PeerError,
    PlanMismatchError,
    ProtocolError,
    RendezvousExpired,
    RootError,
    SerializationError,
    ShapeMismatchError,
    SizeMismatchError,
)
from .local import local_peers
from .ops import BAND, BOR, BXOR, LAND, LOR, MAX, MIN, PROD, SUM, Op
from .runner import run
from .selection.plan import Hint

__version__ = "0.1.0"

__all__ = [
    # communicator and entry points
    "Communicator",
    "local_peers",
    "run",
    "Config",
    "Hint",
    # operators
    "Op",
    "SUM",
    "PROD",
    "MIN",
    "MAX",
    "LAND",
    "LOR",
    "BAND",
    "BOR",
    "BXOR",
    # errors
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
    "BackendUnavailable",
    "AuthenticationError",
    "AbortedError",
    "BrokenCommunicatorError",
    "JobConflictError",
    "JobConflictTimeout",
    "JobMismatchError",
    "LeaseLostError",
    "RendezvousExpired",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
