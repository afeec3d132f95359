"""Matrix-vector products on a 2-D process grid, with row and column communicators.

The P = R x C peers form a grid; peer ``p`` sits in row ``p // C`` and
column ``p % C``.  The N x N matrix A is cut into R x C blocks and peer
(r, c) holds block A[r, c]; the vector x is cut into C blocks and every peer
of column c holds x[c].  One product y = A x is then

1. a local product, A[r, c] @ x[c], a partial sum of the row block y[r];
2. an allreduce over the peer's ROW communicator (``comm.split(row, key=col)``):
   every peer of row r now holds y[r];
3. an allgather over the peer's COLUMN communicator (``comm.split(col, key=row)``),
   which holds one peer of every row: every peer now holds all of y and keeps
   the block x[c] of the next iterate, so the next product starts in place.

The example runs a few steps of power iteration (x <- A x / |A x|) and peer 0,
which holds all of A at the start, checks every product against numpy's dense
``A @ x``; the run fails if one is off.

    fmi run -n 6 examples/grid.py                    # a 2 x 3 grid
    fmi run -n 6 examples/grid.py --rows 3 --cols 2  # 3 x 2
    fmi run -n 4 examples/grid.py --rows 1           # 1 x 4
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import fmi_async as fmi

TOLERANCE = 1e-9  # largest relative error accepted against numpy


@dataclass
class Result:
    """What peer 0 reports (the other peers report their shape only)."""

    rows: int
    cols: int
    eigenvalue: float
    max_error: float  # max |y - A @ x| / max |A @ x| over every step (peer 0 only)


def grid_shape(size: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    """The grid of ``size`` peers: the given sides, or the squarest R x C with R <= C."""
    if rows is None and cols is None:
        rows = max(r for r in range(1, math.isqrt(size) + 1) if size % r == 0)
    if rows is None:
        assert cols is not None
        rows = size // cols
    if cols is None:
        cols = size // rows
    if rows < 1 or cols < 1 or rows * cols != size:
        raise SystemExit(f"a {rows} x {cols} grid needs {rows * cols} peers, not {size}")
    return rows, cols


async def power_iteration(
    comm: fmi.Communicator, rows: int, cols: int, n: int = 600, steps: int = 5
) -> Result:
    """``steps`` products y = A x on a ``rows`` x ``cols`` grid of ``comm``'s peers."""
    row, col = divmod(comm.rank, cols)
    # Peers with the same row form a communicator ranked by column, and vice versa.
    row_comm = await comm.split(row, key=col)
    col_comm = await comm.split(col, key=row)
    assert row_comm is not None and col_comm is not None
    assert (row_comm.size, row_comm.rank) == (cols, col)
    assert (col_comm.size, col_comm.rank) == (rows, row)

    # Row blocks of A (and of y) and column blocks of A (and of x): index ranges.
    row_ranges = np.array_split(np.arange(n), rows)
    col_ranges = np.array_split(np.arange(n), cols)

    # Peer 0 makes A and the first x, and scatters every peer its blocks.
    a = x = None
    blocks = None
    if comm.rank == 0:
        rng = np.random.default_rng(7)
        a = rng.random((n, n))
        x = np.ones(n) / math.sqrt(n)
        blocks = [
            (a[np.ix_(row_ranges[p // cols], col_ranges[p % cols])], x[col_ranges[p % cols]])
            for p in range(comm.size)
        ]
    a_block, x_block = await comm.scatter(blocks, root=0)

    # Every peer of a column gathers the same row blocks; their sizes differ
    # when rows does not divide n, so all peers plan with the same size hint.
    block_bytes = max(len(r) for r in row_ranges) * 8
    eigenvalue, max_error = 0.0, 0.0
    for _ in range(steps):
        partial = a_block @ x_block  # this block's share of y[row]
        y_row = await row_comm.allreduce(partial, fmi.SUM)  # y[row], on every peer of the row
        y = np.concatenate(await col_comm.allgather(y_row, nbytes=block_bytes))  # all of y
        if comm.rank == 0:  # the dense reference, on one peer
            assert a is not None and x is not None
            expected = a @ x
            error = float(np.max(np.abs(y - expected)) / np.max(np.abs(expected)))
            max_error = max(max_error, error)
            x = expected / np.linalg.norm(expected)
        eigenvalue = float(np.linalg.norm(y))  # |A x| with |x| = 1
        x_block = y[col_ranges[col]] / eigenvalue  # the next iterate's block, in place
    await row_comm.close()
    await col_comm.close()
    return Result(rows, cols, eigenvalue, max_error)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="y = A x on a 2-D grid of peers")
    parser.add_argument("--rows", type=int, help="grid rows (default: squarest grid)")
    parser.add_argument("--cols", type=int, help="grid columns (default: peers / rows)")
    parser.add_argument("-n", type=int, default=600, help="matrix order (default 600)")
    parser.add_argument("--steps", type=int, default=5, help="power iteration steps")
    return parser.parse_args(argv)


async def main(comm: fmi.Communicator) -> Result:
    args = parse(sys.argv[1:])
    rows, cols = grid_shape(comm.size, args.rows, args.cols)
    result = await power_iteration(comm, rows, cols, args.n, args.steps)
    # Peer 0 tells everyone whether the products were right, so all peers agree on the exit.
    ok = await comm.bcast(result.max_error <= TOLERANCE if comm.rank == 0 else None, root=0)
    if comm.rank == 0:
        print(
            f"{rows} x {cols} grid, N = {args.n}, {args.steps} products: eigenvalue "
            f"{result.eigenvalue:.6f}, max error against numpy {result.max_error:.2e}"
            f" {'ok' if ok else 'WRONG'}"
        )
    if not ok:
        raise SystemExit("the distributed matrix-vector product disagrees with numpy")
    return result


if __name__ == "__main__":
    fmi.run(main)
