"""FMI's blocking Python API over the asyncio core: FMI programs run unchanged.

``import fmi_async.compat as fmi`` in place of FMI's ``import fmi``; the rest
of the program stays as it is::

    comm = fmi.Communicator(node_id, num_nodes, "fmi.json", "Job", 512)
    comm.hint(fmi.hints.fast)
    total = comm.allreduce([1, 2], fmi.func(fmi.op.sum), fmi.types(fmi.datatypes.int_list, 2))

docs/migrating-from-fmi.md maps every name and says what differs.
"""

from __future__ import annotations

import logging

from ..errors import AbortedError, CommTimeout, FMIError, PlanMismatchError
from .communicator import Communicator, hints
from .errors import DatatypeError, EventLoopError, LengthMismatchError, UnknownOperatorError
from .operators import func, op
from .values import datatypes, types

__all__ = [
    # FMI's names
    "Communicator",
    "hints",
    "datatypes",
    "types",
    "op",
    "func",
    # errors
    "FMIError",
    "DatatypeError",
    "LengthMismatchError",
    "UnknownOperatorError",
    "EventLoopError",
    "AbortedError",
    "PlanMismatchError",
    "CommTimeout",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
