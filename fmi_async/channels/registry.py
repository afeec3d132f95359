"""The channels that exist: the one table every other module reads.

A channel is declared here once -- its name and the config spellings that
mean it, the module and class that implement it, whether it is *direct*
(peers exchange messages, possibly through a relay) or *mediated* (peers
exchange objects through shared storage), where it stands among the
point-to-point choices, and its default performance and price model.  The
config parser, the communicator, the planner, the cost model and the tools
all read this table; adding a channel means its module, its entry here and
its tests.

This module imports nothing of the package but its errors, so that every
layer (config included) may read it.  Implementations are imported on first
use, so a missing optional dependency (redis, aioboto3) only matters to those
who enable that backend.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Channel

__all__ = [
    "ChannelSpec",
    "canonical",
    "channel_class",
    "channels",
    "default_families",
    "families",
    "names",
    "register",
    "resolve",
    "spec",
    "unregister",
]

logger = logging.getLogger(__name__)

# Prices and speeds the default models use (see selection/model.py for units).
# aiobotocore's own CPU per request (signing, HTTP, parsing the answer): 2.4-2.6 ms
# of process time per GetObject on the 2-core development VM.  One peer's
# concurrent requests do not overlap it (see ChannelModel.request_gap).
_AWS_REQUEST_GAP = 2e-3
_S3_TIER1 = 0.005 / 1000  # PUT, COPY, POST, LIST: $0.005 per 1,000 (aws.amazon.com/s3/pricing)
_S3_TIER2 = 0.0004 / 1000  # GET, SELECT and all other requests: $0.0004 per 1,000
# DynamoDB on-demand after the November 2024 reduction: $0.625 per million write
# request units (1 KB each), $0.125 per million read request units (4 KB,
# strongly consistent) (aws.amazon.com/dynamodb/pricing/on-demand).
_DDB_WRU = 0.625 / 1e6
_DDB_RRU = 0.125 / 1e6


@dataclass(frozen=True)
class ChannelSpec:
    """One channel: everything the rest of the package needs to know about it.

    ``model`` holds the keyword arguments of
    :class:`~fmi_async.selection.model.ChannelModel` for its default model
    (seconds, bytes per second, dollars).
    """

    name: str
    module: str
    cls: str
    kind: Literal["direct", "mediated"]
    config_name: str  # how a config file spells the section ("Redis", "S3", ...)
    aliases: tuple[str, ...] = ()  # further spellings, e.g. FMI's "Direct" for tcp
    extra: str = ""  # the pip extra that brings its dependency
    model: Mapping[str, Any] = field(default_factory=dict)
    # Whether peers on different machines can use it (the memory channel needs
    # one process), and whether `fmi calibrate` can measure it from one machine.
    deployable: bool = True
    measurable: bool = True
    # Whether it authenticates peers with ``security.secret`` itself (storage
    # channels rely on their backend's credentials, memory peers share a process).
    uses_secret: bool = False
    # The algorithm families it runs (collectives/registry.py), in tie-break
    # order; empty: "direct", and "mediated" too on a storage channel.
    families: tuple[str, ...] = ()

    @property
    def algorithm_families(self) -> tuple[str, ...]:
        """The algorithm families the planner offers on this channel."""
        return self.families or default_families(self.kind)

    def load(self) -> type[Channel]:
        """The implementing class, imported now.

        Raises :class:`~fmi_async.errors.ConfigError` naming the pip extra
        when its dependency is not installed.
        """
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("fmi_async"):
                raise ConfigError(
                    f"channel {self.name!r} is not available in this version"
                ) from exc
            hint = f" (pip install 'fmi-async[{self.extra}]')" if self.extra else ""
            raise ConfigError(f"channel {self.name!r} needs the package {exc.name}{hint}") from exc
        cls: type[Channel] = getattr(module, self.cls)
        return cls


# In point-to-point preference order: the communicator sends point-to-point
# messages over the first enabled one, and the planner breaks ties in this order.
_CHANNELS: dict[str, ChannelSpec] = {
    spec.name: spec
    for spec in (
        # In-process queues: a copy of the buffers and one event-loop wake-up.
        # Its peers share one event loop by construction: one piece of work at
        # a time (what `fmi calibrate` writes for it, too).
        ChannelSpec(
            "memory",
            "fmi_async.channels.memory",
            "MemoryChannel",
            "direct",
            "Memory",
            deployable=False,
            model={
                "overhead": 10e-6,
                "bandwidth": 2e9,
                "aggregate_bandwidth": 4e9,
                "concurrency": 1.0,
                "source": "loopback measurement, 2-core VM",
            },
        ),
        # MPI between the ranks of an mpiexec/srun job: MPICH over shared memory
        # measured 5 us for an 8-byte allreduce between two processes here; the
        # Python path adds tens of microseconds per message.  No infrastructure
        # of its own (the cluster's nodes are paid as compute).
        ChannelSpec(
            "mpi",
            "fmi_async.channels.mpi.channel",
            "MPIChannel",
            "direct",
            "MPI",
            extra="mpi",
            deployable=False,  # only under an MPI launcher
            families=("mpi", "direct"),
            model={
                "overhead": 30e-6,
                "bandwidth": 4e9,
                "aggregate_bandwidth": 8e9,
                "source": "mpich wheel, shared memory, 2-core VM (benchmarks/mpi.py)",
            },
        ),
        # FMI's direct channel (TCPunch) measured on AWS Lambda: 0.34 ms per
        # message, 400 MB/s.  Infrastructure: the rendezvous server on an EC2
        # t4g.nano, $0.0042 per hour.  Same-AZ transfer is free.
        ChannelSpec(
            "tcp",
            "fmi_async.channels.tcp",
            "TCPChannel",
            "direct",
            "TCP",
            aliases=("direct",),
            uses_secret=True,
            model={
                "overhead": 0.34e-3,
                "bandwidth": 400e6,
                "aggregate_bandwidth": 400e6,
                "infra_per_hour": 0.0042,
                "source": "FMI ICS'23 direct channel; EC2 t4g.nano price",
            },
        ),
        ChannelSpec(
            "udp",
            "fmi_async.channels.udp.channel",
            "UDPChannel",
            "direct",
            "UDP",
            uses_secret=True,
            deployable=False,  # not yet offered by `fmi plan` without asking for it
            measurable=False,
            model={
                "overhead": 0.34e-3,
                "bandwidth": 200e6,
                "aggregate_bandwidth": 200e6,
                "infra_per_hour": 0.0042,
                "source": "as tcp, half the bandwidth (user-space reliability)",
            },
        ),
        # FMI's Redis measurements: 0.5 ms per request, 100 MB/s single and
        # 400 MB/s aggregate; ElastiCache cache.t4g.micro, $0.016 per hour.
        ChannelSpec(
            "redis",
            "fmi_async.channels.redis.channel",
            "RedisChannel",
            "mediated",
            "Redis",
            extra="redis",
            model={
                "overhead": 0.5e-3,
                "bandwidth": 100e6,
                "aggregate_bandwidth": 400e6,
                "message_requests": {"RPUSH": 1, "BLPOP": 1},
                "put_requests": {"SET": 1},
                "get_requests": {"GET": 1},
                "infra_per_hour": 0.016,
                # redis-py's own CPU per command: 60-180 us on the 2-core development VM.
                "request_gap": 100e-6,
                "source": "FMI ICS'23 Redis; ElastiCache t4g.micro price",
            },
        ),
        # DynamoDB: about 10 ms per request, items of at most 400 KB.
        ChannelSpec(
            "dynamodb",
            "fmi_async.channels.dynamodb",
            "DynamoDBChannel",
            "mediated",
            "DynamoDB",
            extra="aws",
            model={
                "overhead": 10e-3,
                "bandwidth": 20e6,
                "aggregate_bandwidth": 1e9,
                "request_prices": {"write_units": _DDB_WRU, "read_units": _DDB_RRU},
                "message_requests": {"PutItem": 1, "GetItem": 1, "DeleteItem": 1},
                "put_requests": {"PutItem": 1},
                "get_requests": {"GetItem": 1},
                "write_unit": 1024,
                "read_unit": 4096,
                "request_gap": _AWS_REQUEST_GAP,
                "source": "DynamoDB on-demand list prices; latency from AWS documentation",
            },
        ),
        # FMI's S3 measurements: about 40 ms per request, 50 MB/s per stream; S3
        # scales with readers.  Deletes are free.
        ChannelSpec(
            "s3",
            "fmi_async.channels.s3",
            "S3Channel",
            "mediated",
            "S3",
            extra="aws",
            model={
                "overhead": 40e-3,
                "bandwidth": 50e6,
                "aggregate_bandwidth": 5e9,
                "request_prices": {
                    "PutObject": _S3_TIER1,
                    "CreateMultipartUpload": _S3_TIER1,
                    "UploadPart": _S3_TIER1,
                    "CompleteMultipartUpload": _S3_TIER1,
                    "ListObjectsV2": _S3_TIER1,
                    "GetObject": _S3_TIER2,
                    "HeadObject": _S3_TIER2,
                },
                "message_requests": {"PutObject": 1, "GetObject": 1, "DeleteObjects": 1},
                "put_requests": {"PutObject": 1},
                "get_requests": {"GetObject": 1},
                "request_gap": _AWS_REQUEST_GAP,
                "source": "FMI ICS'23 S3; S3 Standard list prices",
            },
        ),
    )
}


def default_families(kind: str) -> tuple[str, ...]:
    """The algorithm families of a channel of ``kind`` that names none: "direct"
    everywhere, and "mediated" too on storage."""
    return ("direct", "mediated") if kind == "mediated" else ("direct",)


def families(name: str, kind: str) -> tuple[str, ...]:
    """The algorithm families the planner offers on channel ``name`` (of ``kind``);
    a name not in the table gets its kind's defaults."""
    known = canonical(name)
    return spec(known).algorithm_families if known is not None else default_families(kind)


def channels() -> tuple[ChannelSpec, ...]:
    """Every registered channel, in point-to-point preference order."""
    return tuple(_CHANNELS.values())


def names() -> tuple[str, ...]:
    """Every registered channel's name, in point-to-point preference order."""
    return tuple(_CHANNELS)


def spec(name: str) -> ChannelSpec:
    """The channel called ``name`` (canonical name or any alias, any case).

    Raises :class:`~fmi_async.errors.ConfigError` listing the known channels.
    """
    return _CHANNELS[resolve(name)]


def resolve(name: object, where: str = "config", what: str = "channel") -> str:
    """The canonical name of a channel spelled ``name`` (``"Direct"`` -> ``"tcp"``).

    Raises :class:`~fmi_async.errors.ConfigError` naming the known spellings
    (``what`` is the word for a channel there: a config says "backend").
    """
    if isinstance(name, str):
        lower = name.lower()
        for entry in _CHANNELS.values():
            if lower == entry.name or lower in entry.aliases:
                return entry.name
    known = ", ".join(_spellings(entry) for entry in _CHANNELS.values())
    raise ConfigError(f"{where}: unknown {what} {name!r}; known {what}s are {known}")


def canonical(name: object) -> str | None:
    """The canonical name of a channel spelled ``name``, or None when there is none."""
    try:
        return resolve(name)
    except ConfigError:
        return None


def _spellings(entry: ChannelSpec) -> str:
    return "/".join([entry.config_name, *(a.capitalize() for a in entry.aliases)])


def channel_class(name: str) -> type[Channel]:
    """The class implementing channel ``name``, imported now (:meth:`ChannelSpec.load`)."""
    return spec(name).load()


def register(entry: ChannelSpec, *, before: str | None = None) -> None:
    """Add a channel (a plugin's, or a test's) to the table.

    ``before`` places it ahead of another channel in the preference order;
    by default it goes last.  Raises :class:`~fmi_async.errors.ConfigError`
    if its name or an alias is taken.
    """
    taken = {n for e in _CHANNELS.values() for n in (e.name, *e.aliases)}
    clash = {entry.name, *entry.aliases} & taken
    if clash:
        raise ConfigError(f"channel name(s) {sorted(clash)} are already registered")
    if before is None:
        _CHANNELS[entry.name] = entry
    else:
        items = list(_CHANNELS.items())
        index = next((i for i, (n, _) in enumerate(items) if n == before), len(items))
        items.insert(index, (entry.name, entry))
        _CHANNELS.clear()
        _CHANNELS.update(items)
    logger.debug("registered channel %s (%s.%s)", entry.name, entry.module, entry.cls)


def unregister(name: str) -> None:
    """Remove a channel added with :func:`register` (tests clean up with it)."""
    _CHANNELS.pop(resolve(name), None)
