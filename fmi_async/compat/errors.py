"""The errors :mod:`fmi_async.compat` adds to the library's hierarchy.

Every one is an :class:`~fmi_async.errors.FMIError`.  A value that does not
match the ``types(...)`` it is declared with, or an operator ``func(...)``
that names no known operation, is found inside the collective, after its
sequence number is taken: the calling peer raises the error below and every
other peer of that collective raises :class:`~fmi_async.errors.AbortedError`
whose ``cause`` names it (DESIGN.md section 8), so no peer waits for its
deadline.
"""

from __future__ import annotations

from ..errors import ArgumentError, FMIError, OperatorError, SizeMismatchError

__all__ = ["DatatypeError", "EventLoopError", "LengthMismatchError", "UnknownOperatorError"]


class DatatypeError(ArgumentError, TypeError):
    """A value does not match its declared ``types(datatypes.X, n)``: a float where an
    ``int`` is declared, a string in a ``double_list``, a list where a scalar is declared,
    a declaration that is not a ``types`` at all, or a received value of another type.

    Both a ``ValueError`` (as every :class:`~fmi_async.errors.ArgumentError`) and a
    ``TypeError`` (what Python raises for a value of the wrong type)."""


class LengthMismatchError(DatatypeError, SizeMismatchError):
    """A list's length differs from the ``n`` of its ``types(datatypes.X_list, n)``, ``n`` is
    missing or not a positive int, or a ``scatter``'s ``n`` is not divisible by the number
    of peers."""


class UnknownOperatorError(OperatorError):
    """``func(...)`` names no operation of ``op`` (sum, prod, max, min, custom), or
    ``op.custom`` comes without a callable."""


class EventLoopError(FMIError, RuntimeError):
    """A blocking call of :mod:`fmi_async.compat` was made from a thread whose asyncio event
    loop is running: it would block that loop.  Inside asyncio code, use
    :class:`fmi_async.Communicator` and ``await`` its calls instead."""
