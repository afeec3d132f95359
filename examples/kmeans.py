"""k-means clustering (Lloyd's algorithm) on data spread over the peers.

Every peer holds its share of the points and never sends them anywhere.  One
iteration is

1. local: assign every point of this peer to its nearest centroid (numpy),
   and add up, per cluster, the points (a k x d array of sums) and how many
   there are (k counts);
2. global: one allreduce (SUM) of the sums and the counts, packed in one
   vector of k x (d + 1) numbers: every peer now has the totals of the whole
   data set, and computes the same new centroids (sum / count; a cluster left
   empty keeps its old centroid).

All peers therefore hold the same centroids after every iteration, without a
root.  The data set is made from a seed, in blocks of points that any peer
can draw on its own, so it is the same whatever the number of peers.  Its
coordinates lie on a grid of 2**-20 and are below 2**10 in size, so every
sum of up to 2**23 of them is exact in float64: the order in which a reduction adds the
peers' sums cannot change a bit of the result, and the centroids are the same
bit for bit whatever the number of peers, the channel or the algorithm (or
another system's reduction, benchmarks/kmeans.py).  The first k points are
the starting centroids.

The loop itself (:func:`lloyd`) takes the reduction as a coroutine function,
so the same arithmetic runs over ``comm.allreduce`` here and over a
storage-only reduction in benchmarks/lambdaml.py.

Peer 0 prints a checksum of the final centroids, the time per iteration and
the communication share: the time spent in the allreduces over the time of
the iterations, summed over all peers.

    fmi run -n 8 examples/kmeans.py                       # 200000 x 16 points, k = 8
    fmi run -n 4 examples/kmeans.py --points 50000 --iterations 10
    python examples/kmeans.py --loop asyncio              # one peer, on asyncio
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

import fmi_async as fmi

BLOCK = 10_000  # points drawn from one seeded generator
GRID = 20  # coordinates are multiples of 2**-GRID: every sum of them is exact

# A reduction of one float64 vector over all peers (element-wise SUM).
Reduce = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass
class Trace:
    """One peer's run of :func:`lloyd`: its final centroids and, per epoch, the
    seconds of the whole epoch and of its reduction, and when (``perf_counter``,
    the same clock in every process of a machine) the reduction began and ended."""

    centroids: np.ndarray
    epoch_seconds: list[float] = field(default_factory=list)
    reduce_seconds: list[float] = field(default_factory=list)
    reduce_began: list[float] = field(default_factory=list)
    reduce_ended: list[float] = field(default_factory=list)


@dataclass
class Result:
    """The final centroids and where the time went (the same on every peer)."""

    centroids: np.ndarray  # k x d
    seconds_per_iteration: float  # mean over the peers
    communication_share: float  # time in allreduce / time of the iterations, all peers


def make_points(start: int, stop: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Points ``start`` to ``stop`` of the data set: ``k`` Gaussian blobs in ``dim``
    dimensions.  Block ``b`` (points ``b * BLOCK`` onwards) comes from its own
    generator, seeded by (seed, b), so a peer draws only the blocks it needs.
    Coordinates are rounded to multiples of 2**-20 (see the module's docstring)."""
    centers = np.random.default_rng(seed).uniform(-10, 10, size=(k, dim))
    parts = []
    for block in range(start // BLOCK, (stop + BLOCK - 1) // BLOCK):
        rng = np.random.default_rng((seed, block))
        blob = rng.integers(0, k, size=BLOCK)
        points = centers[blob] + rng.normal(0, 2.0, size=(BLOCK, dim))
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        parts.append(points[lo - block * BLOCK : hi - block * BLOCK])
    out = np.concatenate(parts) if parts else np.empty((0, dim))
    return np.ldexp(np.round(np.ldexp(out, GRID)), -GRID)


def share_of(rank: int, size: int, total: int) -> tuple[int, int]:
    """The range of points peer ``rank`` of ``size`` holds (the first peers one more)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster, the sum of the points nearest to its centroid, and their count."""
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every c of a point.
    distances = (centroids**2).sum(axis=1) - 2.0 * points @ centroids.T
    nearest = distances.argmin(axis=1)
    k, dim = centroids.shape
    sums = np.stack(
        [np.bincount(nearest, weights=points[:, j], minlength=k) for j in range(dim)], axis=1
    )
    counts = np.bincount(nearest, minlength=k).astype(np.float64)
    return sums, counts


async def kmeans(
    comm: fmi.Communicator,
    points: int = 200_000,
    dim: int = 16,
    k: int = 8,
    iterations: int = 20,
    seed: int = 1,
) -> Result:
    """``iterations`` rounds of Lloyd's algorithm over ``points`` x ``dim`` points."""
    start, stop = share_of(comm.rank, comm.size, points)
    mine = make_points(start, stop, dim, k, seed)
    centroids = make_points(0, k, dim, k, seed)  # every peer draws the same first k

    # Connections open on first use: one untimed allreduce of the same shape,
    # so the timings below are of the steady state.
    await comm.allreduce(np.zeros(k * (dim + 1)))

    async def allreduce(vector: np.ndarray) -> np.ndarray:
        return await comm.allreduce(vector, fmi.SUM)

    trace = await lloyd(mine, centroids, iterations, allreduce)
    in_allreduce, elapsed = sum(trace.reduce_seconds), sum(trace.epoch_seconds)

    # Where the time went, summed over all peers.
    totals = await comm.allreduce(np.array([in_allreduce, elapsed]), fmi.SUM)
    return Result(
        centroids=trace.centroids,
        seconds_per_iteration=float(totals[1]) / comm.size / max(iterations, 1),
        communication_share=float(totals[0] / totals[1]) if totals[1] > 0 else 0.0,
    )


async def lloyd(mine: np.ndarray, centroids: np.ndarray, iterations: int, reduce: Reduce) -> Trace:
    """``iterations`` epochs of Lloyd's algorithm from ``centroids`` (not changed) on
    this peer's points ``mine``; ``reduce`` sums a vector over all peers.  An epoch
    reduces one vector: the k x d sums, then the k counts."""
    k, dim = centroids.shape
    trace = Trace(centroids=centroids.copy())
    for _ in range(iterations):
        t_start = time.perf_counter()
        sums, counts = assign(mine, trace.centroids)
        t0 = time.perf_counter()
        total = await reduce(np.concatenate([sums.ravel(), counts]))
        t1 = time.perf_counter()
        trace.reduce_seconds.append(t1 - t0)
        trace.reduce_began.append(t0)
        trace.reduce_ended.append(t1)
        sums, counts = total[: k * dim].reshape(k, dim), total[k * dim :]
        # The same arithmetic on the same totals: every peer gets the same centroids.
        filled = counts > 0
        trace.centroids[filled] = sums[filled] / counts[filled, None]
        trace.epoch_seconds.append(time.perf_counter() - t_start)
    return trace


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="k-means over the peers, with allreduce")
    parser.add_argument("--points", type=int, default=200_000, help="points in all")
    parser.add_argument("--dim", type=int, default=16, help="dimensions of a point")
    parser.add_argument("-k", type=int, default=8, help="clusters")
    parser.add_argument("--iterations", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--seed", type=int, default=1, help="seed of the data set")
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    return parser.parse_args(argv)


async def main(comm: fmi.Communicator, args: argparse.Namespace) -> Result:
    result = await kmeans(comm, args.points, args.dim, args.k, args.iterations, args.seed)
    if comm.rank == 0:
        print(
            f"k-means: {args.points} x {args.dim} points, k = {args.k}, {comm.size} peers, "
            f"{args.iterations} iterations: centroid checksum {result.centroids.sum():.6f}, "
            f"{result.seconds_per_iteration * 1e3:.3f} ms per iteration, "
            f"communication {result.communication_share:.1%}"
        )
    return result


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    use_uvloop = {"uvloop": True, "asyncio": False}.get(options.loop)  # auto: None
    fmi.run(functools.partial(main, args=options), use_uvloop=use_uvloop)
