"""Misuse through fmi_async.compat: every peer raises a specific error, and stays in step.

Each job runs a list of steps on every peer; a bad step is followed by a good
allreduce, which must give the right answer on every peer (the collectives'
sequence stayed aligned).  The peer at fault raises the compat error
(``DatatypeError``, ``LengthMismatchError``, ``UnknownOperatorError``); every
other peer raises ``AbortedError`` naming that peer and that error, or
``PlanMismatchError`` where the peers' declarations disagree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fmi_async.compat as fmi
from fmi_async.errors import OperatorError, RootError
from tests.compat.helpers import (
    fmi_config_file,
    in_threads,
    redis_backend,
    threaded_rendezvous,
)

SLOW = pytest.mark.slow
SIZE = 3
BAD = 1  # the peer at fault
t, d, f, o = fmi.types, fmi.datatypes, fmi.func, fmi.op

Step = Callable[[fmi.Communicator, int], Any]


def bad_value(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD passes a float where an int is declared."""
    return comm.allreduce(1.5 if r == BAD else 1, f(o.sum), t(d.int))


def bad_length(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD passes three elements for a declared length of two."""
    return comm.allreduce([1, 2, 3] if r == BAD else [1, 2], f(o.sum), t(d.int_list, 2))


def bad_list(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD passes a string inside a double_list."""
    value = [1.0, "2"] if r == BAD else [1.0, 2.0]
    return comm.reduce(value, 0, f(o.max), t(d.double_list, 2))


def missing_length(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD declares a list type without its length."""
    return comm.gather([r], 0, t(d.int_list) if r == BAD else t(d.int_list, 1))


def not_a_declaration(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD passes a datatype where its declaration belongs."""
    return comm.scan(r, f(o.sum), d.int if r == BAD else t(d.int))


def unknown_op(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD names an operation by a string, which FMI's op does not have."""
    return comm.allreduce(r, f("sum") if r == BAD else f(o.sum), t(d.int))


def custom_without_function(comm: fmi.Communicator, r: int) -> Any:
    return comm.reduce(r, 0, f(o.custom) if r == BAD else f(o.sum), t(d.int))


def bcast_bad_root_value(comm: fmi.Communicator, r: int) -> Any:
    """The root (BAD) broadcasts a list declared as an int."""
    return comm.bcast([1, 2] if r == BAD else None, BAD, t(d.int))


def lengths_disagree(comm: fmi.Communicator, r: int) -> Any:
    """Every peer's value matches its own declaration, but peer BAD declares length 3."""
    n = 3 if r == BAD else 2
    return comm.allreduce(list(range(n)), f(o.sum), t(d.int_list, n))


def types_disagree(comm: fmi.Communicator, r: int) -> Any:
    """Peer BAD declares a double where the others declare an int."""
    return comm.allreduce(r, f(o.sum), t(d.double) if r == BAD else t(d.int))


def scatter_scalar(comm: fmi.Communicator, r: int) -> Any:
    return comm.scatter([1, 2, 3] if r == 0 else None, 0, t(d.int))


def scatter_indivisible(comm: fmi.Communicator, r: int) -> Any:
    return comm.scatter(list(range(4)) if r == 0 else None, 0, t(d.int_list, 4))


def custom_returns_float(comm: fmi.Communicator, r: int) -> Any:
    """A custom function that returns a float in a reduction of ints."""
    return comm.allreduce(r, f(o.custom, lambda a, b: (a + b) / 2, True, True), t(d.int))


def bad_root(comm: fmi.Communicator, r: int) -> Any:
    return comm.bcast(1, SIZE, t(d.int))


def fault(
    error: type[BaseException], may_finish: tuple[int, ...] = ()
) -> Callable[[int], tuple[str, str]]:
    """Peer BAD raises ``error``; every other peer an AbortedError naming it, except
    that a peer in ``may_finish`` may return: its result does not depend on peer BAD
    (a non-root of a reduce or gather only sends, peer 0 of a scan keeps its own
    value), and its part can end before the abort reaches it."""

    def expect(r: int) -> tuple[str, str]:
        if r == BAD:
            return ("raise", error.__name__)
        return ("aborted or done" if r in may_finish else "aborted", error.__name__)

    return expect


def everyone(error: type[BaseException]) -> Callable[[int], tuple[str, str]]:
    return lambda _r: ("raise", error.__name__)


def disagreement(_r: int) -> tuple[str, str]:
    return ("disagree", "")


CASES: list[tuple[Step, Callable[[int], tuple[str, str]]]] = [
    (bad_value, fault(fmi.DatatypeError)),
    (bad_length, fault(fmi.LengthMismatchError)),
    (bad_list, fault(fmi.DatatypeError, may_finish=(2,))),
    (missing_length, fault(fmi.LengthMismatchError, may_finish=(2,))),
    (not_a_declaration, fault(fmi.DatatypeError, may_finish=(0,))),
    (unknown_op, fault(fmi.UnknownOperatorError)),
    (custom_without_function, fault(fmi.UnknownOperatorError, may_finish=(2,))),
    (bcast_bad_root_value, fault(fmi.DatatypeError)),
    (lengths_disagree, disagreement),
    (types_disagree, disagreement),
    (scatter_scalar, everyone(fmi.DatatypeError)),
    (scatter_indivisible, everyone(fmi.LengthMismatchError)),
    (custom_returns_float, disagreement),
    (bad_root, everyone(RootError)),
]


Case = tuple[Step, Callable[[int], tuple[str, str]]]

STORAGE_CASES = [CASES[0], CASES[5], CASES[8]]
"""The cases the default run plays on Redis (a bad value, an unknown operator, a
disagreement): a storage peer learns of an abort at its next look, about half a
second, so all of them take seconds there; ``--slow`` plays them all."""


def play(comm: fmi.Communicator, rank: int, cases: list[Case]) -> list[tuple[Any, Any]]:
    """Every case then a good allreduce: (the case's error or result, the allreduce's)."""
    out = []
    for step, _ in cases:
        try:
            outcome: Any = step(comm, rank)
        except Exception as exc:
            outcome = exc
        good = comm.allreduce([rank, 1], f(o.sum), t(d.int_list, 2))
        out.append((outcome, good))
    return out


def check(outcomes: list[list[tuple[Any, Any]]], cases: list[Case]) -> None:
    for index, (step, expect) in enumerate(cases):
        for rank in range(SIZE):
            got, good = outcomes[rank][index]
            where = f"{step.__name__}, peer {rank}: {got!r}"
            assert good == [sum(range(SIZE)), SIZE], f"{where}: out of step after it"
            kind, name = expect(rank)
            if kind == "aborted or done" and not isinstance(got, fmi.FMIError):
                continue
            assert isinstance(got, fmi.FMIError), where
            if kind == "raise":
                assert type(got).__name__ == name, where
            elif kind.startswith("aborted"):
                assert isinstance(got, fmi.AbortedError), where
                assert (got.peer, got.cause) == (BAD, name), where
            else:  # peers that disagree on the declaration, or on a result's type
                assert isinstance(got, (fmi.PlanMismatchError, fmi.AbortedError, OperatorError))
                assert not isinstance(got, fmi.AbortedError) or got.peer != rank, where


@pytest.mark.parametrize(
    "cases", [pytest.param(STORAGE_CASES, id="some"), pytest.param(CASES, id="all", marks=SLOW)]
)
def test_misuse_redis(cases: list[Case], redis_server: tuple[str, int], tmp_path: Path) -> None:
    config = fmi_config_file(tmp_path, Redis=redis_backend(redis_server))
    run = uuid.uuid4().hex[:12]

    def peer(rank: int) -> list[tuple[Any, Any]]:
        with fmi.Communicator(rank, SIZE, str(config), "Misuse", run_id=run) as comm:
            return play(comm, rank, cases)

    check(in_threads(SIZE, peer), cases)


def test_misuse_direct(tmp_path: Path) -> None:
    with threaded_rendezvous() as (host, port):
        config = fmi_config_file(tmp_path, Direct={"enabled": True, "host": host, "port": port})
        run = uuid.uuid4().hex[:12]

        def peer(rank: int) -> list[tuple[Any, Any]]:
            with fmi.Communicator(rank, SIZE, str(config), "Misuse", run_id=run) as comm:
                return play(comm, rank, CASES)

        check(in_threads(SIZE, peer), CASES)


@pytest.mark.parametrize(
    ("value", "sent_as", "declared", "error"),
    [
        (42, t(d.int), t(d.double_list, 2), fmi.DatatypeError),
        ([1, 2, 3], t(d.int_list, 3), t(d.int_list, 2), fmi.LengthMismatchError),
        ([1.5, 2.5], t(d.double_list, 2), t(d.int_list, 2), fmi.DatatypeError),
        (7, t(d.int), t(d.int), None),
    ],
)
def test_recv_checks_what_arrived(
    value: Any,
    sent_as: Any,
    declared: Any,
    error: type[Exception] | None,
    tmp_path: Path,
    redis_server: tuple[str, int],
) -> None:
    """A receiver declares what it expects; a value sent with another declaration raises
    there (the sender's send completed: FMI's send and recv have no way to tell it)."""
    config = fmi_config_file(tmp_path, Redis=redis_backend(redis_server))
    run = uuid.uuid4().hex[:12]

    def peer(rank: int) -> Any:
        with fmi.Communicator(rank, 2, str(config), "Recv", run_id=run, timeout=10) as comm:
            if rank == 0:
                return comm.send(value, 1, sent_as)
            try:
                return comm.recv(0, declared)
            except fmi.FMIError as exc:
                return exc

    _, got = in_threads(2, peer)
    if error is None:
        assert got == value
    else:
        assert type(got) is error, got
