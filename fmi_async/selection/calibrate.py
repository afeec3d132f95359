"""``fmi calibrate``: measure the channels and write their models into the config.

The defaults of :mod:`fmi_async.selection.model` are other people's
measurements (FMI's, on AWS).  Plans are only as good as those numbers, so
this command measures the channels where the job will run and writes the
fitted parameters into the config's ``model`` section in our units
(``overhead_s``, ``bandwidth_Bps``, ``aggregate_bandwidth_Bps``), which
:func:`~fmi_async.selection.model.from_fmi` reads with precedence over FMI's.

What is measured, all from this process:

* **one-way time** at several sizes: a ping-pong of a numpy ``uint8`` array
  through ``Communicator.send``/``recv`` between peers 0 and 1, halved, so it
  includes serialization and matching exactly as collectives see them.  The
  memory channel uses :func:`fmi_async.local_peers`; TCP an in-process
  :class:`~fmi_async.holepunch.server.RendezvousServer` on 127.0.0.1; Redis,
  S3 and DynamoDB the backends (endpoints) of the config.  Over storage a
  message is a put and a get, which the plan models as two requests
  (``2 t(n)``), so the per-request time written is the one-way time / 2.
* the fit ``t(n) = overhead + n / bandwidth`` by weighted least squares over
  the per-size medians, each weighted by ``1 / t^2`` (relative error): plain
  least squares would let the largest size decide alone and leave the
  overhead, which small messages pay, to chance;
* the **spread**: the fit repeated on bootstrap resamples of the
  repetitions, reported as the interquartile range;
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
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..channels import channel_class
from ..channels.base import Channel, Mailbox
from ..communicator import Communicator
from ..config import BACKEND_ALIASES, COMPUTE, Config
from ..errors import ArgumentError, CommTimeout, ConfigError, FMIError
from ..local import local_peers
from ..wire import dumps
from .model import ChannelModel, CostModel, load_cost_model, load_models
from .report import CHANNEL_KINDS, fmt_bytes, fmt_rate, fmt_seconds, parse_sizes, render_table

__all__ = [
    "ChannelCalibration",
    "MEASURABLE",
    "Progress",
    "add_calibrate_arguments",
    "calibrate",
    "cmd_calibrate",
    "fit_line",
    "local_group",
    "main_calibrate",
    "model_section",
    "models_from",
    "write_models",
]

logger = logging.getLogger(__name__)

MEASURABLE = ("memory", "tcp", "redis", "s3", "dynamodb")
CONFIG_NAMES = {"memory": "Memory", "tcp": "TCP", "redis": "Redis", "s3": "S3"}
CONFIG_NAMES["dynamodb"] = "DynamoDB"
KiB, MiB = 1024, 1024 * 1024
DIRECT_SIZES = (8, KiB, 64 * KiB, MiB, 4 * MiB)
STORAGE_SIZES = (8, KiB, 64 * KiB, MiB)
_MIN_REPS = 3
_SAMPLE_SECONDS = 2e-3  # direct round trips are repeated until a sample is this long
_BOOTSTRAP = 200
_MAX_BANDWIDTH = 1e12  # a fit that finds no size dependence says "at least this"


# ---------------------------------------------------------------- progress bar


class Progress:
    """A one-line progress bar on stderr.

    On a terminal it redraws in place at most ten times a second; into a
    file or pipe it writes a line per tenth of the work, so logs stay short.
    """

    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._last_tenth = -1
        self._start = time.monotonic()

    def __repr__(self) -> str:
        return f"<Progress {self.label!r} {self.done}/{self.total}>"

    def advance(self, note: str = "", steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        if not self.enabled:
            return
        now = time.monotonic()
        tenth = self.done * 10 // self.total
        if self._tty and (now - self._last_draw >= 0.1 or self.done == self.total):
            self._last_draw = now
            filled = self.done * 30 // self.total
            bar = "#" * filled + "." * (30 - filled)
            line = (
                f"\r{self.label} [{bar}] {self.done}/{self.total} {now - self._start:.0f}s {note}"
            )
            self.stream.write(line[:150].ljust(80))
            self.stream.flush()
        elif not self._tty and tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(f"{self.label} {self.done}/{self.total} {note}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- fitting


def fit_line(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """``(overhead seconds, bandwidth bytes/s)`` of ``t = overhead + n / bandwidth``.

    Weighted least squares with weights ``1 / t^2``, so each size counts by
    its relative error.  The overhead is kept positive (a fit through noise can
    cross zero) and a slope that is not positive means "no measurable
    bandwidth limit": bandwidth is then reported as 1e12 B/s.
    """
    if len(sizes) != len(times) or not sizes:
        raise ArgumentError("fit_line needs as many times as sizes, at least one")
    w = [1.0 / max(t, 1e-12) ** 2 for t in times]
    sw = sum(w)
    sx = sum(wi * x for wi, x in zip(w, sizes, strict=True))
    sy = sum(wi * y for wi, y in zip(w, times, strict=True))
    sxx = sum(wi * x * x for wi, x in zip(w, sizes, strict=True))
    sxy = sum(wi * x * y for wi, x, y in zip(w, sizes, times, strict=True))
    det = sw * sxx - sx * sx
    if len(set(sizes)) < 2 or det <= 0:
        return max(sy / sw, 1e-9), _MAX_BANDWIDTH
    slope = (sw * sxy - sx * sy) / det
    intercept = (sy - slope * sx) / sw
    floor = 1e-3 * min(times)
    if intercept < floor:  # constrained optimum on the boundary overhead = floor
        intercept = floor
        slope = sum(wi * x * (y - floor) for wi, x, y in zip(w, sizes, times, strict=True)) / sxx
    if slope <= 1.0 / _MAX_BANDWIDTH:
        return intercept, _MAX_BANDWIDTH
    return intercept, 1.0 / slope


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


@dataclass
class ChannelCalibration:
    """What ``fmi calibrate`` measured and fitted for one channel."""

    channel: str
    kind: str
    peers: int
    samples: dict[int, list[float]] = field(default_factory=dict)  # size -> seconds per unit
    overhead: float = 0.0
    bandwidth: float = 0.0
    overhead_iqr: tuple[float, float] = (0.0, 0.0)
    bandwidth_iqr: tuple[float, float] = (0.0, 0.0)
    aggregate_bandwidth: float = 0.0
    aggregate_iqr: tuple[float, float] = (0.0, 0.0)
    aggregate_size: int = 0
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (
            f"<ChannelCalibration {self.channel} overhead={fmt_seconds(self.overhead)} "
            f"bandwidth={fmt_rate(self.bandwidth)} aggregate={fmt_rate(self.aggregate_bandwidth)}>"
        )

    @property
    def unit(self) -> str:
        """What one ``t(n)`` is: a message (direct) or a request (storage)."""
        return "message" if self.kind == "direct" else "request"

    def medians(self) -> dict[int, float]:
        return {n: statistics.median(ts) for n, ts in sorted(self.samples.items())}

    def fit(self, seed: int = 0) -> None:
        """Fit the medians, and bootstrap the repetitions for the spread."""
        med = self.medians()
        self.overhead, self.bandwidth = fit_line(list(med), list(med.values()))
        rng = random.Random(seed)
        overheads, bandwidths = [], []
        for _ in range(_BOOTSTRAP):
            boot = {
                n: statistics.median(rng.choices(ts, k=len(ts))) for n, ts in self.samples.items()
            }
            o, b = fit_line(list(boot), list(boot.values()))
            overheads.append(o)
            bandwidths.append(b)
        self.overhead_iqr = _quartiles(overheads)
        self.bandwidth_iqr = _quartiles(bandwidths)

    def model_entry(self) -> dict[str, float]:
        """This channel's entry of a config's ``model`` section, in our units."""
        return {
            "overhead_s": float(f"{self.overhead:.6g}"),
            "bandwidth_Bps": float(f"{self.bandwidth:.6g}"),
            "aggregate_bandwidth_Bps": float(f"{self.aggregate_bandwidth:.6g}"),
            "concurrency": self.concurrency,
        }

    @property
    def concurrency(self) -> float:
        """How many transfers proceed at once: concurrent streams over one stream,
        ~1 where the peers measured share one event loop or CPU (a local run),
        larger across machines.  The memory channel's peers share one event loop
        by construction, so it is 1 whatever the noisy ratio says."""
        if self.channel == "memory" or self.bandwidth <= 0:
            return 1.0
        return float(f"{max(1.0, self.aggregate_bandwidth / self.bandwidth):.3g}")


def model_section(
    results: Sequence[ChannelCalibration], reduce_bandwidth: float | None = None
) -> dict[str, dict[str, float]]:
    section = {r.channel: r.model_entry() for r in results}
    if reduce_bandwidth is not None:
        section[COMPUTE] = {"reduce_bandwidth_Bps": float(f"{reduce_bandwidth:.6g}")}
    return section


def _merged(
    results: Sequence[ChannelCalibration], config: Config | None, reduce_bandwidth: float | None
) -> dict[str, dict[str, Any]]:
    section: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (config or Config()).model.items()}
    for name, entry in model_section(results, reduce_bandwidth).items():
        section.setdefault(name, {}).update(entry)
    return section


def models_from(
    results: Sequence[ChannelCalibration], config: Config | None = None
) -> dict[str, ChannelModel]:
    """The channel models a config would load after ``--write`` (calibrated numbers win)."""
    return load_models(_merged(results, config, None))


def cost_model_from(
    results: Sequence[ChannelCalibration],
    config: Config | None = None,
    reduce_bandwidth: float | None = None,
) -> CostModel:
    """The whole model a config would load after ``--write``, compute entry included."""
    return load_cost_model(_merged(results, config, reduce_bandwidth))


def measure_reduce_bandwidth(nbytes: int = 8 << 20, reps: int = 15) -> float:
    """Bytes per second numpy's SUM folds float64 arrays into a new result.

    A new result each time, as the collectives fold (the result's pages are
    touched for the first time whenever the allocator hands out fresh memory).
    """
    a = np.ones(max(1, nbytes // 8))
    b = np.ones_like(a)
    times = []
    for _ in range(max(3, reps)):
        start = time.perf_counter()
        np.add(a, b)
        times.append(time.perf_counter() - start)
    return a.nbytes / max(statistics.median(times), 1e-9)


# ---------------------------------------------------------------- groups of local peers


@contextlib.asynccontextmanager
async def local_group(
    peers: int, config: Config, channels: Sequence[str], *, timeout: float = 30.0
) -> AsyncIterator[list[Communicator]]:
    """``peers`` open communicators in this process with exactly ``channels`` enabled.

    TCP gets its own rendezvous server on 127.0.0.1 (the config's TCP address
    is not used: the peers are here); storage channels use the config's
    backend options, which must be present.
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
                from ..holepunch.server import RendezvousServer

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
                    f"{CONFIG_NAMES.get(name, name)} with its endpoint to measure it"
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
    progress: Progress,
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
        progress.advance(f"{name} {fmt_bytes(n)}")
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
    would mix the put and the readers' polling into the figure.
    """
    config, peers, timeout = comms[0].config, len(comms), comms[0].timeout
    cls = channel_class(name)
    run_id = uuid.uuid4().hex[:12]
    chans: list[Channel] = [
        cls(i, peers, "fmi-calibrate", run_id, config, Mailbox(i)) for i in range(peers)
    ]
    payload = dumps(_array(nbytes))
    samples: list[float] = []
    try:
        await asyncio.gather(*(c.open() for c in chans))
        start = time.perf_counter()
        for rep in range(reps + 1):
            key = ("calibrate", rep)
            await chans[0].put(key, payload)  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            await asyncio.gather(*(c.get(key, timeout) for c in chans[1:]))  # type: ignore[attr-defined]
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
    progress: Progress | None = None,
) -> ChannelCalibration:
    """Measure one channel (see the module docstring) and fit its model."""
    if name not in MEASURABLE:
        raise ArgumentError(
            f"cannot calibrate channel {name!r} here; measurable: {', '.join(MEASURABLE)}"
        )
    if peers < 2:
        raise ArgumentError(f"calibration needs at least 2 peers, got {peers}")
    kind = CHANNEL_KINDS[name]
    sizes = sorted(sizes or (DIRECT_SIZES if kind == "direct" else STORAGE_SIZES))
    progress = progress or Progress(len(sizes) + 1, f"calibrate {name}", enabled=False)
    result = ChannelCalibration(name, kind, peers)
    began = time.perf_counter()
    # Every wait inside is bounded by the communicators' timeout; this bounds the whole.
    limit = 60.0 + 20.0 * budget
    try:
        async with asyncio.timeout(limit), local_group(peers, config, [name]) as comms:
            result.samples = await _one_way(name, comms, kind, sizes, reps, budget * 0.75, progress)
            result.aggregate_size = sizes[-1]
            if kind == "direct":
                agg = await _direct_aggregate(comms, sizes[-1], reps, budget * 0.25)
            else:
                agg = await _storage_aggregate(name, comms, sizes[-1], reps, budget * 0.25)
            progress.advance(f"{name} aggregate")
    except TimeoutError:
        raise CommTimeout(
            f"calibrating {name} took more than {limit:.0f}s; check that its backend answers "
            "(endpoint in the config) or lower --sizes/--reps"
        ) from None
    result.aggregate_bandwidth = statistics.median(agg)
    result.aggregate_iqr = _quartiles(agg)
    result.fit()
    result.seconds = time.perf_counter() - began
    logger.info("calibrated %r in %.1fs", result, result.seconds)
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
    """Measure every channel in ``channels`` in turn (one at a time: they share the CPU)."""
    steps = sum(
        len(sizes or (DIRECT_SIZES if CHANNEL_KINDS.get(c) == "direct" else STORAGE_SIZES)) + 1
        for c in channels
    )
    progress = Progress(steps, "calibrate", enabled=show_progress)
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


# ---------------------------------------------------------------- writing the config


def write_models(
    path: Path, results: Sequence[ChannelCalibration], reduce_bandwidth: float | None = None
) -> None:
    """Put the fitted numbers into ``path``'s ``model`` section, keeping the rest.

    An existing entry for the channel (under any of its names, such as FMI's
    ``Direct`` for TCP) is updated in place, so FMI's own keys stay next to
    ours (ours take precedence when loaded).  The file is validated before
    it is replaced, and replaced atomically.
    """
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: model must be an object keyed by backend name")
    for r in results:
        keys = [k for k in model if BACKEND_ALIASES.get(str(k).lower()) == r.channel]
        for key in keys or [CONFIG_NAMES[r.channel]]:
            entry = model.setdefault(key, {})
            if not isinstance(entry, dict):
                raise ConfigError(f"{path}: model.{key} must be an object")
            entry.update(r.model_entry())
    if reduce_bandwidth is not None:
        compute = next((k for k in model if str(k).lower() == COMPUTE), COMPUTE)
        entry = model.setdefault(compute, {})
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: model.{compute} must be an object")
        entry.update(model_section([], reduce_bandwidth)[COMPUTE])
    checked = Config.from_dict(raw, origin=str(path))
    load_cost_model(checked.model)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- fmi calibrate


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fmi calibrate``."""
    parser.add_argument("--config", type=Path, help="JSON config (backends to measure)")
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
        names = [BACKEND_ALIASES.get(n.strip().lower(), n.strip()) for n in text.split(",")]
        names = [n for n in names if n]
    else:
        names = [n for n in config.enabled() if n in MEASURABLE] or ["memory", "tcp"]
    bad = [n for n in names if n not in MEASURABLE]
    if bad:
        raise ArgumentError(f"cannot calibrate {bad} here; measurable: {', '.join(MEASURABLE)}")
    return list(dict.fromkeys(names))


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
    """Measure, print, and with ``--write`` update the config file."""
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
    reduce_bandwidth = measure_reduce_bandwidth()
    print(f"fitted t(n) = overhead + n / bandwidth, {args.peers} peers in one process:")
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


def main_calibrate(argv: Sequence[str] | None = None) -> int:
    """``fmi calibrate`` without the ``fmi`` command (returns the exit code)."""
    parser = argparse.ArgumentParser(prog="fmi calibrate")
    add_calibrate_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_calibrate(args)
    except FMIError as exc:
        print(f"fmi calibrate: {exc}", file=sys.stderr)
        return 2
