"""Every example runs, through the real launcher, and prints a correct result."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def launch(n: int, script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fmi_async", "run", "-n", str(n), str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_every_example_has_a_test() -> None:
    tested = {"hello_allreduce.py", "pi.py", "dot.py"}
    tested.add("grid.py")  # run by tests/test_grid_example.py
    tested.add("kmeans.py")  # run by tests/test_kmeans_example.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("n", [1, 4])
def test_hello_allreduce(n: int) -> None:
    out = launch(n, "hello_allreduce.py")
    for peer in range(n):
        assert f"[peer {peer}] peer {peer}/{n}: sum of 1..{n} = {n * (n + 1) // 2}" in out


def test_pi() -> None:
    out = launch(3, "pi.py", "200000")
    m = re.search(r"\[peer 0\] pi ~ ([0-9.]+) from 600000 darts on 3 peers", out)
    assert m, out
    assert abs(float(m.group(1)) - math.pi) < 0.02


def test_dot() -> None:
    out = launch(5, "dot.py", "100003")
    m = re.search(
        r"dot product of two 100003-vectors on 5 peers: ([0-9.]+) \(numpy: ([0-9.]+)\)", out
    )
    assert m, out
    assert math.isclose(float(m.group(1)), float(m.group(2)), rel_tol=1e-9)


def test_example_runs_alone_as_one_peer() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "dot.py"), "1000"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "on 1 peers" in proc.stdout


def readme_tour() -> str:
    """The code block of the README's "A short tour" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## A short tour\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "the README's tour has no python block"
    return found.group(1)


@pytest.mark.parametrize("n", [1, 2])
def test_readme_tour_runs(tmp_path: Path, n: int) -> None:
    # As the README says: alone as a one-peer job, and under `fmi run -n N`.
    tour = tmp_path / "tour.py"
    tour.write_text(readme_tour())
    if n == 1:
        proc = subprocess.run(
            [sys.executable, str(tour)], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    else:
        out = _run_tour(n, tour)
    for peer in range(n):
        prefix = "" if n == 1 else f"[peer {peer}] "
        assert f"{prefix}{{'peer': {peer}, 'num_peers': {n}," in out, out
        assert "'reduce_scatter/" in out, out  # it got to the last collective


def _run_tour(n: int, tour: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fmi_async", "run", "-n", str(n), "--nat", "none", str(tour)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
