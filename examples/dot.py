"""Distributed dot product of two numpy vectors.

Peer 0 owns the vectors, scatters one slice of each to every peer, every peer
computes its partial dot product, and a reduce brings the sum back to peer 0,
which checks it against numpy's own ``np.dot``.

    fmi run -n 4 examples/dot.py [length]
"""

from __future__ import annotations

import sys

import numpy as np

import fmi_async as fmi


async def main(comm: fmi.Communicator) -> float | None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_003
    slices = None
    if comm.rank == 0:
        rng = np.random.default_rng(42)
        a, b = rng.random(n), rng.random(n)
        slices = list(zip(np.array_split(a, comm.size), np.array_split(b, comm.size), strict=True))
    mine_a, mine_b = await comm.scatter(slices, root=0)
    partial = float(np.dot(mine_a, mine_b))
    total = await comm.reduce(partial, op=fmi.SUM, root=0)
    if comm.rank == 0:
        assert slices is not None
        reference = float(
            np.dot(np.concatenate([s[0] for s in slices]), np.concatenate([s[1] for s in slices]))
        )
        print(
            f"dot product of two {n}-vectors on {comm.size} peers: {total:.6f} "
            f"(numpy: {reference:.6f})"
        )
        if not np.isclose(total, reference, rtol=1e-9):
            raise SystemExit("distributed dot product disagrees with numpy")
    return total


if __name__ == "__main__":
    fmi.run(main)
