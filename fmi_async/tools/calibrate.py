"""``fmi calibrate``: measure the channels and write their models into the config.

The defaults of :mod:`fmi_async.selection.model` are other people's
measurements (FMI's, on AWS).  Plans are only as good as those numbers, so
this command measures the channels where the job will run and fits them
(:mod:`fmi_async.tools.calibration`: the fit, its spread, the config it
writes).

What is measured, all from this process:

* **one-way time** at several sizes: a ping-pong of a numpy ``uint8`` array
  through ``Communicator.send``/``recv`` between peers 0 and 1, halved, so it
  includes serialization and matching exactly as collectives see them.  The
  memory channel uses :func:`fmi_async.local_peers`; TCP an in-process
  :class:`~fmi_async.holepunch.server.RendezvousServer` on 127.0.0.1; Redis,
  S3 and DynamoDB the backends (endpoints) of the config.  Over storage a
  message is a put and a get, which the plan models as two requests
  (``2 t(n)``), so the per-request time written is the one-way time / 2.
* the **aggregate bandwidth**: for storage, ``P - 1`` readers fetching one
  stored object at once; for direct channels, ``P / 2`` pairs sending at once.

Repetitions are adaptive: each size gets an equal share of ``--budget``
seconds, with at least three repetitions, so a default run takes a few seconds
per channel.  Every wait is bounded by the communicator's timeout and each
channel's whole measurement by a deadline derived from the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..channels import registry
from ..channels.base import ChannelContext, MediatedChannel
from ..channels.mailbox import Mailbox
from ..channels.registry import channel_class
from ..communicator import Communicator
from ..config import COMPUTE, Config
from ..errors import ArgumentError, CommTimeout, ConfigError
from ..holepunch.server import RendezvousServer
from ..local import local_peers
from ..wire.serialize import dumps
from .calibration import (
    ChannelCalibration,
    measure_reduce_bandwidth,
    model_section,
    write_models,
)
from .progress import ProgressBar, progress_bar
from .tables import render_table
from .units import fmt_bytes, fmt_rate, fmt_seconds, parse_sizes

__all__ = [
    "add_calibrate_arguments",
    "calibrate",
    "calibrate_channel",
    "cmd_calibrate",
    "describe",
    "local_group",
    "measurable",
]

logger = logging.getLogger(__name__)

KiB, MiB = 1024, 1024 * 1024
DIRECT_SIZES = (8, KiB, 64 * KiB, MiB, 4 * MiB)
STORAGE_SIZES = (8, KiB, 64 * KiB, MiB)
_MIN_REPS = 3
_SAMPLE_SECONDS = 2e-3  # direct round trips are repeated until a sample is this long


def measurable() -> list[str]:
    """The channels ``fmi calibrate`` can measure from one machine (the registry says)."""
    return [entry.name for entry in registry.channels() if entry.measurable]


def _default_sizes(name: str) -> tuple[int, ...]:
    direct = registry.canonical(name) is not None and registry.spec(name).kind == "direct"
    return DIRECT_SIZES if direct else STORAGE_SIZES


# ---------------------------------------------------------------- groups of local peers


@contextlib.asynccontextmanager
async def local_group(
    peers: int, config: Config, channels: Sequence[str], *, timeout: float = 30.0
) -> AsyncIterator[list[Communicator]]:
    """``peers`` open communicators in this process with exactly ``channels`` enabled.

    TCP gets its own rendezvous server on 127.0.0.1 (the config's TCP address
    is not used: the peers are here); storage channels use the config's
    backend options, which must be present: raises
    :class:`~fmi_async.errors.ConfigError` naming the section to add when not.
    """
    data = config.to_dict()
    data.pop("channel", None)
    backends: dict[str, dict[str, Any]] = {}
    server = None
    try:
        for name in channels:
            if name == "memory":
                continue
            if name == "tcp":
                secret = secrets.token_urlsafe(16)
                server = RendezvousServer(secret.encode())
                await server.start("127.0.0.1", 0)
                host, port = server.address[:2]
                backends["tcp"] = {"enabled": True, "host": host, "port": port}
                data["security"] = {"secret": secret}
            elif name in config.backends:
                backends[name] = {**config.backends[name], "enabled": True}
            else:
                raise ConfigError(
                    f"channel {name} has no backend in the config: add backends."
                    f"{registry.spec(name).config_name} with its endpoint to measure it"
                )
        data["backends"] = backends
        cfg = Config.from_dict(data)
        run_id = uuid.uuid4().hex[:12]
        if "memory" in channels:
            async with local_peers(peers, cfg, run_id=run_id, timeout=timeout) as comms:
                yield comms
            return
        comms = [Communicator(i, peers, cfg, run_id=run_id, timeout=timeout) for i in range(peers)]
        try:
            await asyncio.gather(*(c.open() for c in comms))
            yield comms
        finally:
            await asyncio.gather(*(c.close() for c in comms), return_exceptions=True)
    finally:
        if server is not None:
            await server.close()


# ---------------------------------------------------------------- measurements


def _array(nbytes: int) -> np.ndarray:
    return np.zeros(nbytes, dtype=np.uint8)


async def _pingpong(a: Communicator, b: Communicator, value: Any, iters: int) -> float:
    """Seconds of one one-way message: ``iters`` round trips, halved and averaged."""

    async def echo() -> None:
        for _ in range(iters):
            await b.send(await b.recv(a.rank, "calibrate"), a.rank, "calibrate")

    async def ping() -> float:
        start = time.perf_counter()
        for _ in range(iters):
            await a.send(value, b.rank, "calibrate")
            await a.recv(b.rank, "calibrate")
        return time.perf_counter() - start

    elapsed, _ = await asyncio.gather(ping(), echo())
    return elapsed / iters / 2


async def _one_way(
    name: str,
    comms: Sequence[Communicator],
    kind: str,
    sizes: Sequence[int],
    reps: int,
    budget: float,
    progress: ProgressBar,
) -> dict[int, list[float]]:
    a, b = comms[0], comms[1]
    per_size = budget / len(sizes)
    # A message over storage is a put and a get: two of the requests t(n) models.
    per_unit = 1 if kind == "direct" else 2
    out: dict[int, list[float]] = {}
    for n in sizes:
        value = _array(n)
        first = await _pingpong(a, b, value, 1)  # warm-up: connections, buffers
        iters = 1
        if kind == "direct":
            iters = max(1, min(1000, math.ceil(_SAMPLE_SECONDS / max(2 * first, 1e-7))))
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < reps:
            samples.append(await _pingpong(a, b, value, iters) / per_unit)
            if len(samples) >= _MIN_REPS and time.perf_counter() - start > per_size:
                break
        out[n] = samples
        progress.set_postfix_str(f"{name} {fmt_bytes(n)}", refresh=False)
        progress.update()
    return out


async def _direct_aggregate(
    comms: Sequence[Communicator], nbytes: int, reps: int, budget: float
) -> list[float]:
    """Bytes/s of ``P/2`` pairs each sending ``nbytes`` at once (acknowledged)."""
    pairs = [(comms[i], comms[i + 1]) for i in range(0, len(comms) - 1, 2)]
    value = _array(nbytes)

    async def pair(src: Communicator, dst: Communicator) -> None:
        async def receive() -> None:
            await dst.recv(src.rank, "aggregate")
            await dst.send(b"", src.rank, "aggregate")

        async def send() -> None:
            await src.send(value, dst.rank, "aggregate")
            await src.recv(dst.rank, "aggregate")

        await asyncio.gather(send(), receive())

    samples: list[float] = []
    start = time.perf_counter()
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        await asyncio.gather(*(pair(s, d) for s, d in pairs))
        if rep:  # the first round warms up
            samples.append(len(pairs) * nbytes / (time.perf_counter() - t0))
        if len(samples) >= _MIN_REPS and time.perf_counter() - start > budget:
            break
    return samples


async def _storage_aggregate(
    name: str, comms: Sequence[Communicator], nbytes: int, reps: int, budget: float
) -> list[float]:
    """Bytes/s that ``P - 1`` readers get out of one stored object at once.

    Uses the channel objects directly: the communicator's mediated bcast
    would mix the put and the readers' polling into the figure.  Raises
    :class:`~fmi_async.errors.ArgumentError` for a channel that is not mediated.
    """
    config, peers, timeout = comms[0].config, len(comms), comms[0].timeout
    cls = channel_class(name)
    if not issubclass(cls, MediatedChannel):
        raise ArgumentError(f"channel {name!r} stores nothing: it has no aggregate read rate")
    run_id = uuid.uuid4().hex[:12]
    chans: list[MediatedChannel] = [
        cls(ChannelContext(i, peers, "fmi-calibrate", run_id, config, Mailbox(i)))
        for i in range(peers)
    ]
    payload = dumps(_array(nbytes))
    samples: list[float] = []
    try:
        await asyncio.gather(*(c.open() for c in chans))
        start = time.perf_counter()
        for rep in range(reps + 1):
            key = ("calibrate", rep)
            await chans[0].put(key, payload)
            t0 = time.perf_counter()
            await asyncio.gather(*(c.get(key, timeout) for c in chans[1:]))
            if rep:
                samples.append((peers - 1) * nbytes / (time.perf_counter() - t0))
            if len(samples) >= _MIN_REPS and time.perf_counter() - start > budget:
                break
    finally:
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)
    return samples


async def calibrate_channel(
    name: str,
    config: Config,
    *,
    peers: int = 4,
    sizes: Sequence[int] | None = None,
    reps: int = 25,
    budget: float = 3.0,
    progress: ProgressBar | None = None,
) -> ChannelCalibration:
    """Measure one channel (see the module docstring) and fit its model.

    Raises :class:`~fmi_async.errors.ArgumentError` for a channel that cannot
    be measured here or fewer than 2 peers, :class:`~fmi_async.errors.ConfigError`
    for a storage channel without a backend in the config, and
    :class:`~fmi_async.errors.CommTimeout` when the whole measurement takes
    longer than its deadline (``60 + 20 * budget`` seconds).
    """
    if name not in measurable():
        raise ArgumentError(
            f"cannot calibrate channel {name!r} here; measurable: {', '.join(measurable())}"
        )
    if peers < 2:
        raise ArgumentError(f"calibration needs at least 2 peers, got {peers}")
    kind = registry.spec(name).kind
    sizes = sorted(sizes or _default_sizes(name))
    bar = progress or progress_bar(len(sizes) + 1, f"calibrate {name}", enabled=False)
    if name == "mpi":  # ranks are processes of their own: every rank runs this
        from .calibrate_mpi import calibrate_mpi

        try:
            async with asyncio.timeout(60.0 + 20.0 * budget):
                mine = await calibrate_mpi(config, sizes, reps=reps, budget=budget, bar=bar)
        except TimeoutError:
            raise CommTimeout(f"calibrating mpi took more than {60 + 20 * budget:.0f}s") from None
        finally:
            if progress is None:
                bar.close()
        return mine if mine is not None else ChannelCalibration(name, kind, peers)
    result = ChannelCalibration(name, kind, peers)
    began = time.perf_counter()
    # Every wait inside is bounded by the communicators' timeout; this bounds the whole.
    limit = 60.0 + 20.0 * budget
    try:
        async with asyncio.timeout(limit), local_group(peers, config, [name]) as comms:
            result.samples = await _one_way(name, comms, kind, sizes, reps, budget * 0.75, bar)
            result.aggregate_size = sizes[-1]
            if kind == "direct":
                agg = await _direct_aggregate(comms, sizes[-1], reps, budget * 0.25)
            else:
                agg = await _storage_aggregate(name, comms, sizes[-1], reps, budget * 0.25)
            bar.set_postfix_str(f"{name} aggregate", refresh=False)
            bar.update()
    except TimeoutError:
        raise CommTimeout(
            f"calibrating {name} took more than {limit:.0f}s; check that its backend answers "
            "(endpoint in the config) or lower --sizes/--reps"
        ) from None
    finally:
        if progress is None:
            bar.close()
    result.finish(agg, began)
    return result


async def calibrate(
    config: Config,
    channels: Sequence[str],
    *,
    peers: int = 4,
    sizes: Sequence[int] | None = None,
    reps: int = 25,
    budget: float = 3.0,
    show_progress: bool = True,
) -> list[ChannelCalibration]:
    """Measure every channel in ``channels`` in turn (one at a time: they share the CPU).

    Raises what :func:`calibrate_channel` raises.
    """
    steps = sum(len(sizes or _default_sizes(c)) + 1 for c in channels)
    progress = progress_bar(steps, "calibrate", enabled=show_progress)
    try:
        return [
            await calibrate_channel(
                name,
                config,
                peers=peers,
                sizes=sizes,
                reps=reps,
                budget=budget,
                progress=progress,
            )
            for name in channels
        ]
    finally:
        progress.close()


# ---------------------------------------------------------------- fmi calibrate


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi calibrate``."""
    parser.add_argument(
        "--config",
        type=Path,
        help="JSON config (backends to measure); the mpi channel is measured between the "
        "ranks of `mpiexec -n P fmi calibrate --channels mpi`",
    )
    parser.add_argument(
        "--channels",
        help="comma-separated channels (default: the config's enabled backends that can be "
        "measured here, else memory,tcp)",
    )
    parser.add_argument("--peers", type=int, default=4, help="peers for the aggregate bandwidth")
    parser.add_argument(
        "--sizes",
        help="comma-separated message sizes (default 8,1KiB,64KiB,1MiB,4MiB; storage up to 1MiB)",
    )
    parser.add_argument(
        "--reps", type=int, default=25, help="repetitions per size (at most; --budget bounds them)"
    )
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds to spend per channel (about)"
    )
    parser.add_argument("--write", action="store_true", help="write the models into --config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _chosen_channels(config: Config, text: str | None) -> list[str]:
    if text:
        names = [registry.canonical(n.strip()) or n.strip() for n in text.split(",")]
        names = [n for n in names if n]
    else:
        names = [n for n in config.enabled() if n in measurable()] or ["memory", "tcp"]
    bad = [n for n in names if n not in measurable()]
    if bad:
        raise ArgumentError(f"cannot calibrate {bad} here; measurable: {', '.join(measurable())}")
    return list(dict.fromkeys(names))


def _mpi_rank_zero() -> bool:
    from mpi4py import MPI

    return bool(MPI.COMM_WORLD.Get_rank() == 0)


def describe(results: Sequence[ChannelCalibration]) -> str:
    """The fitted parameters with their interquartile ranges, and the medians."""
    rows = []
    for r in results:
        lo, hi = r.bandwidth_iqr
        rows.append(
            [
                r.channel,
                r.unit,
                f"{fmt_seconds(r.overhead)} ({fmt_seconds(r.overhead_iqr[0])}.."
                f"{fmt_seconds(r.overhead_iqr[1])})",
                f"{fmt_rate(r.bandwidth)} ({fmt_rate(lo)}..{fmt_rate(hi)})",
                f"{fmt_rate(r.aggregate_bandwidth)} ({fmt_rate(r.aggregate_iqr[0])}.."
                f"{fmt_rate(r.aggregate_iqr[1])})",
                f"{r.seconds:.1f} s",
            ]
        )
    out = [
        render_table(
            ["channel", "t(n) per", "overhead (IQR)", "bandwidth (IQR)", "aggregate (IQR)", "took"],
            rows,
        ),
        "",
        "median time per message (direct) or request (storage = one-way message / 2):",
    ]
    for r in results:
        cells = [f"{fmt_bytes(n)} {fmt_seconds(t)}" for n, t in r.medians().items()]
        out.append(f"  {r.channel:<8} " + " | ".join(cells))
    return "\n".join(out)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure, print, and with ``--write`` update the config file.

    Raises :class:`~fmi_async.errors.ArgumentError` for bad arguments, and
    what :func:`calibrate` and :func:`~fmi_async.tools.calibration.write_models`
    raise.
    """
    if args.write and args.config is None:
        raise ArgumentError("--write needs --config FILE: the file whose model section to update")
    if args.peers < 2:
        raise ArgumentError(f"--peers must be at least 2, got {args.peers}")
    if args.reps < _MIN_REPS:
        raise ArgumentError(f"--reps must be at least {_MIN_REPS}, got {args.reps}")
    if args.budget <= 0:
        raise ArgumentError("--budget must be a positive number of seconds")
    config = Config.load(args.config) if args.config is not None else Config()
    channels = _chosen_channels(config, args.channels)
    sizes = parse_sizes(args.sizes) if args.sizes else None
    results = asyncio.run(
        calibrate(
            config,
            channels,
            peers=args.peers,
            sizes=sizes,
            reps=args.reps,
            budget=args.budget,
            show_progress=not args.no_progress,
        )
    )
    if "mpi" in channels and not _mpi_rank_zero():
        return 0  # rank 0 of the mpiexec job reports and writes
    reduce_bandwidth = measure_reduce_bandwidth()
    where = "the ranks of the mpiexec job" if "mpi" in channels else "in one process"
    print(f"fitted t(n) = overhead + n / bandwidth, {args.peers} peers {where}:")
    print(describe(results))
    print(f"\nfolding (numpy SUM, float64, 8 MiB, new result): {fmt_rate(reduce_bandwidth)}")
    if args.write:
        write_models(args.config, results, reduce_bandwidth)
        names = [*(r.channel for r in results), COMPUTE]
        print(f"\nwrote model.{{{','.join(names)}}} into {args.config}")
    else:
        print("\nmodel section (--write puts it into --config):")
        print(json.dumps(model_section(results, reduce_bandwidth), indent=2))
    return 0
