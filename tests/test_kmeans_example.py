"""examples/kmeans.py: the distributed centroids equal a single-process numpy k-means.

The example's coroutine runs on local peers in this process (with fewer
points than its default); the reference below is Lloyd's algorithm written
directly, on the whole data set at once, with the same start and iterations.
"""

from __future__ import annotations

import asyncio
import itertools
import re

import numpy as np
import pytest

import fmi_async as fmi
from tests.example_runs import fmi_run, load_example
from tests.helpers import REPO

SCRIPT = REPO / "examples" / "kmeans.py"


kmeans = load_example("kmeans")


def reference(points: np.ndarray, k: int, iterations: int) -> np.ndarray:
    """Lloyd's algorithm on one process: distances by broadcasting, means per cluster."""
    centroids = points[:k].copy()
    for _ in range(iterations):
        distances = ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        nearest = distances.argmin(axis=1)
        for c in range(k):
            members = points[nearest == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
    return centroids


@pytest.mark.parametrize(("peers", "points"), [(4, 12_000), (3, 10_001), (1, 5_000)])
async def test_centroids_match_numpy(peers: int, points: int) -> None:
    dim, k, iterations, seed = 16, 8, 6, 3
    async with fmi.local_peers(peers, timeout=30) as comms:
        results = await asyncio.gather(
            *(kmeans.kmeans(c, points, dim, k, iterations, seed) for c in comms)
        )
    everything = kmeans.make_points(0, points, dim, k, seed)
    assert everything.shape == (points, dim)
    expected = reference(everything, k, iterations)
    for result in results:  # every peer ends with the same centroids: numpy's
        np.testing.assert_allclose(result.centroids, expected, rtol=1e-9, atol=1e-9)
        assert 0.0 <= result.communication_share <= 1.0
        assert result.seconds_per_iteration > 0
    # The peers' shares are the whole data set, in order, without overlap.
    shares = [kmeans.share_of(r, peers, points) for r in range(peers)]
    assert shares[0][0] == 0 and shares[-1][1] == points
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))


def test_kmeans_through_the_launcher() -> None:
    args = ["--points", "6000", "--iterations", "4", "--seed", "3", "--loop", "asyncio"]
    proc = fmi_run("-n", "2", "--nat", "none", str(SCRIPT), *args)
    m = re.search(
        r"\[peer 0\] k-means: 6000 x 16 points, k = 8, 2 peers, 4 iterations: "
        r"centroid checksum (-?[0-9.]+), [0-9.]+ ms per iteration, communication [0-9.]+%",
        proc.stdout,
    )
    assert m, proc.stdout
    points = kmeans.make_points(0, 6000, 16, 8, 3)
    assert float(m.group(1)) == pytest.approx(reference(points, 8, 4).sum(), abs=1e-5)
