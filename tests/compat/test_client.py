"""FMI's own Python test client (spcl/fmi python/tests/client.py) through fmi_async.compat.

The cases run at P = 2 and 4: over the direct channel (TCP) with every peer
its own process, started as FMI starts them (``python client.py NUM_NODES
NODE_ID CONFIG``) against a rendezvous server in the test, once under ``fmi
run`` with FMI's config file unchanged, and with every peer in its own thread
of this process; over Redis in threads.  Every result is checked against a
reference computed here.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

import fmi_async.compat as fmi
from tests.compat.fmi_client import custom, run_cases
from tests.compat.helpers import (
    CLIENT,
    bracketings,
    fmi_config_file,
    in_threads,
    one_of,
    redis_backend,
    rendezvous,
    results_of,
    run_processes,
    threaded_rendezvous,
)
from tests.example_runs import fmi_run
from tests.helpers import REPO


def expected(r: int, p: int) -> dict[str, Any]:
    """Peer ``r``'s results of every case whose result does not depend on the order
    of evaluation (FMI's custom operator is checked by :func:`check`)."""
    root, s = r == 0, r - 1
    out: dict[str, Any] = {}
    if r % 2 == 1:
        out |= {
            "recv_int": 42 + s,
            "recv_double": 14.2 + s,
            "recv_int_list": [1 + s, 2 + s],
            "recv_double_list": [1.32 + s, 2.34],
        }
    ranks = range(p)
    out |= {
        "bcast_int": 42,
        "bcast_double": 14.2,
        "bcast_int_list": [1, 2],
        "bcast_double_list": [1.32, 2.34],
        # FMI: the concatenation on the root, an empty list elsewhere
        "gather_int": [k + 1 for k in ranks] if root else [],
        "gather_double": [14.5 + 28 * k for k in ranks] if root else [],
        "gather_int_list": [v for k in ranks for v in (2 * k + 1, 2 * k + 2)] if root else [],
        "gather_double_list": (
            [round(v + 2 * k, 2) for k in ranks for v in (1.32, 2.34)] if root else []
        ),
        "scatter_int_list": [14 + 28 * r],
        "scatter_double_list": [round(2 * r + 1.3, 1), round(2 * r + 2.3, 1)],
        # FMI: non-roots keep their receive buffer: n zeros for a list, nothing for a scalar
        "reduce_sum_int": 42 * p if root else None,
        "reduce_prod_double": 14.0**p if root else None,
        "reduce_max_int": 42 + p - 1 if root else None,
        "reduce_min_double": 41.0 if root else None,
        "reduce_sum_int_list": [42 * p, 14 * p] if root else [0, 0],
        "reduce_prod_int_list": [42**p, 14**p] if root else [0, 0],
        "reduce_max_double_list": [43.5, 13.5] if root else [0.0, 0.0],
        "reduce_min_double_list": [41.5, 15.5] if root else [0.0, 0.0],
        "allreduce_sum_int": 42 * p,
        "allreduce_prod_double": 14.0**p,
        "allreduce_max_int": 42,
        "allreduce_min_double": 41.0,
        "allreduce_sum_int_list": [42 * p, 14 * p],
        "scan_sum_int": 42 * (r + 1),
        "scan_prod_double": 14.0 ** (r + 1),
        "scan_max_int": 42,
        "scan_min_double": 41.0,
        "scan_sum_int_list": [42 * (r + 1), 14 * (r + 1)],
        "allreduce_sum_ranks": [sum(ranks), 10 * sum(ranks), -sum(ranks)],
        "allreduce_max_ranks": [(p - 1) * 0.5, 0.0],
        "allreduce_digits": int("".join(str(k + 1) for k in ranks)),
        "scan_digits": int("".join(str(k + 1) for k in range(r + 1))),
        "scan_sum_ranks": [sum(range(r + 1)), r + 1],
        "reduce_sum_ranks_root_last": p * (p + 1) // 2 if r == p - 1 else None,
        "bcast_root_last": [7.5, -1.0, 2.0],
    }
    return out


def check(results: list[dict[str, Any]]) -> None:
    """Every peer's results against the reference."""
    p = len(results)
    for r, got in enumerate(results):
        want = expected(r, p)
        plain = {k: v for k, v in got.items() if "custom" not in k}
        assert plain == want, f"peer {r} of {p}"
        # FMI's custom operator 2a + 2b is declared commutative and associative but is
        # not associative: any grouping is a right answer (all agree at P = 2).
        root = r == 0
        ints, doubles = [42] * p, [0.1 * (k + 1) for k in range(p)]
        assert (
            one_of(got["reduce_custom_int"], bracketings(custom, ints))
            if root
            else (got["reduce_custom_int"] is None)
        )
        assert (
            one_of(got["reduce_custom_double"], bracketings(custom, doubles))
            if root
            else (got["reduce_custom_double"] is None)
        )
        if root:
            first, second = got["reduce_custom_int_list"]
            assert one_of(first, bracketings(custom, ints))
            assert one_of(second, bracketings(custom, [14] * p))
        else:
            assert got["reduce_custom_int_list"] == [0, 0]
        assert one_of(got["allreduce_custom_int"], bracketings(custom, ints))
        assert one_of(got["allreduce_custom_double"], bracketings(custom, [0.1] * p))
        assert one_of(got["scan_custom_int"], bracketings(custom, [42] * (r + 1)))
        assert one_of(got["scan_custom_double"], bracketings(custom, [0.1] * (r + 1)))
        for key in ("allreduce_custom_int", "allreduce_custom_double"):
            assert got[key] == results[0][key], f"{key}: peers disagree"
        if p == 2:  # one grouping only: FMI's exact values
            assert got["allreduce_custom_int"] == 168
            assert got["scan_custom_double"] == (0.1 if r == 0 else 2 * 0.1 + 2 * 0.1)


def test_reference_matches_fmi_client_at_two_peers() -> None:
    """The reference holds FMI's client's own values at P = 2 (node 0 and node 1)."""
    zero, one = expected(0, 2), expected(1, 2)
    assert one["recv_int"] == 42 and one["recv_double"] == 14.2
    assert one["recv_int_list"] == [1, 2] and one["recv_double_list"] == [1.32, 2.34]
    assert zero["gather_double"] == [14.5, 42.5]
    assert zero["gather_int_list"] == [1, 2, 3, 4]
    assert zero["gather_double_list"] == [1.32, 2.34, 3.32, 4.34]
    assert zero["scatter_int_list"] == [14] and one["scatter_int_list"] == [42]
    assert zero["scatter_double_list"] == [1.3, 2.3] and one["scatter_double_list"] == [3.3, 4.3]
    assert zero["reduce_max_int"] == 43  # node 0 passes 42, node 1 passes 43


@pytest.mark.parametrize("size", [2, pytest.param(4, marks=pytest.mark.slow)])
async def test_client_direct_processes(size: int, tmp_path: Path) -> None:
    """Every peer a process started with FMI's command line, over TCP (four processes
    importing numpy take seconds on a shared machine: P = 4 runs here with --slow, and
    in threads by default, below)."""
    async with rendezvous() as server:
        host, port = server.address
        config = fmi_config_file(tmp_path, Direct={"enabled": True, "host": host, "port": port})
        argvs = [[str(CLIENT), str(size), str(i), str(config)] for i in range(size)]
        outputs = await run_processes(argvs, timeout=90)
    results = dict(results_of(out) for out in outputs)
    check([results[i] for i in range(size)])


def test_client_under_fmi_run_with_fmi_config_unchanged(tmp_path: Path) -> None:
    """FMI's config/fmi.json as it is (Direct at 127.0.0.1:10000, no secret): under
    ``fmi run`` the peers take the launcher's rendezvous server and secret instead."""
    config = REPO / "config" / "fmi.json"
    proc = fmi_run("-n", "2", "--config", str(config), str(CLIENT), str(config), timeout=90)
    results = dict(results_of(line) for line in proc.stdout.splitlines() if '{"peer"' in line)
    check([results[0], results[1]])


@pytest.mark.parametrize("size", [2, 4])
def test_client_direct_threads(size: int, tmp_path: Path) -> None:
    """Every peer a thread of this process (no event loop there), over TCP."""
    with threaded_rendezvous() as (host, port):
        config = fmi_config_file(tmp_path, Direct={"enabled": True, "host": host, "port": port})
        run = uuid.uuid4().hex[:12]

        def peer(rank: int) -> dict[str, Any]:
            with fmi.Communicator(rank, size, str(config), "Test", 512, run_id=run) as comm:
                return run_cases(comm, rank, size)

        check(in_threads(size, peer))


@pytest.mark.parametrize("size", [2, 4])
def test_client_redis_threads(size: int, redis_server: tuple[str, int], tmp_path: Path) -> None:
    """Every peer a thread of this process (no event loop there), over Redis."""
    config = fmi_config_file(tmp_path, Redis=redis_backend(redis_server))
    run = uuid.uuid4().hex[:12]

    def peer(rank: int) -> dict[str, Any]:
        with fmi.Communicator(rank, size, str(config), "Test", 512, run_id=run) as comm:
            return run_cases(comm, rank, size)

    check(in_threads(size, peer))
