"""examples/kmeans.py: the distributed centroids equal a single-process numpy k-means.

The example's coroutine runs on local peers in this process (with fewer
points than its default); the reference below is Lloyd's algorithm written
directly, on the whole data set at once, with the same start and iterations.
A small version of benchmarks/kmeans.py's comparison checks that LambdaML's
storage-only reduction (benchmarks/lambdaml.py) over Redis and the library's
allreduce over Redis end with the same centroids, bit for bit.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import itertools
import re
import sys
import uuid
from types import ModuleType

import numpy as np
import pytest
import redis.asyncio

import fmi_async as fmi
from tests.example_runs import fmi_run, load_example
from tests.helpers import REPO, storage_group

SCRIPT = REPO / "examples" / "kmeans.py"


kmeans = load_example("kmeans")


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


async def test_lambdaml_pattern_and_library_agree_bitwise(
    redis_server: tuple[str, int], redis_config: fmi.Config
) -> None:
    """3 workers, 2 epochs: LambdaML's reduce_epoch over Redis (every worker a
    coroutine here, with its own connection) and the library's allreduce over
    Redis give the same centroids, bit for bit (the data's sums are exact)."""
    lambdaml = load_benchmark("lambdaml")
    peers, points, dim, k, epochs, seed = 3, 3_000, 4, 3, 2, 5
    shares = [
        kmeans.make_points(*kmeans.share_of(r, peers, points), dim, k, seed) for r in range(peers)
    ]
    start = kmeans.make_points(0, k, dim, k, seed)

    host, port = redis_server
    prefix = f"lambdaml-test-{uuid.uuid4().hex[:8]}"
    stores = [lambdaml.make_store("redis", f"{host}:{port}", "", prefix) for _ in range(peers)]
    reducers = [
        lambdaml.StorageReducer(s, r, peers, poll=0.005, deadline=20) for r, s in enumerate(stores)
    ]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        await asyncio.gather(*(r.barrier("ready") for r in reducers))
        storage = await asyncio.gather(
            *(kmeans.lloyd(shares[r], start, epochs, reducers[r]) for r in range(peers))
        )
        await asyncio.gather(*(r.cleanup() for r in reducers))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    # Worker 0 wrote every epoch's sum once and the others read it.
    assert stores[0].requests["HSET"] == 2 * epochs + 1  # its updates, the sums, "ready"
    assert stores[1].requests["HSET"] == epochs + 2  # its updates, "ready", "left"
    check = redis.asyncio.Redis(host=host, port=port)
    try:  # the cleanup left nothing behind
        assert await check.exists(f"{prefix}:tmp", f"{prefix}:merged") == 0
    finally:
        await check.aclose()

    async with storage_group(redis_config)(peers, timeout=20) as comms:
        library = await asyncio.gather(
            *(
                kmeans.lloyd(
                    shares[c.rank], start, epochs, functools.partial(c.allreduce, op=fmi.SUM)
                )
                for c in comms
            )
        )
    expected = storage[0].centroids
    assert not np.array_equal(expected, start)  # the epochs moved the centroids
    for trace in [*storage, *library]:
        assert trace.centroids.tobytes() == expected.tobytes()
        assert len(trace.epoch_seconds) == len(trace.reduce_seconds) == epochs
