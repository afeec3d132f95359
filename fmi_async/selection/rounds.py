"""Round structures: what a collective algorithm costs on a channel.

:func:`estimate` predicts the seconds, dollars and requests of one
registered algorithm (:mod:`fmi_async.collectives.registry`) on one channel
from its *cost tag* and the channel's model
(:mod:`fmi_async.selection.model`); :func:`fmi_async.selection.plan.plan`
compares the estimates.  A formula is looked up by the tag, so an algorithm
shaped like an existing one reuses its formula by naming its tag, and a new
shape adds one function to :data:`DIRECT_COSTS` or :data:`MEDIATED_COSTS`.

Round structures (``L = ceil(log2 P)``, ``t(n) = overhead + n / bandwidth``;
a point-to-point message over storage is a put and a get, ``2 t(n)``):

============== ================== ==========================================
op             cost tag           predicted seconds
============== ================== ==========================================
bcast          binomial           L t(n)
reduce         binomial           L t(n)  (+ t(n) to a non-zero root, non-commutative)
allreduce      recursive_doubling (log2 P' + 2[P != P']) t(n), P' = 2^floor(log2 P)
allreduce      ring               2 (P-1) t(n / P)
allreduce      ring_pipelined     2 (P-1) (K o + n/P / b), K = ceil(n/P / segment)
allreduce      linear             reduce (or gather, non-associative) + bcast
gather/scatter binomial           L o + (P-1) n / b
allgather      bruck              L o + (P-1) n / b
alltoall       pairwise           (P-1) t(n)
reduce_scatter pairwise           (P-1) o + (P-1) (n/P) / b
scan/exscan    recursive_doubling L t(n);   chain: (P-1) t(n)
barrier        dissemination      L t(0)
bcast          put_get (storage)  put(n) + get(n) shared by P-1 readers
gather/reduce  fetch (storage)    put(n) + o + (P-1) n / b + F(P-1)
allreduce      root               gather + put + shared get: 4 o + F(P-1) + bytes
allreduce      split              exchange of parts n/P (F(2(P-1))), put, get of
                                  P-1 parts (F(P-1)): 4 o + F(2(P-1)) + F(P-1) + bytes
============== ================== ==========================================

``F(k) = (k - 1) request_gap`` is a peer's fan-out: the last of ``k``
requests one peer issues at once is answered that much after a single one
(the client's own CPU per request, which its concurrent requests do not
overlap).  Storage-native formulas charge it to the peer with the widest
fan-out of each round: it is why the split allreduce, whose peers each make
3(P-1)+1 requests, loses to the root allreduce (at most P on one peer) for
small arrays although both take four request times.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..collectives import registry as algorithms
from ..collectives.pipelined import SEGMENT_BYTES, segments
from ..collectives.registry import Algorithm
from ..errors import ArgumentError
from ..ops import Op
from .model import ChannelModel, CostModel, message_requests, object_requests

__all__ = [
    "DIRECT_COSTS",
    "MEDIATED_COSTS",
    "Shape",
    "direct_rounds",
    "estimate",
    "folds",
    "mediated_rounds",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Shape:
    """What an estimate needs to know about the call (and the registry's needs check)."""

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


# Cost formulas, keyed by an algorithm's cost tag (Algorithm.cost in the
# registry).  A direct formula gets the call and the price of one message,
# ``a + n b``, and returns (seconds, messages, bytes); every formula handles
# the collectives whose algorithms carry its tag and refuses the others.
Direct = Callable[[Shape, float, float], tuple[float, float, float]]


def _no_formula(tag: str, s: Shape) -> ArgumentError:
    return ArgumentError(f"cost formula {tag!r} does not describe {s.op}")


def _binomial(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n, big_l = s.peers, s.nbytes, _log2ceil(s.peers)
    if s.op == "bcast":
        return big_l * (a + n * b), p - 1, (p - 1) * n
    if s.op in ("gather", "scatter"):  # subtrees forwarded whole
        hops = sum(bin(v).count("1") for v in range(1, p))
        return big_l * a + (p - 1) * n * b, p - 1, hops * n
    if s.op == "reduce":
        extra = 0 if (s.operator is not None and s.operator.commutative) or s.root == 0 else 1
        return (big_l + extra) * (a + n * b), p - 1 + extra, (p - 1 + extra) * n
    raise _no_formula("binomial", s)


def _linear(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    if s.op == "reduce":  # a binomial gather, folded at the root
        return _binomial(replace(s, op="gather"), a, b)
    if s.op != "allreduce":
        raise _no_formula("linear", s)
    # A binomial reduce to rank 0 (P-1 messages of n) where the operator is
    # associative, a gather (subtrees forwarded whole) where it is not; then a
    # binomial bcast.
    p, n = s.peers, s.nbytes
    first = "reduce" if s.operator is None or s.operator.associative else "gather"
    g = _binomial(Shape(first, n, p, 0, s.operator, False, None), a, b)
    c = _binomial(Shape("bcast", n, p, 0, None, False, None), a, b)
    return g[0] + c[0], g[1] + c[1], g[2] + c[2]


def _recursive_doubling(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n = s.peers, s.nbytes
    if s.op == "allreduce":
        pof2 = 1 << (p.bit_length() - 1)
        rem = p - pof2
        rounds = (pof2.bit_length() - 1) + (2 if rem else 0)
        msgs = pof2 * (pof2.bit_length() - 1) + 2 * rem
        return rounds * (a + n * b), msgs, msgs * n
    if s.op in ("scan", "exscan"):
        msgs = _scan_messages(p)
        return _log2ceil(p) * (a + n * b), msgs, msgs * n
    raise _no_formula("recursive_doubling", s)


def _ring(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n = s.peers, s.nbytes
    if s.op != "allreduce":
        raise _no_formula("ring", s)
    return 2 * (p - 1) * (a + n / p * b), 2 * p * (p - 1), 2 * (p - 1) * n


def _ring_pipelined(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    """The ring in K segments per step: K messages per step; its folds overlap
    the transfers (:func:`folds` charges only what a pipeline cannot hide)."""
    p, n = s.peers, s.nbytes
    if s.op != "allreduce":
        raise _no_formula("ring_pipelined", s)
    k = segments(n, p)
    return 2 * (p - 1) * (k * a + n / p * b), 2 * p * (p - 1) * k, 2 * (p - 1) * n


def _bruck(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n, big_l = s.peers, s.nbytes, _log2ceil(s.peers)
    if s.op != "allgather":
        raise _no_formula("bruck", s)
    return big_l * a + (p - 1) * n * b, p * big_l, p * (p - 1) * n


def _pairwise(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n = s.peers, s.nbytes
    if s.op == "alltoall":
        return (p - 1) * (a + n * b), p * (p - 1), p * (p - 1) * n
    if s.op == "reduce_scatter":
        return (p - 1) * a + (p - 1) * (n / p) * b, p * (p - 1), (p - 1) * n
    raise _no_formula("pairwise", s)


def _chain(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    p, n = s.peers, s.nbytes
    if s.op not in ("scan", "exscan"):
        raise _no_formula("chain", s)
    return (p - 1) * (a + n * b), p - 1, (p - 1) * n


def _dissemination(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    if s.op != "barrier":
        raise _no_formula("dissemination", s)
    big_l = _log2ceil(s.peers)
    return big_l * (a + 0 * b), s.peers * big_l, 0.0


DIRECT_COSTS: dict[str, Direct] = {
    "binomial": _binomial,
    "linear": _linear,
    "recursive_doubling": _recursive_doubling,
    "ring": _ring,
    "ring_pipelined": _ring_pipelined,
    "bruck": _bruck,
    "pairwise": _pairwise,
    "chain": _chain,
    "dissemination": _dissemination,
}


def direct_rounds(cost: str, s: Shape, a: float, b: float) -> tuple[float, float, float]:
    """(seconds, messages, bytes) of a direct algorithm by its cost tag; a message costs a + n b."""
    if s.peers == 1:
        return 0.0, 0.0, 0.0
    return DIRECT_COSTS[cost](s, a, b)


def native_rounds(s: Shape, a: float, b: float) -> tuple[float, float, float]:
    """(seconds, messages, bytes) of an MPI library's own collective.

    MPI chooses its algorithm by size and group itself; it is estimated as
    the best of the library's round structures for the call (the fastest
    direct algorithm that could run it).
    """
    entries = algorithms.algorithms("direct", s.op)
    usable = [entry for entry in entries if entry.allows(s)] or list(entries)
    return min(direct_rounds(entry.cost, s, a, b) for entry in usable)


def folds(family: str, cost: str, s: Shape) -> tuple[float, float]:
    """Bytes folded by an operator (critical path, whole group) in a collective,
    by the algorithm's family and cost tag.

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
    if op == "reduce_scatter" or cost in ("ring", "split"):
        return every / p, every  # parts of n/P, one part per peer
    if cost == "ring_pipelined":  # only each step's last segment waits for its fold
        return (p - 1) * min(float(SEGMENT_BYTES), n / p), every
    if family == "mediated":
        if cost == "tree":  # scan over storage: up to two folds per level
            return 2 * _log2ceil(p) * n, 2 * every
        return every, every  # one peer folds everything (fetch_fold, root, chain)
    if cost == "chain" or not associative:
        return every, every
    if op == "allreduce" and cost == "recursive_doubling":
        pof2 = 1 << (p.bit_length() - 1)
        levels = pof2.bit_length() - 1
        extra = 1 if p != pof2 else 0
        return (levels + extra) * n, (pof2 * levels + (p - pof2)) * n
    if op in ("scan", "exscan"):  # recursive doubling: a prefix and a partial per round
        return 2 * _log2ceil(p) * n, 1.5 * _scan_messages(p) * n
    if cost == "linear" and op == "reduce":
        return every, every  # gathered, then folded at the root
    return _log2ceil(p) * n, every  # binomial reduce (also the first half of linear allreduce)


def _add(total: dict[str, float], more: Mapping[str, float], times: float = 1.0) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v * times


class _Tally:
    """The requests a storage-native algorithm makes, by kind."""

    def __init__(self, name: str, m: ChannelModel) -> None:
        self.name, self.m = name, m
        self.req: dict[str, float] = {}

    def msgs(self, count: float, size: float) -> None:
        """``count`` point-to-point messages of ``size`` bytes (stored, read once)."""
        _add(self.req, message_requests(self.name, self.m, size), count)

    def objs(self, count: float, size: float, readers: int) -> None:
        """``count`` objects of ``size`` bytes, each stored once and read by ``readers``."""
        _add(self.req, object_requests(self.name, self.m, size, readers), count)


# A mediated formula gets the call, the channel's model and a tally of its
# requests; it returns (seconds, bytes moved).
Mediated = Callable[[Shape, ChannelModel, _Tally], tuple[float, float]]


def _put_get(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    if s.op == "bcast":
        t.objs(1, n, p - 1)
        return m.time(n) + m.shared_time(n, p - 1), p * n
    if s.op == "allgather":
        t.objs(p, n, p - 1)
        return m.time(n) + o + m.fan_out(p - 1) + (p - 1) * n * b, p * p * n
    raise _no_formula("put_get", s)


def _store(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    if s.op == "scatter":
        t.msgs(p - 1, n)
        return o + m.fan_out(p - 1) + (p - 1) * n * b + m.time(n), 2 * (p - 1) * n
    if s.op == "alltoall":  # every peer's P-1 puts and P-1 gets at once
        t.msgs(p * (p - 1), n)
        return 2 * (o + (p - 1) * n * b) + m.fan_out(2 * (p - 1)), 2 * p * (p - 1) * n
    raise _no_formula("store", s)


def _fetch(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    if s.op not in ("gather", "reduce"):
        raise _no_formula("fetch", s)
    t.msgs(p - 1, n)
    return m.time(n) + o + m.fan_out(p - 1) + (p - 1) * n * b, 2 * (p - 1) * n


def _fetch_fold(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    if s.op == "reduce_scatter":
        t.msgs(p * (p - 1), n / p)
        return 2 * (o + (p - 1) * (n / p) * b) + m.fan_out(2 * (p - 1)), 2 * (p - 1) * n
    return _fetch(s, m, t)


def _root(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n, o, b = s.peers, s.nbytes, m.overhead, 1.0 / m.bandwidth
    if s.op != "allreduce":
        raise _no_formula("root", s)
    t.msgs(p - 1, n)
    t.objs(1, n, p - 1)
    # Rank 0 fetches the P-1 values at once (its fan-out), stores the result once.
    secs = m.time(n) + o + m.fan_out(p - 1) + (p - 1) * n * b + m.time(n) + m.shared_time(n, p - 1)
    return secs, 2 * (p - 1) * n + p * n


def _split(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, o, b = s.peers, m.overhead, 1.0 / m.bandwidth
    if s.op != "allreduce":
        raise _no_formula("split", s)
    part = s.nbytes / p
    t.msgs(p * (p - 1), part)
    t.objs(p, part, p - 1)
    # Every peer sends P-1 parts and receives P-1 at once, then reads P-1
    # reduced parts at once: two fan-outs on every peer.
    exchange = 2 * (o + (p - 1) * part * b) + m.fan_out(2 * (p - 1))
    secs = exchange + m.time(part) + o + m.fan_out(p - 1) + (p - 1) * part * b
    return secs, 2 * p * (p - 1) * part + p * p * part


def _gather_release(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    if s.op != "barrier":
        raise _no_formula("gather_release", s)
    t.msgs(s.peers - 1, 0)
    t.objs(1, 0, s.peers - 1)
    return 4 * m.overhead + m.fan_out(s.peers - 1), 0.0


def _tree(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n = s.peers, s.nbytes
    if s.op not in ("scan", "exscan"):
        raise _no_formula("tree", s)
    t.msgs(2 * (p - 1), n)
    return 2 * _log2ceil(p) * 2 * m.time(n), 4 * (p - 1) * n


def _stored_chain(s: Shape, m: ChannelModel, t: _Tally) -> tuple[float, float]:
    p, n = s.peers, s.nbytes
    if s.op not in ("scan", "exscan"):
        raise _no_formula("chain", s)
    t.msgs(p - 1, n)
    return (p - 1) * 2 * m.time(n), 2 * (p - 1) * n


MEDIATED_COSTS: dict[str, Mediated] = {
    "put_get": _put_get,
    "store": _store,
    "fetch": _fetch,
    "fetch_fold": _fetch_fold,
    "root": _root,
    "split": _split,
    "gather_release": _gather_release,
    "tree": _tree,
    "chain": _stored_chain,
}


def mediated_rounds(
    name: str, m: ChannelModel, cost: str, s: Shape
) -> tuple[float, dict[str, float], float]:
    """(seconds, requests by kind, bytes moved) of a storage-native algorithm by its cost tag."""
    tally = _Tally(name, m)
    if s.peers == 1:
        return 0.0, tally.req, 0.0
    secs, moved = MEDIATED_COSTS[cost](s, m, tally)
    return secs, tally.req, moved


def estimate(
    name: str, kind: str, entry: Algorithm, s: Shape, models: CostModel
) -> tuple[float, float, dict[str, float]]:
    """(seconds, dollars, requests by kind) of algorithm ``entry`` on channel ``name``.

    ``kind`` is the channel's kind: a direct algorithm over a storage channel
    pays a put and a get per message.  Raises :class:`KeyError` for a cost tag
    without a formula (a registry entry naming a formula that does not exist).
    """
    m = models.channel(name)
    family = entry.family
    if family in ("direct", "mpi"):
        # Over storage, a point-to-point message is a put and a get.
        scale = 2.0 if kind == "mediated" else 1.0
        a, b = scale * m.overhead, scale / m.bandwidth
        if family == "mpi":
            secs, count, moved = native_rounds(s, a, b)
        else:
            secs, count, moved = direct_rounds(entry.cost, s, a, b)
        req: dict[str, float] = {}
        if kind == "mediated":
            _add(req, message_requests(name, m, s.nbytes), count)
            calls = sum(v for k, v in req.items() if not k.endswith("_units"))
            # Every request a message makes is work (the reader's delete too),
            # counted as the storage-native family counts it.
            work = calls * m.overhead + moved * b
        else:
            req["messages"] = count
            calls = count
            work = count * a + moved * b
    else:
        secs, req, moved = mediated_rounds(name, m, entry.cost, s)
        calls = sum(v for k, v in req.items() if not k.endswith("_units"))
        work = calls * m.overhead + moved / m.bandwidth
    gamma = 1.0 / models.reduce_bandwidth
    # MPI folds built-in operators in C, at memory speed: not charged.
    path_folds, all_folds = (0.0, 0.0) if family == "mpi" else folds(family, entry.cost, s)
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
