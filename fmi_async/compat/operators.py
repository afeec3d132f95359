"""FMI's reduction operators, ``func(op.X)`` and ``func(op.custom, f, commutative, associative)``.

The built-in operations map onto :mod:`fmi_async.ops` (numpy ufuncs, so
lists reduce element-wise).  A custom function is applied element by element
to Python ints or floats, as FMI's vector functions do, and must return a
value of the declared type (an int for an ``int`` declaration).  Its
``commutative`` and ``associative`` flags are honoured: a non-commutative
function is applied in rank order, a non-associative one as a strict left
fold in rank order (FMI may use any evaluation order the flags allow).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import OperatorError
from ..ops import MAX, MIN, PROD, SUM, Op
from .errors import DatatypeError, UnknownOperatorError
from .values import Spec

__all__ = ["OperatorCache", "func", "op"]

logger = logging.getLogger(__name__)


class op(enum.Enum):  # FMI's spelling, which FMI programs import
    """FMI's operations (``fmi.op.sum`` ...); ``custom`` takes a function."""

    sum = 0
    prod = 1
    max = 2
    min = 3
    custom = 4


_BUILTIN: dict[op, Op] = {op.sum: SUM, op.prod: PROD, op.max: MAX, op.min: MIN}


class func:  # FMI's spelling
    """A reduction: ``func(op.sum)``, or ``func(op.custom, f, commutative, associative)``.

    ``f(a, b)`` combines two elements (``a`` from the lower rank).  Nothing is
    checked here: the reduction that uses it checks it, so an unknown
    operation fails on every peer of the collective, not only on this one.
    Without flags a custom function is taken as associative and not
    commutative (the safe assumption, which keeps rank order).
    """

    __slots__ = ("associative", "commutative", "function", "operation")

    def __init__(
        self,
        operation: Any,
        function: Any = None,
        commutative: Any = False,
        associative: Any = True,
    ) -> None:
        self.operation = operation
        self.function = function
        self.commutative = commutative
        self.associative = associative

    def __repr__(self) -> str:
        if self.operation is op.custom:
            name = getattr(self.function, "__name__", repr(self.function))
            return f"func(op.custom, {name}, {self.commutative!r}, {self.associative!r})"
        shown = (
            f"op.{self.operation.name}" if isinstance(self.operation, op) else repr(self.operation)
        )
        return f"func({shown})"


class OperatorCache:
    """The :class:`~fmi_async.ops.Op` of each ``func`` (one per communicator).

    A custom function's Op is remembered (the last :attr:`SIZE`), so a loop
    that reduces with the same function keeps hitting the communicator's
    plan cache, whose key holds the Op.
    """

    SIZE = 64

    def __init__(self) -> None:
        self._custom: dict[tuple[Any, ...], Op] = {}

    def get(self, declared: Any, spec: Spec, what: str) -> Op:
        """The Op for ``declared`` over values of ``spec``; :class:`UnknownOperatorError`
        or :class:`~fmi_async.errors.OperatorError` when it cannot be one."""
        if not isinstance(declared, func):
            raise UnknownOperatorError(
                f"{what}: the operator must be fmi.func(fmi.op.X[, f, commutative, "
                f"associative]), got {declared!r} ({type(declared).__name__})"
            )
        operation = declared.operation
        if not isinstance(operation, op):
            raise UnknownOperatorError(
                f"{what}: unknown operation {operation!r}; use one of "
                f"{', '.join('op.' + o.name for o in op)}"
            )
        if operation is not op.custom:
            return _BUILTIN[operation]
        function = declared.function
        if not callable(function):
            raise UnknownOperatorError(
                f"{what}: op.custom needs a function f(a, b), got {function!r}"
            )
        flags = (declared.commutative, declared.associative)
        if not all(isinstance(flag, bool) for flag in flags):
            raise OperatorError(
                f"{what}: commutative and associative must be True or False, got {flags!r}"
            )
        key = (function, *flags, spec.is_int)
        try:
            found = self._custom.get(key)
        except TypeError:  # an unhashable callable: not remembered
            return _custom(function, spec, *flags)
        if found is None:
            if len(self._custom) >= self.SIZE:
                del self._custom[next(iter(self._custom))]
            found = self._custom[key] = _custom(function, spec, *flags)
        return found


def _custom(
    function: Callable[[Any, Any], Any], spec: Spec, commutative: bool, associative: bool
) -> Op:
    name = getattr(function, "__name__", "f")
    element = int if spec.is_int else float

    def elementwise(a: Any, b: Any) -> np.ndarray:
        out = np.empty(len(a), dtype=spec.dtype)
        for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            out[i] = _result(function(x, y), element, name)
        return out

    return Op(elementwise, commutative, associative, name=f"custom:{name}")


def _result(value: Any, element: type, name: str) -> int | float:
    """FMI converts a custom function's result to the declared element type, or fails."""
    if isinstance(value, (int, np.integer)):
        return int(value) if element is int else float(value)
    if element is float and isinstance(value, (float, np.floating)):
        return float(value)
    needed = "an int" if element is int else "a number"
    raise DatatypeError(
        f"the custom function {name} returned {value!r} ({type(value).__name__}) in a "
        f"reduction of {element.__name__}s; it must return {needed}"
    )
