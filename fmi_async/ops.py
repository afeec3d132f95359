"""Reduction operators.

An :class:`Op` combines two values, ``op(a, b)`` with ``a`` from the lower
rank.  Built-ins work on Python scalars and element-wise on numpy arrays (with
numpy ufuncs, so the result is an array of the inputs' broadcast dtype).  User
operators declare whether they are commutative and associative; the
collectives keep rank order for non-commutative operators and fold strictly
left-to-right in rank order for non-associative ones.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import OperatorError, ShapeMismatchError

__all__ = [
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
    "BUILTIN_OPS",
    "as_op",
    "fold",
]


@dataclass(frozen=True)
class Op:
    """A binary reduction operator ``func(a, b)``; ``a`` comes from the lower rank."""

    func: Callable[[Any, Any], Any]
    commutative: bool = False
    associative: bool = True
    name: str = ""
    ufunc: np.ufunc | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.func):
            raise OperatorError(f"Op needs a callable, got {type(self.func).__name__}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.func, "__name__", "user_op"))

    def __call__(self, a: Any, b: Any) -> Any:
        if self.ufunc is not None and (isinstance(a, np.ndarray) or isinstance(b, np.ndarray)):
            _check_shapes(a, b, self.name)
            try:
                return self.ufunc(a, b)
            except TypeError as exc:
                raise OperatorError(
                    f"{self.name} cannot combine {_describe(a)} and {_describe(b)}: {exc}"
                ) from exc
        try:
            return self.func(a, b)
        except ShapeMismatchError:
            raise
        except (TypeError, ValueError) as exc:
            raise OperatorError(
                f"operator {self.name} failed on {_describe(a)} and {_describe(b)}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"Op({self.name}, commutative={self.commutative}, associative={self.associative})"


def _describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array(shape={v.shape}, dtype={v.dtype})"
    return type(v).__name__


def _check_shapes(a: Any, b: Any, name: str) -> None:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape != b.shape:
        raise ShapeMismatchError(
            f"{name}: arrays of shapes {a.shape} and {b.shape} cannot be reduced element-wise; "
            "every peer must contribute an array of the same shape"
        )


def _land(a: Any, b: Any) -> Any:
    return bool(a) and bool(b)


def _lor(a: Any, b: Any) -> Any:
    return bool(a) or bool(b)


def _min(a: Any, b: Any) -> Any:
    return b if b < a else a


def _max(a: Any, b: Any) -> Any:
    return b if b > a else a


SUM = Op(operator.add, True, True, "SUM", np.add)
PROD = Op(operator.mul, True, True, "PROD", np.multiply)
MIN = Op(_min, True, True, "MIN", np.minimum)
MAX = Op(_max, True, True, "MAX", np.maximum)
LAND = Op(_land, True, True, "LAND", np.logical_and)
LOR = Op(_lor, True, True, "LOR", np.logical_or)
BAND = Op(operator.and_, True, True, "BAND", np.bitwise_and)
BOR = Op(operator.or_, True, True, "BOR", np.bitwise_or)
BXOR = Op(operator.xor, True, True, "BXOR", np.bitwise_xor)

BUILTIN_OPS: dict[str, Op] = {
    op.name: op for op in (SUM, PROD, MIN, MAX, LAND, LOR, BAND, BOR, BXOR)
}


def as_op(op: Op | str | Callable[[Any, Any], Any]) -> Op:
    """Accept an :class:`Op`, a built-in name (``"sum"``), or a plain callable.

    A plain callable is taken as associative but *not* commutative: the safe
    assumption, which keeps rank order.
    """
    if isinstance(op, Op):
        return op
    if isinstance(op, str):
        found = BUILTIN_OPS.get(op.upper())
        if found is None:
            raise OperatorError(
                f"unknown operator {op!r}; use one of {sorted(BUILTIN_OPS)} or fmi.Op(func, ...)"
            )
        return found
    if callable(op):
        return Op(op, commutative=False, associative=True)
    raise OperatorError(
        f"operator must be an fmi.Op, a name or a callable, got {type(op).__name__}"
    )


def fold(op: Op, values: list[Any]) -> Any:
    """Left fold in list order: ``op(op(v0, v1), v2) ...`` (the sequential reference)."""
    if not values:
        raise OperatorError("cannot reduce an empty sequence")
    acc = values[0]
    for v in values[1:]:
        acc = op(acc, v)
    return acc
