"""examples/grid.py: y = A x on 2-D grids of peers, through row and column communicators.

One run goes through the real launcher (processes over tcp); the other grid
shapes run the example's coroutine on local peers in this process.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import numpy as np
import pytest

import fmi_async as fmi
from tests.example_runs import fmi_run, load_example
from tests.helpers import REPO

SCRIPT = REPO / "examples" / "grid.py"


grid = load_example("grid")


def test_grid_through_the_launcher() -> None:
    proc = fmi_run("-n", "6", str(SCRIPT), "--rows", "3")
    m = re.search(
        r"\[peer 0\] 3 x 2 grid, N = 600, 5 products: eigenvalue ([0-9.]+), "
        r"max error against numpy ([0-9.e+-]+) ok",
        proc.stdout,
    )
    assert m, proc.stdout
    assert float(m.group(2)) < 1e-12
    assert float(m.group(1)) == pytest.approx(300.0768, abs=1e-3)  # A's Perron eigenvalue


@pytest.mark.parametrize(
    ("rows", "cols", "n"),
    [(2, 3, 240), (1, 4, 240), (4, 1, 241), (1, 1, 50)],
)
async def test_grid_shapes(rows: int, cols: int, n: int) -> None:
    async with fmi.local_peers(rows * cols, timeout=30) as comms:
        results = await asyncio.gather(
            *(grid.power_iteration(c, rows, cols, n, steps=4) for c in comms)
        )
    assert results[0].max_error < 1e-12
    # Every peer ends with the same |A x|, which converged to A's dominant eigenvalue.
    a = np.random.default_rng(7).random((n, n))  # the example's A
    dominant = float(np.max(np.abs(np.linalg.eigvals(a))))
    for result in results:
        assert (result.rows, result.cols) == (rows, cols)
        assert result.eigenvalue == pytest.approx(results[0].eigenvalue, rel=1e-12)
        assert result.eigenvalue == pytest.approx(dominant, rel=1e-6)


def test_grid_exits_non_zero_when_wrong() -> None:
    # The example with a tolerance no error meets, as one peer: it must say so and fail.
    code = (
        "import sys, runpy; import fmi_async as fmi; "
        f"g = runpy.run_path({str(SCRIPT)!r}); g['main'].__globals__['TOLERANCE'] = -1.0; "
        "sys.argv = ['grid.py', '-n', '60', '--steps', '1']; fmi.run(g['main'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode != 0
    assert "WRONG" in proc.stdout
    assert "disagrees with numpy" in proc.stderr


@pytest.mark.parametrize(("size", "expected"), [(6, (2, 3)), (4, (2, 2)), (5, (1, 5)), (1, (1, 1))])
def test_default_grid_shape(size: int, expected: tuple[int, int]) -> None:
    assert grid.grid_shape(size, None, None) == expected
    with pytest.raises(SystemExit, match="needs"):
        grid.grid_shape(size, size + 1, None)
