"""Distributed Monte Carlo estimate of pi.

Every peer throws its own darts at the unit square (numpy, independent seeds),
the hits are summed with an allreduce, and peer 0 prints the estimate.

    fmi run -n 4 examples/pi.py [darts-per-peer]
"""

from __future__ import annotations

import math
import sys

import numpy as np

import fmi_async as fmi


async def main(comm: fmi.Communicator) -> float:
    darts = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rng = np.random.default_rng(seed=comm.rank)
    xy = rng.random((darts, 2))
    hits = int(np.count_nonzero((xy**2).sum(axis=1) <= 1.0))
    counts = np.array([hits, darts], dtype=np.int64)
    total_hits, total_darts = await comm.allreduce(counts, op=fmi.SUM)
    estimate = 4.0 * total_hits / total_darts
    if comm.rank == 0:
        print(
            f"pi ~ {estimate:.6f} from {total_darts} darts on {comm.size} peers "
            f"(error {abs(estimate - math.pi):.2e})"
        )
    return estimate


if __name__ == "__main__":
    fmi.run(main)
