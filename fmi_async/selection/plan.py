"""Choosing a channel and an algorithm for each collective call.

:func:`plan` enumerates every valid ``(channel, family, algorithm)`` for the
call, predicts its seconds and dollars from the algorithm's round structure
and the channel's model (:mod:`fmi_async.selection.model`), and returns the
fastest under :attr:`Hint.FAST` or the cheapest under :attr:`Hint.CHEAP`.

It is a pure function of inputs every peer has identically (DESIGN.md
section 2.4): the operation, a size all peers know, the group size, the
operator's properties, the root, the hint and the configuration.  Where a peer
cannot know the size (a non-root in ``bcast``, object values of different
sizes), the caller passes ``nbytes=`` or the documented default
:data:`DEFAULT_NBYTES` is used on every peer.  Ties are broken by a fixed
order, never by dictionary or set order.

The plan identifier (:attr:`Plan.ident`) travels in every collective
message, so peers that disagree raise
:class:`~fmi_async.errors.PlanMismatchError` naming both plans.

A plan's time is the larger of its critical path (its round structure) and its total work
(every message's overhead and every byte's transfer time) divided by the
channel's ``concurrency``: peers on separate machines work in parallel
(unbounded), peers sharing one event loop one after another (1).  Reductions
add the bytes folded by the operator at ``1 / reduce_bandwidth`` seconds per
byte (:func:`~fmi_async.selection.rounds.folds`), to the critical path and to the total work alike.

The round structures and cost formulas are in :mod:`fmi_async.selection.rounds`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..channels import registry as channel_registry
from ..collectives import registry
from ..errors import ArgumentError
from ..ops import Op
from .model import CostModel
from .rounds import Shape, estimate

__all__ = [
    "DEFAULT_NBYTES",
    "OPERATIONS",
    "Hint",
    "Plan",
    "plan",
    "plans",
]

# The size assumed where peers cannot all know it (see the module docstring).
DEFAULT_NBYTES = 1024


class Hint(enum.Enum):
    """What the user wants minimised."""

    FAST = "fast"
    CHEAP = "cheap"


# The collectives, their algorithms and what each needs of a call are declared
# once, in fmi_async.collectives.registry; plan() reads them from there.
OPERATIONS = tuple(registry.COLLECTIVES)


@dataclass(frozen=True, slots=True)
class Plan:
    """One way to run a collective, with what the model predicts for it."""

    op: str
    channel: str
    family: str  # "direct" (over point-to-point) or "mediated" (storage-native)
    algorithm: str
    signature: str = ""
    seconds: float = 0.0
    usd: float = 0.0
    requests: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def ident(self) -> str:
        base = f"{self.op}/{self.channel}/{self.family}:{self.algorithm}"
        return f"{base}/{self.signature}" if self.signature else base


def plans(
    op: str,
    *,
    nbytes: int | None,
    num_peers: int,
    channels: Sequence[tuple[str, str]],
    models: CostModel,
    operator: Op | None = None,
    is_array: bool = False,
    elements: int | None = None,
    root: int = 0,
    signature: str = "",
) -> list[Plan]:
    """Every valid plan for the call, with its predictions, in the fixed tie-break order."""
    if op not in registry.COLLECTIVES:
        raise ArgumentError(f"no collective named {op!r}; known: {', '.join(OPERATIONS)}")
    shape = Shape(
        op,
        float(DEFAULT_NBYTES if nbytes is None else nbytes),
        num_peers,
        root,
        operator,
        is_array,
        elements,
    )
    # Channels in the registry's fixed order (fastest kinds first) break ties.
    order = {name: i for i, name in enumerate(channel_registry.names())}
    out: list[Plan] = []
    for name, kind in sorted(channels, key=lambda c: (order.get(c[0], 99), c[0])):
        # Direct algorithms run on every channel, storage-native ones on storage,
        # MPI's own on the MPI channel (the channel registry says which).
        for family in channel_registry.families(name, kind):
            for entry in registry.algorithms(family, op):
                if entry.allows(shape):
                    secs, usd, req = estimate(name, kind, entry, shape, models)
                    out.append(Plan(op, name, family, entry.name, signature, secs, usd, req))
    return out


def plan(
    op: str,
    *,
    nbytes: int | None,
    num_peers: int,
    channels: Sequence[tuple[str, str]],
    models: CostModel,
    operator: Op | None = None,
    is_array: bool = False,
    elements: int | None = None,
    root: int = 0,
    signature: str = "",
    hint: Hint = Hint.FAST,
    channel: str | None = None,
    algorithm: str | None = None,
) -> Plan:
    """The plan for one collective call: fastest (FAST) or cheapest (CHEAP).

    ``channel=`` and ``algorithm=`` restrict the choice (per-call override);
    an algorithm name may be qualified with its family, ``"mediated:root"``.

    Raises :class:`~fmi_async.errors.ArgumentError` for an unknown collective,
    a channel that is not enabled, an algorithm that is not registered for
    ``op`` (the message lists the registered ones) or one that cannot run this
    call (the message says what it needs and lists the valid choices).
    """
    if not channels:
        raise ArgumentError("no channel is open to plan a collective on")
    if channel is not None:
        channels = [c for c in channels if c[0] == channel]
        if not channels:
            raise ArgumentError(f"channel {channel!r} is not enabled for this communicator")
    candidates = plans(
        op,
        nbytes=nbytes,
        num_peers=num_peers,
        channels=channels,
        models=models,
        operator=operator,
        is_array=is_array,
        elements=elements,
        root=root,
        signature=signature,
    )
    if algorithm is not None:
        candidates = _override(op, algorithm, candidates, num_peers, operator, is_array, elements)
    if not candidates:
        raise ArgumentError(f"no valid plan for {op} on channels {[c[0] for c in channels]}")
    if hint is Hint.CHEAP:
        ranked = sorted(
            enumerate(candidates), key=lambda ic: (_q(ic[1].usd), _q(ic[1].seconds), ic[0])
        )
    else:
        ranked = sorted(
            enumerate(candidates), key=lambda ic: (_q(ic[1].seconds), _q(ic[1].usd), ic[0])
        )
    return ranked[0][1]


def _override(
    op: str,
    algorithm: str,
    candidates: list[Plan],
    peers: int,
    operator: Op | None,
    is_array: bool,
    elements: int | None,
) -> list[Plan]:
    """The candidates running ``algorithm`` (``name`` or ``family:name``)."""
    family, _, name = algorithm.rpartition(":")
    entries = [
        a
        for f in registry.FAMILIES
        if not family or f == family
        for a in registry.algorithms(f, op)
        if a.name == name
    ]
    if not entries:
        raise ArgumentError(
            f"{op} has no algorithm {algorithm!r}; known: {', '.join(registry.known(op))}"
        )
    picked = [c for c in candidates if c.algorithm == name and (not family or c.family == family)]
    if not picked:
        call = Shape(op, 0.0, peers, 0, operator, is_array, elements)
        needs = sorted({n.value for a in entries for n in a.missing(call)})
        why = f"it needs {', '.join(needs)}" if needs else "no enabled channel offers it"
        valid = sorted({f"{c.family}:{c.algorithm}" for c in candidates})
        raise ArgumentError(
            f"{op} cannot use algorithm {algorithm!r} here ({why}); "
            f"valid choices: {', '.join(valid)}"
        )
    return picked


def _q(x: float) -> float:
    """Round to 9 significant digits so that ties are ties on every machine."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, 8 - math.floor(math.log10(abs(x))))
