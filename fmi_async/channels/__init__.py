"""Channels: one module per way of moving data between peers.

Modules are imported on first use so that a missing optional dependency
(redis, aioboto3, mpi4py) only matters to those who enable that backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .base import Channel, ChannelStats, Mailbox

__all__ = ["Channel", "ChannelStats", "Mailbox", "channel_class", "CHANNEL_MODULES"]

CHANNEL_MODULES: dict[str, tuple[str, str, str]] = {
    # name: (module, class, pip extra that provides its dependency)
    "memory": ("fmi_async.channels.memory", "MemoryChannel", ""),
    "tcp": ("fmi_async.channels.tcp", "TCPChannel", ""),
    "udp": ("fmi_async.channels.udp", "UDPChannel", ""),
    "redis": ("fmi_async.channels.redis", "RedisChannel", "redis"),
    "s3": ("fmi_async.channels.s3", "S3Channel", "aws"),
    "dynamodb": ("fmi_async.channels.dynamodb", "DynamoDBChannel", "aws"),
    "mpi": ("fmi_async.channels.mpi", "MPIChannel", "mpi"),
}


def channel_class(name: str) -> type[Channel]:
    try:
        module_name, class_name, extra = CHANNEL_MODULES[name]
    except KeyError:
        raise ConfigError(
            f"unknown channel {name!r}; known channels: {sorted(CHANNEL_MODULES)}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("fmi_async"):
            raise ConfigError(f"channel {name!r} is not available in this version") from exc
        hint = f" (pip install 'fmi-async[{extra}]')" if extra else ""
        raise ConfigError(f"channel {name!r} needs the package {exc.name}{hint}") from exc
    cls: Any = getattr(module, class_name)
    return cls  # type: ignore[no-any-return]
