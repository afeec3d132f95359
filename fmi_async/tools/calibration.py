"""What ``fmi calibrate`` found: the fit, its spread, and the config it writes.

A channel's one-way times are fitted to ``t(n) = overhead + n / bandwidth``
by weighted least squares over the per-size medians, each weighted by
``1 / t^2`` (relative error): plain least squares would let the largest size
decide alone and leave the overhead, which small messages pay, to chance.
The spread is the fit repeated on bootstrap resamples of the repetitions,
reported as the interquartile range.

The fitted parameters go into a config's ``model`` section in our units
(``overhead_s``, ``bandwidth_Bps``, ``aggregate_bandwidth_Bps``,
``concurrency``), which :func:`~fmi_async.selection.model.from_fmi` reads
with precedence over FMI's.  The measurements themselves are in
:mod:`fmi_async.tools.calibrate`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..channels import registry
from ..config import COMPUTE, Config
from ..errors import ArgumentError, ConfigError
from ..selection.model import ChannelModel, CostModel, load_cost_model, load_models
from .units import fmt_rate, fmt_seconds

__all__ = [
    "ChannelCalibration",
    "cost_model_from",
    "fit_line",
    "measure_reduce_bandwidth",
    "model_section",
    "models_from",
    "write_models",
]

logger = logging.getLogger(__name__)

_BOOTSTRAP = 200
_MAX_BANDWIDTH = 1e12  # a fit that finds no size dependence says "at least this"


def fit_line(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """``(overhead seconds, bandwidth bytes/s)`` of ``t = overhead + n / bandwidth``.

    Weighted least squares with weights ``1 / t^2``, so each size counts by
    its relative error.  The overhead is kept positive (a fit through noise can
    cross zero) and a slope that is not positive means "no measurable
    bandwidth limit": bandwidth is then reported as 1e12 B/s.  Raises
    :class:`~fmi_async.errors.ArgumentError` when the lists differ in length
    or are empty.
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


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single one)."""
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
        """The median time of each size, by size."""
        return {n: statistics.median(ts) for n, ts in sorted(self.samples.items())}

    def finish(self, aggregates: Sequence[float], began: float) -> None:
        """Take the aggregate bandwidth samples, fit, and note the time since ``began``
        (``perf_counter``).  Raises what :meth:`fit` raises."""
        self.aggregate_bandwidth = statistics.median(aggregates)
        self.aggregate_iqr = quartiles(aggregates)
        self.fit()
        self.seconds = time.perf_counter() - began
        logger.info("calibrated %r in %.1fs", self, self.seconds)

    def fit(self, seed: int = 0) -> None:
        """Fit the medians, and bootstrap the repetitions for the spread.

        Raises :class:`~fmi_async.errors.ArgumentError` when there are no samples.
        """
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
        self.overhead_iqr = quartiles(overheads)
        self.bandwidth_iqr = quartiles(bandwidths)

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
    """The ``model`` section the results make, with the ``compute`` entry if measured."""
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
    """The channel models a config would load after ``--write`` (calibrated numbers win).

    Raises :class:`~fmi_async.errors.ConfigError` when the config's model is invalid.
    """
    return load_models(_merged(results, config, None))


def cost_model_from(
    results: Sequence[ChannelCalibration],
    config: Config | None = None,
    reduce_bandwidth: float | None = None,
) -> CostModel:
    """The whole model a config would load after ``--write``, compute entry included.

    Raises :class:`~fmi_async.errors.ConfigError` when the config's model is invalid.
    """
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


def write_models(
    path: Path, results: Sequence[ChannelCalibration], reduce_bandwidth: float | None = None
) -> None:
    """Put the fitted numbers into ``path``'s ``model`` section, keeping the rest.

    An existing entry for the channel (under any of its names, such as FMI's
    ``Direct`` for TCP) is updated in place, so FMI's own keys stay next to
    ours (ours take precedence when loaded).  The file is validated before
    it is replaced, and replaced atomically.  Raises
    :class:`~fmi_async.errors.ConfigError` when the file cannot be read, is
    not a JSON object, or would not load afterwards (the file is then left
    as it was).
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
        keys = [k for k in model if registry.canonical(k) == r.channel]
        for key in keys or [registry.spec(r.channel).config_name]:
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
