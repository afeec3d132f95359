"""Choosing a channel and an algorithm for each collective call.

:func:`plan` is a pure function of inputs that every peer has identically
(operation, a size every peer knows, group size, operator properties, hint
and configuration), as DESIGN.md section 2.4 requires: two peers that chose
differently would wait for messages that never come.  Where a peer cannot know
the size (a non-root in ``bcast``), the size is left out of the decision.

The plan identifier (:attr:`Plan.ident`) travels in every collective message,
so that peers which disagree raise :class:`~fmi_async.errors.PlanMismatchError`
naming both plans.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import ArgumentError
from ..ops import Op

__all__ = ["Hint", "Plan", "plan", "RING_THRESHOLD"]

# Above this many bytes per peer, a commutative array allreduce uses the ring
# (bandwidth-optimal: 2(P-1)/P * n bytes per peer) instead of recursive
# doubling (log2(P) * n bytes per peer).  Thakur et al. 2005 switch near 2 KiB
# on clusters; per-message overhead of an asyncio channel is higher, so the
# crossover is higher too (measured with benchmarks/p2p.py on loopback).
RING_THRESHOLD = 256 * 1024


class Hint(enum.Enum):
    """What the user wants minimised."""

    FAST = "fast"
    CHEAP = "cheap"


@dataclass(frozen=True, slots=True)
class Plan:
    op: str
    channel: str
    algorithm: str
    signature: str = ""

    @property
    def ident(self) -> str:
        return f"{self.op}/{self.channel}/{self.algorithm}" + (
            f"/{self.signature}" if self.signature else ""
        )


def plan(
    op: str,
    *,
    nbytes: int | None,
    num_peers: int,
    channel: str,
    operator: Op | None = None,
    is_array: bool = False,
    signature: str = "",
    hint: Hint = Hint.FAST,
    algorithm: str | None = None,
) -> Plan:
    """The plan for one collective call; deterministic for equal inputs."""
    from ..collectives.direct import ALGORITHMS

    if op not in ALGORITHMS:
        raise ArgumentError(f"no collective named {op!r}")
    choices = ALGORITHMS[op]
    if algorithm is not None:
        if algorithm not in choices:
            raise ArgumentError(f"{op} has no algorithm {algorithm!r}; choose one of {choices}")
        if algorithm == "ring" and not (is_array and operator is not None and operator.commutative):
            raise ArgumentError("the ring allreduce needs numpy arrays and a commutative operator")
        return Plan(op, channel, algorithm, signature)
    chosen = choices[0]
    if operator is not None and not operator.associative and len(choices) > 1:
        chosen = choices[-1]  # the linear / chain form keeps the exact left fold
    elif (
        op == "allreduce"
        and is_array
        and operator is not None
        and operator.commutative
        and nbytes is not None
        and nbytes >= RING_THRESHOLD
        and num_peers > 2
    ):
        chosen = "ring"
    return Plan(op, channel, chosen, signature)
