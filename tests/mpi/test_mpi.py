"""The MPI channel under a real ``mpiexec``: the collective suite for P in
{1, 2, 3, 4, 5, 8} (``suite.py``), the failure scenarios (``scenarios.py``), and
one script giving the same output under ``fmi run`` and under ``mpiexec``.

Each launch runs a whole matrix in one set of processes and reports JSON on
stdout; the tests here assert on it.  Skipped when ``mpiexec`` or mpi4py is
missing (``pip install mpich mpi4py`` provides both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mpi4py", reason="the MPI channel tests need mpi4py (pip install mpi4py)")

ROOT = Path(__file__).resolve().parents[2]


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, in this environment
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = _mpiexec()
if MPIEXEC is None:
    pytest.skip("mpiexec is not on PATH (pip install mpich)", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)

# A launcher's variables must not leak in from the environment running the tests.
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("FMI_", "PMI_", "OMPI_"))}
SIZES = [1, 2, 3, 4, 5, 8]
SCENARIO_SIZE = 3


def launch(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    assert MPIEXEC is not None
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_lines(proc: subprocess.CompletedProcess[str], key: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in proc.stdout.splitlines()
        if line.startswith("{") and f'"{key}"' in line
    ]


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"


# ---------------------------------------------------------------- the collective suite


def run_suite(n: int, *options: str, least: int = 200) -> dict[str, Any]:
    """One launch of the suite; its JSON, asserted free of failures, with at least
    ``least`` results checked by every rank."""
    proc = launch(n, "-m", "tests.mpi.suite", *options)
    lines = json_lines(proc, "checked")
    assert len(lines) == 1, output(proc)
    result = lines[0]
    assert result["failures"] == [] and result["failed"] == 0, output(proc)
    assert proc.returncode == 0, output(proc)
    assert result["P"] == n
    per_rank = result["checked_per_rank"]
    # Every rank checked every result; a section that silently ran nothing shows here.
    assert len(per_rank) == n and len(set(per_rank)) == 1, per_rank
    assert per_rank[0] >= least, per_rank
    assert result["checked"] == sum(per_rank)
    return result


@pytest.mark.parametrize("n", SIZES)
def test_collective_suite(n: int) -> None:
    result = run_suite(n)
    assert (result["progress"], result["check"]) == ("poll", "on")


def test_collective_suite_progress_thread() -> None:
    result = run_suite(3, "--progress", "thread")
    assert (result["progress"], result["check"]) == ("thread", "on")


def test_collective_suite_without_check() -> None:
    result = run_suite(3, "--check", "off")
    assert (result["progress"], result["check"]) == ("poll", "off")


def test_collective_suite_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    result = run_suite(3, "--loop", "uvloop", "--progress", "thread")
    assert (result["loop"], result["progress"]) == ("uvloop", "thread")


# ---------------------------------------------------------------- failure scenarios


Verdict = dict[str, Any]
"""One rank's JSON verdict of one case."""


@dataclass
class Scenarios:
    """One launch of every case: the verdicts by case, and the launch's outcome."""

    verdicts: dict[str, list[Verdict]]
    returncode: int
    output: str

    def ranks(self, case: str) -> list[Verdict]:
        """Every rank's verdict of ``case``, by rank, each asserted ok."""
        lines = sorted(self.verdicts.get(case, []), key=lambda v: v["rank"])
        assert [v["rank"] for v in lines] == list(range(SCENARIO_SIZE)), (case, self.output)
        for v in lines:
            assert v["ok"] and v["failures"] == [], json.dumps(v, indent=1)
            assert v["checked"] > 0, v
        return lines


def run_scenarios(*options: str) -> Scenarios:
    proc = launch(SCENARIO_SIZE, "-m", "tests.mpi.scenarios", "--case", "all", *options)
    verdicts: dict[str, list[Verdict]] = {}
    for line in json_lines(proc, "case"):
        verdicts.setdefault(line["case"], []).append(line)
    return Scenarios(verdicts, proc.returncode, output(proc))


def expect_wrong_root(verdicts: list[Verdict]) -> None:
    """The peer with a root out of range raises RootError; the others AbortedError
    naming it, well before the timeout; the next allreduce is right (in the script)."""
    for v in verdicts:
        for op in ("bcast", "reduce"):
            error = v["seen"][op]["error"]
            if v["rank"] == 1:
                assert error["type"] == "RootError", v
            else:
                assert (error["type"], error["peer"]) == ("AbortedError", 1), v
                assert error["cause"] == "RootError", v  # the announced cause, not only who
                assert v["seen"][op]["seconds"] < 5, v


def expect_root_mismatch(verdicts: list[Verdict]) -> None:
    """Valid but different roots: PlanMismatchError on every peer, then collectives work."""
    for v in verdicts:
        for op in ("bcast", "reduce", "gather"):
            assert v["seen"][op]["error"]["type"] == "PlanMismatchError", v


def expect_shape_mismatch(verdicts: list[Verdict]) -> None:
    """allreduce of different shapes, dtypes or operators: PlanMismatchError everywhere."""
    for v in verdicts:
        for what in ("shape", "dtype", "operator"):
            assert v["seen"][what]["error"]["type"] == "PlanMismatchError", v


def expect_late_peer(verdicts: list[Verdict]) -> None:
    """The punctual peers time out; the late one gets the right result (MPI kept the
    others' part posted) or, once their abort reached it, AbortedError naming one of
    them -- never a wrong value or a hang; the next collectives are right."""
    late = SCENARIO_SIZE - 1
    for v in verdicts[:late]:
        assert len(v["seen"]) == 4, v
        for seen in v["seen"].values():
            assert seen["error"]["type"] == "CommTimeout", v
    assert len(verdicts[late]["seen"]) == 4, verdicts[late]
    for where, seen in verdicts[late]["seen"].items():
        outcome = seen["late"]
        assert outcome == "result" or (
            outcome["type"] == "AbortedError" and outcome["peer"] in range(late)
        ), (where, seen)


def expect_cancelled(verdicts: list[Verdict]) -> None:
    """Peer 0 cancelled (at least one collective in time); the others got the result
    or AbortedError naming peer 0."""
    for v in verdicts:
        assert sorted(v["seen"]) == ["array", "bcast", "object"], v
        for seen in v["seen"].values():
            if v["rank"] == 0:  # the result only if it was over before the cancel
                assert seen == "result" or seen["type"] == "CancelledError", v
            else:
                assert seen == "result" or (seen["type"], seen["peer"]) == ("AbortedError", 0), v
    assert any(s != "result" for s in verdicts[0]["seen"].values()), verdicts[0]


def expect_point_to_point(verdicts: list[Verdict]) -> None:
    """Tags, self, 20 MiB, objects, cancellation (in the script); timeouts name the peer."""
    for v in verdicts:
        prv = (v["rank"] - 1) % SCENARIO_SIZE
        assert v["seen"]["recv_timeout"]["type"] == "CommTimeout", v
        assert f"peer {prv}" in v["seen"]["recv_timeout"]["text"], v


def expect_split(verdicts: list[Verdict]) -> None:
    """Each rank is peer (rank // 2) of its half."""
    evens = (SCENARIO_SIZE + 1) // 2
    sizes = [evens if r % 2 == 0 else SCENARIO_SIZE - evens for r in range(SCENARIO_SIZE)]
    assert [v["seen"]["sub"] for v in verdicts] == [
        [r // 2, sizes[r]] for r in range(SCENARIO_SIZE)
    ]


def expect_groups(verdicts: list[Verdict]) -> None:
    """Split with key = -rank reverses each half; create_group ranks in the order given."""
    for v in verdicts:
        r = v["rank"]
        half = list(range(r % 2, SCENARIO_SIZE, 2))[::-1]
        assert v["seen"]["split"] == [half.index(r), len(half)], v
        if r in (SCENARIO_SIZE - 1, 0):
            assert v["seen"]["group"] == [[SCENARIO_SIZE - 1, 0].index(r), 2], v


def expect_split_missing(verdicts: list[Verdict]) -> None:
    """Every rank that called split names the missing one; it learns the split failed."""
    for v in verdicts:
        error = v["seen"]["error"]
        if v["rank"] == SCENARIO_SIZE - 1:
            assert error["type"] == "AbortedError", v
        else:
            assert error["type"] == "CommTimeout", v
            assert f"[{SCENARIO_SIZE - 1}]" in error["text"], v


EXPECT: dict[str, Callable[[list[Verdict]], None]] = {
    "wrong_root": expect_wrong_root,
    "root_mismatch": expect_root_mismatch,
    "shape_mismatch": expect_shape_mismatch,
    "late_peer": expect_late_peer,
    "cancelled": expect_cancelled,
    "point_to_point": expect_point_to_point,
    "split": expect_split,
    "groups": expect_groups,
    "split_missing": expect_split_missing,
}


@pytest.fixture(scope="module")
def scenarios() -> Scenarios:
    return run_scenarios()


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_scenario(scenarios: Scenarios, case: str) -> None:
    EXPECT[case](scenarios.ranks(case))


def test_scenarios_exit_code(scenarios: Scenarios) -> None:
    assert sorted(scenarios.verdicts) == sorted(EXPECT), scenarios.output
    assert scenarios.returncode == 0, scenarios.output


def test_scenarios_progress_thread() -> None:
    scenarios = run_scenarios("--progress", "thread")
    for case, expect in EXPECT.items():
        expect(scenarios.ranks(case))
    assert scenarios.returncode == 0, scenarios.output


# ---------------------------------------------------------------- one script, two launchers


def test_same_script_under_fmi_run_and_mpiexec() -> None:
    script = str(Path(__file__).with_name("same_script.py"))
    fmi_run = subprocess.run(
        [sys.executable, "-m", "fmi_async", "run", "-n", "3", script],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fmi_run.returncode == 0, output(fmi_run)
    under_mpi = launch(3, script, timeout=120)
    assert under_mpi.returncode == 0, output(under_mpi)
    # fmi run prefixes every line with the peer's id; mpiexec does not.
    from_fmi = sorted(
        line.partition("] ")[2] for line in fmi_run.stdout.splitlines() if line.startswith("[peer ")
    )
    from_mpi = sorted(under_mpi.stdout.splitlines())
    want = [
        f"peer {r}/3: allreduce=[0, 6, 12, 18] allgather=['p0', 'p1', 'p2'] "
        f"scan={(r + 1) * (r + 2) // 2} bcast=hello ordered=[0, 1, 2]"
        for r in range(3)
    ]
    assert from_fmi == want, output(fmi_run)
    assert from_mpi == want, output(under_mpi)
    # The same lines, over different channels.
    assert "channels ['tcp']" in fmi_run.stderr, output(fmi_run)
    assert under_mpi.stderr.count("channels ['mpi']") == 3, output(under_mpi)
