"""``fmi calibrate`` for the MPI channel, run by every rank of ``mpiexec -n P fmi calibrate``.

The other channels are measured with all peers inside one process; MPI ranks
are processes of their own, so here every rank runs the same steps: rank 0
pings rank 1 and decides (how many round trips per sample, when a size has
enough samples) and broadcasts each decision, so every rank takes the same
path.  The aggregate bandwidth is ``P // 2`` pairs ``(2i, 2i + 1)`` sending
at once, timed by the slowest pair.  Rank 0 returns the fit; the other ranks
return None.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np

from ..communicator import Communicator
from ..config import Config
from ..errors import ArgumentError
from .calibration import ChannelCalibration
from .progress import ProgressBar
from .units import fmt_bytes

__all__ = ["calibrate_mpi"]

logger = logging.getLogger(__name__)

_MIN_REPS = 3
_SAMPLE_SECONDS = 0.02  # round trips per sample: about this long


async def _round_trips(comm: Communicator, value: np.ndarray, iters: int) -> float:
    """Seconds of one one-way message between ranks 0 and 1 (rank 0's measure; 0 elsewhere)."""
    if comm.rank == 0:
        start = time.perf_counter()
        for _ in range(iters):
            await comm.send(value, 1, "calibrate")
            await comm.recv(1, "calibrate")
        return (time.perf_counter() - start) / iters / 2
    if comm.rank == 1:
        for _ in range(iters):
            await comm.send(await comm.recv(0, "calibrate"), 0, "calibrate")
    return 0.0


async def _one_way(
    comm: Communicator, sizes: Sequence[int], reps: int, budget: float, bar: ProgressBar
) -> dict[int, list[float]]:
    per_size = budget / len(sizes)
    out: dict[int, list[float]] = {}
    for n in sizes:
        value = np.zeros(n, dtype=np.uint8)
        first = await _round_trips(comm, value, 1)  # warm-up
        iters = max(1, min(1000, math.ceil(_SAMPLE_SECONDS / max(2 * first, 1e-7))))
        iters = int(await comm.bcast(iters, root=0))
        samples: list[float] = []
        start = time.perf_counter()
        while True:
            samples.append(await _round_trips(comm, value, iters))
            enough = len(samples) >= reps or (
                len(samples) >= _MIN_REPS and time.perf_counter() - start > per_size
            )
            if await comm.bcast(enough, root=0):
                break
        out[n] = samples
        bar.set_postfix_str(f"mpi {fmt_bytes(n)}", refresh=False)
        bar.update()
    return out


async def _aggregate(comm: Communicator, nbytes: int, reps: int, budget: float) -> list[float]:
    """Bytes/s of ``P // 2`` pairs each sending ``nbytes`` at once (acknowledged)."""
    pairs = comm.size // 2
    value = np.zeros(nbytes, dtype=np.uint8)
    rank = comm.rank
    samples: list[float] = []
    start = time.perf_counter()
    for rep in range(reps + 1):
        await comm.barrier()
        t0 = time.perf_counter()
        if rank < 2 * pairs:
            if rank % 2 == 0:
                await comm.send(value, rank + 1, "aggregate")
                await comm.recv(rank + 1, "aggregate")
            else:
                await comm.recv(rank - 1, "aggregate")
                await comm.send(b"", rank - 1, "aggregate")
        slowest = await comm.allreduce(time.perf_counter() - t0, "MAX")
        if rep:  # the first round warms up
            samples.append(pairs * nbytes / slowest)
        enough = len(samples) >= _MIN_REPS and time.perf_counter() - start > budget
        if await comm.bcast(enough, root=0):
            break
    return samples


async def calibrate_mpi(
    config: Config,
    sizes: Sequence[int],
    *,
    reps: int,
    budget: float,
    bar: ProgressBar,
) -> ChannelCalibration | None:
    """Measure the MPI channel between the ranks of ``COMM_WORLD``; the fit on rank 0.

    Raises :class:`~fmi_async.errors.ArgumentError` when fewer than two ranks
    run (start it with ``mpiexec -n 2`` or more), and
    :class:`~fmi_async.errors.ConfigError` without mpi4py.
    """
    began = time.perf_counter()
    comm = Communicator.from_mpi(config=config, timeout=60.0)
    if comm.size < 2:
        raise ArgumentError(
            "calibrating the mpi channel needs at least 2 ranks: "
            "mpiexec -n 2 fmi calibrate --channels mpi"
        )
    async with comm:
        samples = await _one_way(comm, sizes, reps, budget * 0.75, bar)
        agg = await _aggregate(comm, sizes[-1], reps, budget * 0.25)
        bar.set_postfix_str("mpi aggregate", refresh=False)
        bar.update()
    if comm.rank != 0:
        return None
    result = ChannelCalibration("mpi", "direct", comm.size)
    result.samples = samples
    result.aggregate_size = sizes[-1]
    result.finish(agg, began)
    return result
