"""The one list of collective algorithms.

Every algorithm is declared once, by the :func:`algorithm` decorator on the
coroutine that implements it (in :mod:`~fmi_async.collectives.direct` or
:mod:`~fmi_async.collectives.mediated`)::

    @algorithm("direct", "allreduce", "ring", needs=(Need.ARRAY, Need.COMMUTATIVE))
    async def allreduce_ring(ctx, value, op): ...

The entry (:class:`Algorithm`) says everything the other layers need:

* its *family* (``direct``: over point-to-point messages, any channel;
  ``mediated``: storage-native, storage channels only), its *collective* and
  its *name* -- the ``algorithm=`` a user may pass, and part of every plan
  identifier;
* the arguments it takes after the context: those of its collective, declared
  once in :data:`COLLECTIVES`, and checked against the function's signature
  when it registers, so the communicator calls every algorithm the same way,
  ``fn(ctx, *args)``;
* what it needs of the call (:class:`Need`: an associative operator, a
  numpy array, ...): :func:`fmi_async.selection.plan.plan` offers it only
  where :meth:`Algorithm.allows` holds;
* its *cost* tag: the round structure :mod:`fmi_async.selection.plan`
  estimates it with (by default its name; a new algorithm shaped like an
  existing one names that one's tag).

The planner reads names and needs from here, the communicator dispatches with
one :func:`get`; nothing else lists algorithms.  Declaration order within a
collective is the planner's tie-break order.

This module imports nothing above the collectives (no selection, no
communicator).  The package's ``__init__`` imports the algorithm modules, so
importing this one (which runs the package's ``__init__`` first) always yields
a complete table.  A new algorithm module is added to that ``__init__``.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar

from ..errors import ArgumentError
from ..ops import Op

__all__ = [
    "COLLECTIVES",
    "FAMILIES",
    "Algorithm",
    "CallTraits",
    "Family",
    "Need",
    "algorithm",
    "algorithms",
    "get",
    "known",
]

logger = logging.getLogger(__name__)

Family = Literal["direct", "mediated", "mpi"]
FAMILIES: Final[tuple[Family, ...]] = ("direct", "mediated", "mpi")

COLLECTIVES: Final[dict[str, tuple[str, ...]]] = {
    "bcast": ("value", "root"),
    "reduce": ("value", "op", "root"),
    "allreduce": ("value", "op"),
    "gather": ("value", "root"),
    "scatter": ("values", "root"),
    "allgather": ("value",),
    "alltoall": ("values",),
    "reduce_scatter": ("parts", "op"),
    "scan": ("value", "op"),
    "exscan": ("value", "op"),
    "barrier": (),
}
"""Every collective and the arguments each of its algorithms takes after the
context, in order (``values``: one item per peer; ``parts``: one part per
peer; ``op``: an :class:`~fmi_async.ops.Op`; ``value``/``values`` are ``None``
on non-roots where only the root has them)."""

AlgorithmFn = Callable[..., Coroutine[Any, Any, Any]]
F = TypeVar("F", bound=AlgorithmFn)


class CallTraits(Protocol):
    """What an algorithm's needs are checked against (the planner's view of a call)."""

    @property
    def peers(self) -> int: ...

    @property
    def operator(self) -> Op | None: ...

    @property
    def is_array(self) -> bool: ...

    @property
    def elements(self) -> int | None: ...


class Need(enum.Enum):
    """A condition an algorithm needs of a call; the value says it in words.

    A call without an operator (bcast, gather, ...) counts as associative and
    not commutative.
    """

    ASSOCIATIVE = "an associative operator"
    NON_ASSOCIATIVE = "a non-associative operator"
    COMMUTATIVE = "a commutative operator"
    ARRAY = "a numpy array"
    ELEMENTWISE = "a built-in elementwise operator (fmi.SUM, fmi.MAX, ...)"
    PART_PER_PEER = "at least one array element per peer"

    def holds(self, call: CallTraits) -> bool:
        """Whether ``call`` meets this need."""
        op = call.operator
        if self is Need.ASSOCIATIVE:
            return op is None or op.associative
        if self is Need.NON_ASSOCIATIVE:
            return op is not None and not op.associative
        if self is Need.COMMUTATIVE:
            return op is not None and op.commutative
        if self is Need.ARRAY:
            return call.is_array
        if self is Need.ELEMENTWISE:
            return op is not None and op.ufunc is not None
        # Need.PART_PER_PEER
        return call.elements is not None and call.elements >= call.peers


@dataclass(frozen=True, slots=True)
class Algorithm:
    """One registered algorithm (see the module docstring)."""

    family: Family
    collective: str
    name: str
    fn: AlgorithmFn
    needs: tuple[Need, ...] = ()
    cost: str = ""

    @property
    def args(self) -> tuple[str, ...]:
        """The arguments ``fn`` takes after the context."""
        return COLLECTIVES[self.collective]

    @property
    def qualified(self) -> str:
        """``family:name``, the form ``algorithm=`` accepts to pick one family."""
        return f"{self.family}:{self.name}"

    def allows(self, call: CallTraits) -> bool:
        """Whether this algorithm can run ``call`` (every need holds)."""
        for need in self.needs:  # a loop, not all(): plan() asks this on every call
            if not need.holds(call):
                return False
        return True

    def missing(self, call: CallTraits) -> list[Need]:
        """The needs ``call`` does not meet."""
        return [need for need in self.needs if not need.holds(call)]


_TABLE: dict[tuple[str, str], dict[str, Algorithm]] = {}
_ORDERED: dict[tuple[str, str], tuple[Algorithm, ...]] = {}  # _TABLE's values, kept as tuples


def algorithm(
    family: Family,
    collective: str,
    name: str,
    *,
    needs: tuple[Need, ...] = (),
    cost: str | None = None,
) -> Callable[[F], F]:
    """Register the decorated coroutine as ``family:name`` of ``collective``.

    Raises :class:`ValueError` (a programming error, at import) for an unknown
    family or collective, a name registered twice, or a function whose
    parameters are not ``(ctx, *COLLECTIVES[collective])``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown algorithm family {family!r}; known: {', '.join(FAMILIES)}")
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")

    def register(fn: F) -> F:
        params = list(inspect.signature(fn).parameters)[1:]
        if tuple(params) != COLLECTIVES[collective]:
            raise ValueError(
                f"{fn.__qualname__} takes {params} after the context; {collective} algorithms "
                f"take {list(COLLECTIVES[collective])}"
            )
        entries = _TABLE.setdefault((family, collective), {})
        if name in entries:
            raise ValueError(f"{family}:{name} is registered twice for {collective}")
        entries[name] = Algorithm(family, collective, name, fn, needs, cost or name)
        _ORDERED[family, collective] = tuple(entries.values())
        logger.debug("registered %s:%s for %s (%s)", family, name, collective, fn.__qualname__)
        return fn

    return register


def algorithms(family: str, collective: str) -> tuple[Algorithm, ...]:
    """The algorithms of one family for one collective, in declaration order."""
    return _ORDERED.get((family, collective), ())


def known(collective: str) -> list[str]:
    """Every ``family:name`` registered for ``collective``, for error messages."""
    return [a.qualified for family in FAMILIES for a in algorithms(family, collective)]


def get(family: str, collective: str, name: str) -> Algorithm:
    """The algorithm registered as ``family:name`` for ``collective``.

    Raises :class:`~fmi_async.errors.ArgumentError` naming the registered
    algorithms when there is none.
    """
    try:
        return _TABLE[family, collective][name]
    except KeyError:
        if collective not in COLLECTIVES:
            raise ArgumentError(
                f"no collective named {collective!r}; known: {', '.join(COLLECTIVES)}"
            ) from None
        raise ArgumentError(
            f"{collective} has no algorithm {family}:{name}; known: {', '.join(known(collective))}"
        ) from None
