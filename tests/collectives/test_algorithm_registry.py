"""The algorithm registry is the one list of algorithms: every registered
algorithm runs through the communicator's public call, plan() offers exactly
the registered ones, and an unknown name's error lists them."""

from __future__ import annotations

import ast
import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.collectives import registry
from fmi_async.collectives.base import CollectiveContext
from fmi_async.collectives.registry import Algorithm, Need
from fmi_async.config import Config
from fmi_async.selection import plan as planmod
from fmi_async.selection import rounds
from fmi_async.selection.model import load_cost_model
from tests.helpers import storage_group
from tests.reference import ARR_MINUS, assert_same, reference_fold

MODELS = load_cost_model({})  # the default models
SIZE = 3  # not a power of two: the folded steps of the tree algorithms run too
ROOT = 1
ENTRIES = [
    a for op in registry.COLLECTIVES for f in registry.FAMILIES for a in registry.algorithms(f, op)
]

pytestmark = pytest.mark.timeout(120)


def _operator(entry: Algorithm) -> fmi.Op:
    return ARR_MINUS if Need.NON_ASSOCIATIVE in entry.needs else fmi.SUM


def _value(rank: int) -> np.ndarray:
    return np.arange(2 * SIZE, dtype=np.int64) * (rank + 1) + rank


def _call(entry: Algorithm, c: fmi.Communicator) -> Any:
    """The public call of ``entry``'s collective on peer ``c``, forcing ``entry``."""
    kw: dict[str, Any] = {"algorithm": entry.qualified}
    op, mine = entry.collective, _value(c.rank)
    if "op" in entry.args:
        kw["op"] = _operator(entry)
    if op in ("bcast", "scatter"):
        given = mine if op == "bcast" else [_value(r) for r in range(SIZE)]
        return getattr(c, op)(given if c.rank == ROOT else None, root=ROOT, **kw)
    if op in ("reduce", "gather"):
        return getattr(c, op)(mine, root=ROOT, **kw)
    if op == "alltoall":
        return c.alltoall([f"{c.rank}->{j}" for j in range(SIZE)], **kw)
    if op == "barrier":
        return c.barrier(**kw)
    return getattr(c, op)(mine, **kw)


def _expected(entry: Algorithm, rank: int) -> Any:
    values = [_value(r) for r in range(SIZE)]
    oper = _operator(entry)
    op = entry.collective
    if op == "bcast":
        return values[ROOT]
    if op == "scatter":
        return values[rank]
    if op == "gather":
        return values if rank == ROOT else None
    if op == "reduce":
        return reference_fold(oper, values) if rank == ROOT else None
    if op == "allreduce":
        return reference_fold(oper, values)
    if op == "allgather":
        return values
    if op == "alltoall":
        return [f"{src}->{rank}" for src in range(SIZE)]
    if op == "reduce_scatter":
        return np.array_split(reference_fold(oper, values), SIZE)[rank]
    if op == "scan":
        return reference_fold(oper, values[: rank + 1])
    if op == "exscan":
        return None if rank == 0 else reference_fold(oper, values[:rank])
    assert op == "barrier", op
    return None


async def _run_every(comms: list[fmi.Communicator], family: str, channel: str) -> None:
    entries = [e for e in ENTRIES if e.family == family]
    assert entries
    for entry in entries:
        got = await asyncio.gather(*(_call(entry, c) for c in comms))
        for rank, g in enumerate(got):
            want = _expected(entry, rank)
            if isinstance(want, list):
                assert isinstance(g, list) and len(g) == len(want), (entry, rank, g)
                for x, y in zip(g, want, strict=True):
                    assert_same(x, y, f"{entry.qualified} {entry.collective} rank {rank}")
            else:
                assert_same(g, want, f"{entry.qualified} {entry.collective} rank {rank}")
    ran = comms[0].stats()["collectives"]
    for entry in entries:
        assert ran[f"{entry.collective}/{channel}/{entry.qualified}"] == 1, (entry, ran)


async def test_every_direct_algorithm_runs_through_the_communicator() -> None:
    async with fmi.local_peers(SIZE, timeout=20) as comms:
        await _run_every(comms, "direct", "memory")


async def test_every_mediated_algorithm_runs_through_the_communicator(
    redis_config: Config,
) -> None:
    async with storage_group(redis_config)(SIZE, timeout=20) as comms:
        await _run_every(comms, "mediated", "redis")


def test_plan_offers_exactly_the_registered_algorithms() -> None:
    """Over calls that meet every need some algorithm has, plan() offers each
    registered algorithm and nothing else."""
    operators = [None, fmi.SUM, ARR_MINUS, fmi.Op(lambda a, b: a, commutative=False)]
    for op in registry.COLLECTIVES:
        offered: set[str] = set()
        for operator, is_array in itertools.product(operators, (False, True)):
            for p in planmod.plans(
                op,
                nbytes=1 << 20,
                num_peers=4,
                channels=[("memory", "direct"), ("mpi", "direct"), ("redis", "mediated")],
                models=MODELS,
                operator=operator,
                is_array=is_array,
                elements=1 << 17,
            ):
                offered.add(f"{p.family}:{p.algorithm}")
        assert offered == set(registry.known(op)), op
    assert planmod.OPERATIONS == tuple(registry.COLLECTIVES)


def test_every_cost_tag_has_a_formula() -> None:
    for entry in ENTRIES:
        if entry.family == "mpi":  # estimated as the best direct shape: rounds.native_rounds
            continue
        assert entry.cost in rounds.DIRECT_COSTS or entry.family == "mediated", entry
        if entry.family == "mediated":
            assert entry.cost in rounds.MEDIATED_COSTS, entry


def test_unknown_algorithm_names_list_the_registered_ones() -> None:
    kw: dict[str, Any] = {
        "nbytes": 64,
        "num_peers": 4,
        "channels": [("memory", "direct"), ("redis", "mediated")],
        "models": MODELS,
        "operator": fmi.SUM,
    }
    for op in registry.COLLECTIVES:
        with pytest.raises(fmi.ArgumentError) as info:
            planmod.plan(op, algorithm="telepathy", **kw)
        message = str(info.value)
        assert "telepathy" in message and "known:" in message
        for name in registry.known(op):
            assert name in message, (op, message)
    # A registered name under the wrong family is unknown too.
    with pytest.raises(fmi.ArgumentError, match="known: direct:binomial, mediated:put_get"):
        planmod.plan("bcast", algorithm="mediated:binomial", **kw)
    # A registered algorithm that cannot run the call says what it needs.
    with pytest.raises(fmi.ArgumentError, match=r"it needs a numpy array.*valid choices"):
        planmod.plan("allreduce", algorithm="ring", **kw)
    with pytest.raises(fmi.ArgumentError, match="direct:ring"):
        registry.get("direct", "allreduce", "telepathy")
    with pytest.raises(fmi.ArgumentError, match="no collective named"):
        registry.get("direct", "broadcast", "binomial")


async def test_unknown_algorithm_through_the_communicator_lists_the_registered_ones() -> None:
    async with fmi.local_peers(1, timeout=5) as (comm,):
        with pytest.raises(fmi.ArgumentError) as info:
            await comm.allreduce(1, algorithm="telepathy")
        for name in registry.known("allreduce"):
            assert name in str(info.value)


def test_registration_checks_its_declaration() -> None:
    async def wrong_args(ctx: CollectiveContext, value: Any) -> Any:
        return value

    async def bcast_again(ctx: CollectiveContext, value: Any, root: int) -> Any:
        return value

    with pytest.raises(ValueError, match=r"takes \['value'\].*\['value', 'op'\]"):
        registry.algorithm("direct", "allreduce", "wrong")(wrong_args)
    with pytest.raises(ValueError, match="registered twice"):
        registry.algorithm("direct", "bcast", "binomial")(bcast_again)
    with pytest.raises(ValueError, match="unknown collective"):
        registry.algorithm("direct", "broadcast", "x")
    with pytest.raises(ValueError, match="unknown algorithm family"):
        registry.algorithm("nearby", "bcast", "x")  # type: ignore[arg-type]
    assert [a.name for a in registry.algorithms("direct", "allreduce")] == [
        "recursive_doubling",
        "ring",
        "linear",
        "ring_pipelined",
    ]


def test_the_collectives_import_nothing_above_them() -> None:
    """collectives/ (the registry included) never imports selection, the
    communicator or the tools: the planner reads the registry, not the reverse."""
    package = Path(fmi.__file__).parent / "collectives"
    above = ("selection", "communicator", "tools", "cli", "runner", "local")
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                assert not any(p in above for p in parts), (path.name, name)


def test_the_mpi_channel_runs_mpis_own_collectives_where_they_apply() -> None:
    """On the mpi channel the planner picks the mpi family for arrays with built-in
    operators and for moving values, and the library's own algorithms for user
    operators; other channels are never offered the mpi family."""
    channels = [("mpi", "direct"), ("tcp", "direct")]
    for op in registry.COLLECTIVES:
        native = {a.name for a in registry.algorithms("mpi", op)}
        for operator, is_array in itertools.product([None, fmi.SUM, ARR_MINUS], (False, True)):
            chosen = planmod.plan(
                op,
                nbytes=1 << 10,
                num_peers=4,
                channels=channels,
                models=MODELS,
                operator=operator,
                is_array=is_array,
                elements=1 << 7,
            )
            assert chosen.channel == "mpi", (op, chosen)
            entry = registry.get("mpi", op, "native") if native else None
            if entry is not None and entry.allows(
                planmod.Shape(op, 1024.0, 4, 0, operator, is_array, 1 << 7)
            ):
                assert chosen.family == "mpi", (op, operator, is_array, chosen)
            else:
                assert chosen.family == "direct", (op, operator, is_array, chosen)
        for p in planmod.plans(
            op, nbytes=8, num_peers=4, channels=[("tcp", "direct")], models=MODELS
        ):
            assert p.family != "mpi"
