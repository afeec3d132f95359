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
