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

A plan's time is the larger of its critical path (below) and its total work
(every message's overhead and every byte's transfer time) divided by the
channel's ``concurrency``: peers on separate machines work in parallel
(unbounded), peers sharing one event loop one after another (1).  Reductions
add the bytes folded by the operator at ``1 / reduce_bandwidth`` seconds per
byte (:func:`_folds`), to the critical path and to the total work alike.

Round structures (``L = ceil(log2 P)``, ``t(n) = overhead + n / bandwidth``;
a point-to-point message over storage is a put and a get, ``2 t(n)``):

============== ================== ==========================================
op             algorithm          predicted seconds
============== ================== ==========================================
bcast          binomial           L t(n)
reduce         binomial           L t(n)  (+ t(n) to a non-zero root, non-commutative)
allreduce      recursive_doubling (log2 P' + 2[P != P']) t(n), P' = 2^floor(log2 P)
allreduce      ring               2 (P-1) t(n / P)
allreduce      linear             reduce (or gather, non-associative) + bcast
gather/scatter binomial           L o + (P-1) n / b
allgather      bruck              L o + (P-1) n / b
alltoall       pairwise           (P-1) t(n)
reduce_scatter pairwise           (P-1) o + (P-1) (n/P) / b
scan/exscan    recursive_doubling L t(n);   chain: (P-1) t(n)
barrier        dissemination      L t(0)
bcast          put_get (storage)  put(n) + get(n) shared by P-1 readers
gather/reduce  fetch (storage)    put(n) + o + (P-1) n / b
allreduce      root / split       gather + put + shared get / parts of n/P
============== ================== ==========================================
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ArgumentError
from ..ops import Op
from .model import ChannelModel, CostModel, message_requests, object_requests

__all__ = [
    "DEFAULT_NBYTES",
    "DIRECT_ALGORITHMS",
    "MEDIATED_ALGORITHMS",
    "OPERATIONS",
    "Hint",
    "Plan",
    "plan",
    "plans",
]

# The size assumed where peers cannot all know it (see the module docstring).
DEFAULT_NBYTES = 1024

# Fixed order of channels for tie-breaking: fastest kinds first.
CHANNEL_ORDER = ("memory", "mpi", "tcp", "udp", "redis", "dynamodb", "s3")


class Hint(enum.Enum):
    """What the user wants minimised."""

    FAST = "fast"
    CHEAP = "cheap"


DIRECT_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "bcast": ("binomial",),
    "reduce": ("binomial", "linear"),
    "allreduce": ("recursive_doubling", "ring", "linear"),
    "gather": ("binomial",),
    "scatter": ("binomial",),
    "allgather": ("bruck",),
    "alltoall": ("pairwise",),
    "reduce_scatter": ("pairwise",),
    "scan": ("recursive_doubling", "chain"),
    "exscan": ("recursive_doubling", "chain"),
    "barrier": ("dissemination",),
}
MEDIATED_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "bcast": ("put_get",),
    "reduce": ("fetch_fold",),
    "allreduce": ("root", "split"),
    "gather": ("fetch",),
    "scatter": ("store",),
    "allgather": ("put_get",),
    "alltoall": ("store",),
    "reduce_scatter": ("fetch_fold",),
    "scan": ("tree", "chain"),
    "exscan": ("tree", "chain"),
    "barrier": ("gather_release",),
}
OPERATIONS = tuple(DIRECT_ALGORITHMS)


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


@dataclass(frozen=True, slots=True)
class _Shape:
    """What an estimate needs to know about the call."""

    op: str
    nbytes: float
    peers: int
    root: int
    operator: Op | None
    is_array: bool
    elements: int | None


def _log2ceil(p: int) -> int:
    return (p - 1).bit_length() if p > 1 else 0


def _scan_messages(p: int) -> int:
    """Messages of a recursive-doubling scan: rank r sends to r ^ 2^m when it exists."""
    return sum(1 for m in range(_log2ceil(p)) for r in range(p) if r ^ (1 << m) < p)


def _valid(family: str, algorithm: str, s: _Shape) -> bool:
    op = s.operator
    associative = op is None or op.associative
    commutative = op is not None and op.commutative
    if family == "direct":
        if algorithm == "ring":
            return s.is_array and commutative and associative
        if algorithm in ("recursive_doubling", "binomial") and s.op in (
            "allreduce",
            "reduce",
            "scan",
            "exscan",
        ):
            return associative
        return True
    if algorithm == "split":
        return (
            s.is_array
            and op is not None
            and op.ufunc is not None
            and s.elements is not None
            and s.elements >= s.peers
        )
    if algorithm == "tree":
        return associative
    if algorithm == "chain":  # the storage scan picks tree or chain by the operator
        return not associative
    return True


def _direct(alg: str, s: _Shape, a: float, b: float) -> tuple[float, float, float]:
    """(seconds, messages, bytes) of a direct algorithm; a message costs a + n b."""
    p, n, big_l = s.peers, s.nbytes, _log2ceil(s.peers)

    def t(x: float) -> float:
        return a + x * b

    op = s.op
    if p == 1:
        return 0.0, 0.0, 0.0
    if op == "bcast":
        return big_l * t(n), p - 1, (p - 1) * n
    if op in ("gather", "scatter") or (op == "reduce" and alg == "linear"):
        hops = sum(bin(v).count("1") for v in range(1, p))
        return big_l * a + (p - 1) * n * b, p - 1, hops * n
    if op == "reduce":
        extra = 0 if (s.operator is not None and s.operator.commutative) or s.root == 0 else 1
        return (big_l + extra) * t(n), p - 1 + extra, (p - 1 + extra) * n
    if op == "allreduce":
        if alg == "ring":
            return 2 * (p - 1) * t(n / p), 2 * p * (p - 1), 2 * (p - 1) * n
        if alg == "linear":
            # A binomial reduce to rank 0 (P-1 messages of n) where the operator
            # is associative, a gather (subtrees forwarded whole) where it is
            # not; then a binomial bcast.
            assoc = s.operator is None or s.operator.associative
            first = "reduce" if assoc else "gather"
            g = _direct("binomial", _Shape(first, n, p, 0, s.operator, False, None), a, b)
            c = _direct("binomial", _Shape("bcast", n, p, 0, None, False, None), a, b)
            return g[0] + c[0], g[1] + c[1], g[2] + c[2]
        pof2 = 1 << (p.bit_length() - 1)
        rem = p - pof2
        rounds = (pof2.bit_length() - 1) + (2 if rem else 0)
        msgs = pof2 * (pof2.bit_length() - 1) + 2 * rem
        return rounds * t(n), msgs, msgs * n
    if op == "allgather":
        return big_l * a + (p - 1) * n * b, p * big_l, p * (p - 1) * n
    if op == "alltoall":
        return (p - 1) * t(n), p * (p - 1), p * (p - 1) * n
    if op == "reduce_scatter":
        return (p - 1) * a + (p - 1) * (n / p) * b, p * (p - 1), (p - 1) * n
    if op in ("scan", "exscan"):
        if alg == "chain":
            return (p - 1) * t(n), p - 1, (p - 1) * n
        msgs = _scan_messages(p)
        return big_l * t(n), msgs, msgs * n
    if op == "barrier":
        return big_l * t(0), p * big_l, 0.0
    raise ArgumentError(f"no collective named {op!r}")


def _folds(family: str, alg: str, s: _Shape) -> tuple[float, float]:
    """Bytes folded by an operator (critical path, whole group) in a collective.

    Every operand a peer folds into its accumulator costs ``n / reduce_bandwidth``
    (the model's gamma).  It separates algorithms that move the same bytes but
    fold different amounts: recursive doubling folds on every peer in every
    round, a reduce to one peer only P - 1 times.
    """
    p, n, op = s.peers, s.nbytes, s.op
    if p == 1 or op not in ("reduce", "allreduce", "reduce_scatter", "scan", "exscan"):
        return 0.0, 0.0
    every = (p - 1) * n  # each peer's operand folded once, somewhere
    associative = s.operator is None or s.operator.associative
    if op == "reduce_scatter" or alg in ("ring", "split"):
        return every / p, every  # parts of n/P, one part per peer
    if family == "mediated":
        if alg == "tree":  # scan over storage: up to two folds per level
            return 2 * _log2ceil(p) * n, 2 * every
        return every, every  # one peer folds everything (fetch_fold, root, chain)
    if alg == "chain" or not associative:
        return every, every
    if op == "allreduce" and alg == "recursive_doubling":
        pof2 = 1 << (p.bit_length() - 1)
        levels = pof2.bit_length() - 1
        extra = 1 if p != pof2 else 0
        return (levels + extra) * n, (pof2 * levels + (p - pof2)) * n
    if op in ("scan", "exscan"):  # recursive doubling: a prefix and a partial per round
        return 2 * _log2ceil(p) * n, 1.5 * _scan_messages(p) * n
    if alg == "linear" and op == "reduce":
        return every, every  # gathered, then folded at the root
    return _log2ceil(p) * n, every  # binomial reduce (also the first half of linear allreduce)


def _add(total: dict[str, float], more: Mapping[str, float], times: float = 1.0) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v * times


def _mediated(
    name: str, m: ChannelModel, alg: str, s: _Shape
) -> tuple[float, dict[str, float], float]:
    """(seconds, requests by kind, bytes moved) of a storage-native algorithm."""
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    req: dict[str, float] = {}
    if p == 1:
        return 0.0, req, 0.0

    def msgs(count: float, size: float) -> None:
        _add(req, message_requests(name, m, size), count)

    def objs(count: float, size: float, readers: int) -> None:
        _add(req, object_requests(name, m, size, readers), count)

    op = s.op
    if op == "bcast":
        objs(1, n, p - 1)
        return m.time(n) + m.shared_time(n, p - 1), req, p * n
    if op == "scatter":
        msgs(p - 1, n)
        return o + (p - 1) * n * b + m.time(n), req, 2 * (p - 1) * n
    if op in ("gather", "reduce"):
        msgs(p - 1, n)
        return m.time(n) + o + (p - 1) * n * b, req, 2 * (p - 1) * n
    if op == "allreduce":
        if alg == "split":
            part = n / p
            msgs(p * (p - 1), part)
            objs(p, part, p - 1)
            secs = 2 * (o + (p - 1) * part * b) + m.time(part) + o + (p - 1) * part * b
            return secs, req, 2 * p * (p - 1) * part + p * p * part
        msgs(p - 1, n)
        objs(1, n, p - 1)
        secs = m.time(n) + o + (p - 1) * n * b + m.time(n) + m.shared_time(n, p - 1)
        return secs, req, 2 * (p - 1) * n + p * n
    if op == "allgather":
        objs(p, n, p - 1)
        return m.time(n) + o + (p - 1) * n * b, req, p * p * n
    if op == "alltoall":
        msgs(p * (p - 1), n)
        return 2 * (o + (p - 1) * n * b), req, 2 * p * (p - 1) * n
    if op == "reduce_scatter":
        msgs(p * (p - 1), n / p)
        return 2 * (o + (p - 1) * (n / p) * b), req, 2 * (p - 1) * n
    if op == "barrier":
        msgs(p - 1, 0)
        objs(1, 0, p - 1)
        return 4 * o, req, 0.0
    if op in ("scan", "exscan"):
        if alg == "chain":
            msgs(p - 1, n)
            return (p - 1) * 2 * m.time(n), req, 2 * (p - 1) * n
        msgs(2 * (p - 1), n)
        return 2 * _log2ceil(p) * 2 * m.time(n), req, 4 * (p - 1) * n
    raise ArgumentError(f"no collective named {op!r}")


def _estimate(
    name: str, kind: str, family: str, alg: str, s: _Shape, models: CostModel
) -> tuple[float, float, dict[str, float]]:
    m = models.channel(name)
    if family == "direct":
        # Over storage, a point-to-point message is a put and a get.
        scale = 2.0 if kind == "mediated" else 1.0
        a, b = scale * m.overhead, scale / m.bandwidth
        secs, count, moved = _direct(alg, s, a, b)
        work = count * a + moved * b
        req: dict[str, float] = {}
        if kind == "mediated":
            _add(req, message_requests(name, m, s.nbytes), count)
        else:
            req["messages"] = count
        calls = sum(req.values())
    else:
        secs, req, moved = _mediated(name, m, alg, s)
        calls = sum(v for k, v in req.items() if not k.endswith("_units"))
        work = calls * m.overhead + moved / m.bandwidth
    gamma = 1.0 / models.reduce_bandwidth
    path_folds, all_folds = _folds(family, alg, s)
    secs += path_folds * gamma
    work += all_folds * gamma
    # However short the critical path, the group cannot do more than
    # `concurrency` pieces of work at once (one event loop: one at a time).
    if math.isfinite(m.concurrency):
        secs = max(secs, work / m.concurrency)
    usd = (
        m.request_cost(req)
        + m.infra_cost(calls)
        + m.transfer_cost(moved)
        + models.faas_cost(secs, s.peers)
    )
    return secs, usd, req


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
    if op not in DIRECT_ALGORITHMS:
        raise ArgumentError(f"no collective named {op!r}; known: {', '.join(OPERATIONS)}")
    shape = _Shape(
        op,
        float(DEFAULT_NBYTES if nbytes is None else nbytes),
        num_peers,
        root,
        operator,
        is_array,
        elements,
    )
    order = {name: i for i, name in enumerate(CHANNEL_ORDER)}
    out: list[Plan] = []
    for name, kind in sorted(channels, key=lambda c: (order.get(c[0], 99), c[0])):
        families = [("direct", DIRECT_ALGORITHMS[op])]
        if kind == "mediated":
            families.append(("mediated", MEDIATED_ALGORITHMS[op]))
        for family, algorithms in families:
            for alg in algorithms:
                if not _valid(family, alg, shape):
                    continue
                secs, usd, req = _estimate(name, kind, family, alg, shape, models)
                out.append(Plan(op, name, family, alg, signature, secs, usd, req))
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
        family, _, name = algorithm.rpartition(":")
        picked = [
            c for c in candidates if c.algorithm == name and (not family or c.family == family)
        ]
        if not picked:
            known = sorted({f"{c.family}:{c.algorithm}" for c in candidates})
            raise ArgumentError(
                f"{op} cannot use algorithm {algorithm!r} here (operator, values or channel do "
                f"not allow it); valid choices: {', '.join(known)}"
            )
        candidates = picked
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


def _q(x: float) -> float:
    """Round to 9 significant digits so that ties are ties on every machine."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, 8 - math.floor(math.log10(abs(x))))
