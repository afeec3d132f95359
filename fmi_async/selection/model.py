"""Performance and dollar-cost models of the channels, in units a reader can check.

Every number here is in SI units: seconds, bytes per second, US dollars.
FMI's ``model`` section (overhead in milliseconds, bandwidth in MB/s, prices
in dollars) is converted on load (:func:`from_fmi`).

A channel's model has

* ``overhead`` -- seconds per message (direct channels) or per request
  (storage), independent of size;
* ``bandwidth`` -- bytes per second of one stream; ``aggregate_bandwidth`` --
  bytes per second the backend serves to many concurrent readers in total;
* ``request_prices`` -- dollars per request, by the request kind the channel
  counts in ``stats.requests`` (S3 operation names, DynamoDB capacity units);
* ``price_per_gb`` -- dollars per GB moved (data transfer);
* ``infra_per_hour`` -- dollars per hour of infrastructure the channel needs
  (a Redis node, the rendezvous VM), amortised over ``requests_per_hour``
  messages or requests of the whole workload (FMI's ``requests_per_hour``;
  our default assumes a busy node, 100 000 an hour, about 28 a second);
* ``concurrency`` -- how much of the group's work proceeds at once (see the
  field's comment): a plan takes at least its total work divided by it;
* ``request_gap`` -- seconds between the starts of two requests one peer
  has in flight at once (storage): the client's own work per request
  (signing, HTTP, parsing), which concurrent requests of one peer do not
  overlap.  A peer that issues ``k`` requests at once has the last one
  answered ``(k - 1) * request_gap`` after the first.

The function itself costs ``faas_gb_second`` dollars per GB-second of its
memory for the time it runs, on every peer.

Default prices are AWS list prices, us-east-1, on-demand, as published in
2025; default performance is FMI's measurements (ICS 2023, section 5) for the
cloud channels and loopback measurements for memory/TCP.  Each channel's
defaults are part of its entry in :mod:`fmi_async.channels.registry`.  ``fmi calibrate``
measures the configured channels and writes the numbers back into the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..channels import registry
from ..config import COMPUTE
from ..errors import ConfigError

__all__ = [
    "ChannelModel",
    "CostModel",
    "default_models",
    "FAAS_GB_SECOND",
    "REDUCE_BANDWIDTH",
    "from_fmi",
    "load_cost_model",
    "load_models",
]

# AWS Lambda, x86, first 6 billion GB-seconds a month: $0.0000166667 per GB-s
# (aws.amazon.com/lambda/pricing).
FAAS_GB_SECOND = 0.0000166667

# Bytes of an operand a peer folds into its accumulator per second (the gamma
# of Thakur, Rabenseifner and Gropp's alpha-beta-gamma model): numpy applying
# SUM to float64 arrays into a new result measured medians of 4 GB/s (64 MiB)
# to 25 GB/s (1 MiB) on the development machine, and 0.35-1.8 GB/s in the
# samples whose result pages were touched for the first time; the default
# takes the large-array median.  `fmi calibrate` measures it
# (model.compute.reduce_bandwidth_Bps).
REDUCE_BANDWIDTH = 4.0e9


@dataclass(frozen=True)
class ChannelModel:
    """What one message or request on a channel costs in seconds and dollars."""

    overhead: float
    bandwidth: float
    aggregate_bandwidth: float
    request_prices: Mapping[str, float] = field(default_factory=dict)
    # Request kinds one point-to-point message costs, and one stored object
    # (written once, read by each reader): used by the plan's predictions.
    message_requests: Mapping[str, float] = field(default_factory=dict)
    put_requests: Mapping[str, float] = field(default_factory=dict)
    get_requests: Mapping[str, float] = field(default_factory=dict)
    price_per_gb: float = 0.0
    infra_per_hour: float = 0.0
    requests_per_hour: float = 100_000.0
    # How many messages or requests the whole group can have in progress at
    # once.  Peers on separate machines: unbounded, and a plan's time is its
    # critical path.  Peers sharing one event loop (the memory channel, or a
    # local test of any channel): about 1, and a plan's time is at least all
    # of its work done one piece after another.  `fmi calibrate` measures it.
    concurrency: float = math.inf
    # Seconds one peer spends issuing one request that its other requests in
    # flight cannot overlap (the client's CPU per request): a fan-out of k
    # requests ends (k - 1) * request_gap after a single one.  0 for direct
    # channels, whose per-message cost is in overhead and concurrency.
    request_gap: float = 0.0
    # Request kinds billed per started unit of bytes (DynamoDB's capacity
    # units: "write_units" per KB written, "read_units" per 4 KB read); 0: none.
    write_unit: int = 0
    read_unit: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        for name in (
            "overhead",
            "bandwidth",
            "aggregate_bandwidth",
            "requests_per_hour",
            "request_gap",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"model.{name} must be a finite number >= 0, got {value!r}")
        if self.bandwidth <= 0 or self.aggregate_bandwidth <= 0 or self.requests_per_hour <= 0:
            raise ConfigError("model bandwidths and requests_per_hour must be positive")
        if not isinstance(self.concurrency, (int, float)) or not self.concurrency >= 1:
            raise ConfigError(f"model.concurrency must be >= 1, got {self.concurrency!r}")

    # -- time --------------------------------------------------------------

    def time(self, nbytes: float) -> float:
        """Seconds for one message or request of ``nbytes`` on one stream."""
        return self.overhead + nbytes / self.bandwidth

    def fan_out(self, requests: float) -> float:
        """Seconds after a single request that the last of ``requests`` issued at
        once by one peer is answered (``(requests - 1) * request_gap``)."""
        return max(requests - 1.0, 0.0) * self.request_gap

    def shared_time(self, nbytes: float, readers: int) -> float:
        """Seconds for ``readers`` peers each reading ``nbytes`` at once."""
        per_reader = min(self.bandwidth, self.aggregate_bandwidth / max(readers, 1))
        return self.overhead + nbytes / per_reader

    # -- dollars -------------------------------------------------------------

    def request_cost(self, requests: Mapping[str, float]) -> float:
        return sum(count * self.request_prices.get(kind, 0.0) for kind, count in requests.items())

    def infra_cost(self, requests: float) -> float:
        return self.infra_per_hour / self.requests_per_hour * requests

    def transfer_cost(self, nbytes: float) -> float:
        return nbytes / 1e9 * self.price_per_gb

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("request_prices", "message_requests", "put_requests", "get_requests"):
            out[key] = dict(out[key])
        return out


def _units(nbytes: float, unit: int) -> float:
    return float(max(1, math.ceil(nbytes / unit)))


def default_models() -> dict[str, ChannelModel]:
    """Every registered channel's default model (its numbers and sources: the registry)."""
    return {spec.name: ChannelModel(**spec.model) for spec in registry.channels()}


def message_requests(name: str, model: ChannelModel, nbytes: float) -> dict[str, float]:
    """Requests (by kind) one point-to-point message of ``nbytes`` costs on a channel."""
    out = dict(model.message_requests)
    if model.write_unit:
        out["write_units"] = _units(nbytes, model.write_unit)
    if model.read_unit:
        out["read_units"] = _units(nbytes, model.read_unit)
    return out


def object_requests(
    name: str, model: ChannelModel, nbytes: float, readers: int
) -> dict[str, float]:
    """Requests one stored object costs: one put and ``readers`` gets."""
    out = {k: float(v) for k, v in model.put_requests.items()}
    for k, v in model.get_requests.items():
        out[k] = out.get(k, 0.0) + v * readers
    if model.write_unit:
        out["write_units"] = _units(nbytes, model.write_unit)
    if model.read_unit:
        out["read_units"] = _units(nbytes, model.read_unit) * readers
    return out


@dataclass(frozen=True)
class CostModel:
    """Models of every channel plus the function's own price."""

    channels: Mapping[str, ChannelModel]
    faas_gb_second: float = FAAS_GB_SECOND
    faas_memory_mb: float = 2048.0
    reduce_bandwidth: float = REDUCE_BANDWIDTH  # bytes folded per second by one peer

    def __post_init__(self) -> None:
        r = self.reduce_bandwidth
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 < r < math.inf):
            raise ConfigError(f"model.compute.reduce_bandwidth_Bps must be positive, got {r!r}")

    def channel(self, name: str) -> ChannelModel:
        try:
            return self.channels[name]
        except KeyError:
            raise ConfigError(f"no performance model for channel {name!r}") from None

    def faas_cost(self, seconds: float, peers: int) -> float:
        """Dollars of ``peers`` functions waiting ``seconds``."""
        return seconds * peers * self.faas_memory_mb / 1024.0 * self.faas_gb_second

    def with_memory(self, faas_memory_mb: float) -> CostModel:
        return replace(self, faas_memory_mb=float(faas_memory_mb))


def from_fmi(name: str, section: Mapping[str, Any], base: ChannelModel) -> ChannelModel:
    """Convert one backend of FMI's ``model`` section (or ours) to a :class:`ChannelModel`.

    Our own keys (``overhead_s``, ``bandwidth_Bps``, ``aggregate_bandwidth_Bps``,
    ``request_gap_s``, ``concurrency``, ``request_prices``, ``price_per_gb``,
    ``infra_per_hour``, ``requests_per_hour``)
    take precedence over FMI's (``overhead`` ms, ``bandwidth``/``bandwidth_single``/
    ``bandwidth_multiple`` MB/s, ``transfer_price`` $/GB, ``instance_price``/
    ``vm_price`` $/h, ``download_price``/``upload_price`` $ per request,
    ``include_infrastructure_costs``).
    """

    def num(key: str) -> float | None:
        value = section.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model.{name}.{key} must be a number, got {value!r}")
        return float(value)

    changes: dict[str, Any] = {}
    fmi_overhead = num("overhead")
    if fmi_overhead is not None:
        changes["overhead"] = fmi_overhead / 1e3
    single = num("bandwidth_single") or num("bandwidth")
    if single is not None:
        changes["bandwidth"] = single * 1e6
        multiple = num("bandwidth_multiple")
        changes["aggregate_bandwidth"] = (
            multiple * 1e6 if multiple is not None else max(base.aggregate_bandwidth, single * 1e6)
        )
    transfer = num("transfer_price")
    if transfer is not None:
        changes["price_per_gb"] = transfer
    infra = num("instance_price") if num("instance_price") is not None else num("vm_price")
    if infra is not None:
        include = section.get("include_infrastructure_costs", True)
        changes["infra_per_hour"] = infra if include else 0.0
    rate = num("requests_per_hour")
    if rate is not None:
        changes["requests_per_hour"] = rate
    prices = dict(base.request_prices)
    upload, download = num("upload_price"), num("download_price")
    if name == "s3" and upload is not None:
        for kind in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"):
            prices[kind] = upload
    if name == "s3" and download is not None:
        prices["GetObject"] = download
    # Our units, as written by `fmi calibrate`.
    for ours, field_name in (
        ("overhead_s", "overhead"),
        ("bandwidth_Bps", "bandwidth"),
        ("aggregate_bandwidth_Bps", "aggregate_bandwidth"),
        ("price_per_gb", "price_per_gb"),
        ("infra_per_hour", "infra_per_hour"),
        ("concurrency", "concurrency"),
        ("request_gap_s", "request_gap"),
    ):
        value = num(ours)
        if value is not None:
            changes[field_name] = value
    if isinstance(section.get("request_prices"), Mapping):
        prices.update({str(k): float(v) for k, v in section["request_prices"].items()})
    changes["request_prices"] = prices
    return replace(base, **changes)


def load_models(model_section: Mapping[str, Mapping[str, Any]]) -> dict[str, ChannelModel]:
    """Defaults overlaid with a config's ``model`` section (FMI's or ours)."""
    models = default_models()
    for name, section in model_section.items():
        if name == COMPUTE:
            continue
        base = models.get(name)
        if base is None:
            raise ConfigError(f"model section for unknown channel {name!r}")
        models[name] = from_fmi(name, section, base)
    return models


def load_cost_model(
    model_section: Mapping[str, Mapping[str, Any]], faas_memory_mb: float = 2048.0
) -> CostModel:
    """Channel models and the ``compute`` entry of a config's ``model`` section."""
    compute = model_section.get(COMPUTE, {})
    unknown = set(compute) - {"reduce_bandwidth_Bps"}
    if unknown:
        raise ConfigError(
            f"model.compute has unknown keys {sorted(unknown)}; it takes reduce_bandwidth_Bps"
        )
    return CostModel(
        load_models(model_section),
        faas_memory_mb=float(faas_memory_mb),
        reduce_bandwidth=compute.get("reduce_bandwidth_Bps", REDUCE_BANDWIDTH),
    )
