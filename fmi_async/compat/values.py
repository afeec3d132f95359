"""FMI's value declarations, ``types(datatypes.X, n)``, and the checks behind them.

FMI's Python API carries four kinds of value (its ``PythonType``): a C ``int``,
a ``double``, and lists of either with a length ``n`` given by the caller.
Here they travel as one-dimensional numpy arrays of ``int64`` or ``float64``
(a scalar as an array of one element), so

* every peer knows a collective's size from its declaration, as in FMI, and
  the plan signature carries dtype and length: peers that declare different
  types or lengths raise :class:`~fmi_async.errors.PlanMismatchError` (or
  :class:`~fmi_async.errors.AbortedError`) on every peer;
* lists reduce element-wise with numpy, as FMI's vector functions do.

What a declaration accepts is what FMI's conversions accept (an ``int``
takes Python ints and bools, a ``double`` takes ints and floats, a list must
hold such elements), plus numpy scalars and one-dimensional arrays and
tuples.  Unlike FMI, a list's length must equal its declared ``n``.  Ints are
64-bit here (FMI's are C ``int``, 32-bit): values FMI would reject or wrap
are carried exactly up to 2**63 - 1; numpy's int64 arithmetic wraps beyond.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DatatypeError, LengthMismatchError

__all__ = ["Spec", "datatypes", "resolve", "types"]

logger = logging.getLogger(__name__)

_INT_KINDS = frozenset("biu")  # numpy kinds an int declaration accepts (bool, int, uint)
_DOUBLE_KINDS = frozenset("biuf")


class datatypes(enum.Enum):  # FMI's spelling, which FMI programs import
    """The kinds of value FMI's Python API declares (``fmi.datatypes.int`` ...)."""

    int = 0
    double = 1
    int_list = 2
    double_list = 3


class types:  # FMI's spelling
    """A value's declaration: ``types(datatypes.int)``, ``types(datatypes.double_list, n)``.

    ``n`` is the number of elements of a list type (required for lists, ignored
    for scalars, as in FMI).  Nothing is checked here: the declaration is
    checked inside the call that uses it, so a wrong one fails on every peer
    of a collective, not only on the one that made it.
    """

    __slots__ = ("datatype", "num_objects")

    def __init__(self, datatype: Any, num_objects: Any = None) -> None:
        self.datatype = datatype
        self.num_objects = num_objects

    def __repr__(self) -> str:
        name = getattr(self.datatype, "name", None)
        shown = f"datatypes.{name}" if isinstance(self.datatype, datatypes) else repr(name)
        if self.num_objects is None:
            return f"types({shown})"
        return f"types({shown}, {self.num_objects!r})"


@dataclass(frozen=True)
class Spec:
    """A checked declaration: the datatype and the number of elements (1 for scalars)."""

    datatype: datatypes
    length: int

    @property
    def is_list(self) -> bool:
        return self.datatype in (datatypes.int_list, datatypes.double_list)

    @property
    def is_int(self) -> bool:
        return self.datatype in (datatypes.int, datatypes.int_list)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.int64) if self.is_int else np.dtype(np.float64)

    def __str__(self) -> str:
        if self.is_list:
            return f"types(datatypes.{self.datatype.name}, {self.length})"
        return f"types(datatypes.{self.datatype.name})"

    def _element(self) -> str:
        return "an int" if self.is_int else "a float or an int"

    def to_array(self, value: Any, what: str) -> np.ndarray:
        """``value`` as the array that travels, or :class:`DatatypeError`."""
        if not self.is_list:
            return np.array([self._scalar(value, what)], dtype=self.dtype)
        if isinstance(value, np.ndarray):
            arr = value
        elif isinstance(value, (list, tuple)):
            try:
                arr = np.asarray(value)
            except (ValueError, OverflowError) as exc:
                raise DatatypeError(f"{what}: the list does not match {self}: {exc}") from None
        else:
            raise DatatypeError(
                f"{what}: {_shown(value)} does not match {self}: a list of "
                f"{self.length} elements is needed"
            )
        self._check_array(arr, what)
        return arr.astype(self.dtype)  # a copy: the caller may change its list or array

    def _scalar(self, value: Any, what: str) -> int | float:
        if isinstance(value, (int, np.integer)):
            if self.is_int and not -(2**63) <= int(value) < 2**63:
                raise DatatypeError(f"{what}: {value} does not fit a 64-bit int ({self})")
            return int(value) if self.is_int else float(value)
        if not self.is_int and isinstance(value, (float, np.floating)):
            return float(value)
        raise DatatypeError(
            f"{what}: {_shown(value)} does not match {self}: {self._element()} is needed"
        )

    def _check_array(self, arr: np.ndarray, what: str) -> None:
        kinds = _INT_KINDS if self.is_int else _DOUBLE_KINDS
        if arr.ndim != 1 or arr.dtype.kind not in kinds:
            raise DatatypeError(
                f"{what}: a list of {arr.dtype} elements{_dims(arr)} does not match {self}: "
                f"every element must be {self._element()}"
            )
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
            raise DatatypeError(f"{what}: an element does not fit a 64-bit int ({self})")
        if arr.shape[0] != self.length:
            raise LengthMismatchError(
                f"{what}: a list of {arr.shape[0]} elements does not match {self}"
            )

    def from_array(self, value: Any, what: str) -> Any:
        """A value that arrived (or a result) as the Python value FMI returns."""
        if isinstance(value, np.ndarray):
            if value.shape != (self.length,) or value.dtype != self.dtype:
                count = value.shape[0] if value.ndim else 0
                wrong = (
                    LengthMismatchError
                    if self.is_list and value.dtype == self.dtype and value.ndim == 1
                    else DatatypeError
                )
                raise wrong(
                    f"{what}: received {count} {value.dtype} elements{_dims(value)}, which "
                    f"do not match {self}"
                )
            out: list[Any] = value.tolist()
            return out if self.is_list else out[0]
        # From a peer that sent a plain value (the asyncio API): checked like an input.
        return self.from_array(self.to_array(value, what), what)

    def template(self, length: int | None = None) -> np.ndarray:
        """An array of this declaration's dtype and ``length`` (default its own): the
        shape every peer's plan signature carries."""
        return np.zeros(self.length if length is None else length, dtype=self.dtype)

    def zeros(self) -> Any:
        """What FMI leaves in a non-root's receive buffer of a list type: ``n`` zeros."""
        return self.template().tolist() if self.is_list else None


def resolve(declared: Any, what: str) -> Spec:
    """Check a ``types(...)`` declaration; :class:`DatatypeError` or
    :class:`LengthMismatchError` when it cannot describe a value."""
    if not isinstance(declared, types):
        raise DatatypeError(
            f"{what}: the value's declaration must be fmi.types(fmi.datatypes.X[, n]), "
            f"got {_shown(declared)}"
        )
    kind = declared.datatype
    if not isinstance(kind, datatypes):
        raise DatatypeError(
            f"{what}: unknown datatype {kind!r}; use one of "
            f"{', '.join('datatypes.' + d.name for d in datatypes)}"
        )
    if kind in (datatypes.int, datatypes.double):
        return Spec(kind, 1)
    n = declared.num_objects
    if n is None:
        raise LengthMismatchError(
            f"{what}: types(datatypes.{kind.name}) needs the number of elements: "
            f"types(datatypes.{kind.name}, n)"
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise LengthMismatchError(
            f"{what}: the number of elements of types(datatypes.{kind.name}, n) must be a "
            f"positive int, got {n!r}"
        )
    return Spec(kind, int(n))


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _dims(arr: np.ndarray) -> str:
    return "" if arr.ndim == 1 else f" in {arr.ndim} dimensions"
