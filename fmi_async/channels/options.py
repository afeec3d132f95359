"""Typed backend options: one dataclass per backend, parsed by one helper.

A backend section of the config (``backends.Redis``, ``backends.S3``, ...)
becomes an instance of its channel's ``Options`` class through
:func:`parse_options`, which checks every value against the field's type and
bounds and refuses keys the class does not declare, so a typo (``"hots"``,
``"enabeld"``) is a :class:`~fmi_async.errors.ConfigError` naming the key and
the known ones instead of a silently ignored setting.

FMI's own keys mean the same on every channel (:class:`ChannelOptions`):

=================  ==========================================================
``enabled``        whether the communicator opens the channel (default true)
``timeout``        milliseconds between two polls of a channel that polls
                   (the first wait of its backoff); others accept and ignore it
``max_timeout``    milliseconds one channel operation may wait when the caller
                   gives no deadline: a storage receive, a direct connection
                   attempt (default: the config's ``timeout``; 10 s for a
                   connection)
=================  ==========================================================

Each backend adds its own keys; ``docs/channels.md`` lists them.  A field is
declared with :func:`option`, whose bounds are part of the declaration::

    @dataclass(frozen=True)
    class RedisOptions(StorageOptions):
        port: int = option(6379, ge=1, le=65535, doc="server port")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Union

from ..errors import ConfigError

__all__ = [
    "AWSOptions",
    "ChannelOptions",
    "RendezvousOptions",
    "TRAVERSAL",
    "StorageOptions",
    "option",
    "option_fields",
    "parse_options",
]

logger = logging.getLogger(__name__)

OptionsT = TypeVar("OptionsT", bound="ChannelOptions")


def option(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] = (),
    doc: str = "",
) -> Any:
    """A field of an options class: its default, bounds, allowed values and meaning.

    ``ge``/``gt``/``le`` bound numbers (``>=``, ``>``, ``<=``); ``choices``
    lists the allowed values.  Mutable defaults (a dict) are copied per
    instance.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "choices": choices, "doc": doc}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ChannelOptions:
    """FMI's keys, the same on every channel (see the module's table)."""

    enabled: bool = option(True, doc="open this channel")
    timeout: float | None = option(None, ge=0, doc="milliseconds between two polls")
    max_timeout: float | None = option(
        None, ge=1, doc="milliseconds one operation may wait without a caller's deadline"
    )


@dataclass(frozen=True)
class StorageOptions(ChannelOptions):
    """Keys every storage (mediated) channel reads."""

    ttl: float | None = option(
        None, ge=1, doc="seconds stored objects live when nobody deletes them"
    )
    delete_delay: float | None = option(
        None, ge=0, doc="seconds a consumed message is kept before its reader deletes it"
    )
    backoff_initial: float | None = option(None, gt=0, doc="first wait between polls, seconds")
    backoff_max: float | None = option(None, gt=0, doc="longest wait between polls, seconds")
    backoff_multiplier: float | None = option(None, gt=0, doc="growth of the poll wait")
    backoff_jitter: float | None = option(None, ge=0, doc="fraction of each wait drawn at random")
    retry_initial: float | None = option(
        None, gt=0, doc="first wait before retrying a failed request, seconds"
    )
    retry_max: float | None = option(
        None, gt=0, doc="longest wait before retrying a failed request, seconds"
    )


@dataclass(frozen=True)
class AWSOptions(StorageOptions):
    """Keys the S3 and DynamoDB channels share (the client's; see channels/aws.py)."""

    region: str | None = option(None, doc="AWS region; default from the environment")
    s3_region: str | None = option(None, doc="FMI's name for region")
    endpoint_url: str | None = option(None, doc="another endpoint than AWS's")
    profile: str | None = option(None, doc="a named profile of the shared AWS config files")
    max_pool_connections: int = option(32, ge=1, doc="HTTP connection pool size")
    connect_timeout: float = option(10.0, ge=0.1, doc="seconds to connect, per request")
    read_timeout: float = option(60.0, ge=0.1, doc="seconds to read a reply, per request")
    max_attempts: int | None = option(None, ge=0, doc="botocore's own resends of a request")
    max_concurrency: int = option(8, ge=1, doc="requests of one transfer in flight at once")
    retry_mode: str = option(
        "fmi",
        choices=("fmi", "standard", "adaptive"),
        doc="who retries throttled and failed requests: the channel (fmi) or botocore's mode",
    )
    verify: bool | str | None = option(
        None, doc="HTTPS certificate check: false skips it, a path names the CA bundle"
    )


TRAVERSAL = ("auto", "punch", "off")


@dataclass(frozen=True)
class RendezvousOptions(ChannelOptions):
    """Keys the direct channels that find their peers through a rendezvous server share."""

    host: str = option("", doc="rendezvous server host (required)")
    port: int | str | None = option(None, doc="rendezvous server port (required)")
    bind: str = option("127.0.0.1", doc="local address to listen on")
    advertise: str | None = option(None, doc="address peers should dial (default: bind)")
    connect_timeout: float | None = option(
        None, gt=0, doc="seconds to connect (default: max_timeout, else 10)"
    )
    lookup_timeout: float | None = option(
        None, gt=0, doc="seconds to wait for a peer to register (default: the config's timeout)"
    )
    traversal: str = option("auto", choices=TRAVERSAL, doc="NAT traversal: auto, punch or off")
    nat: str | dict[str, Any] | None = option(  # noqa: RUF009 - option() is a dataclass field
        None, doc="the simulated NAT box this peer is behind"
    )

    def rendezvous(self, section: str, what: str = "") -> tuple[str, int]:
        """The server's ``(host, port)``, or :class:`~fmi_async.errors.ConfigError`
        showing how to set them (``what`` says what else the server does)."""
        port = self.port
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not self.host or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(
                f"backends.{section} needs the rendezvous server's host and port, e.g. "
                f'{{"{section}": {{"enabled": true, "host": "10.0.0.5", "port": 10000}}}}; '
                + (
                    what
                    or "start one with `fmi rendezvous`, or use `fmi run`, which starts one for you"
                )
            )
        return self.host, port

    def connect_seconds(self) -> float:
        """Seconds to connect: ``connect_timeout``, else FMI's ``max_timeout``, else 10."""
        if self.connect_timeout is not None:
            return self.connect_timeout
        return self.max_timeout / 1000.0 if self.max_timeout is not None else 10.0


_FIELDS: dict[type, dict[str, tuple[tuple[type, ...], bool]]] = {}


def option_fields(cls: type[ChannelOptions]) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's accepted types and whether ``None`` (null) is allowed."""
    known = _FIELDS.get(cls)
    if known is not None:
        return known
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[tuple[type, ...], bool]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (Union, types.UnionType):
            args = typing.get_args(hint)
        else:
            args = (hint,)
        nullable = type(None) in args
        kinds = tuple(typing.get_origin(a) or a for a in args if a not in (type(None), Any))
        out[f.name] = (kinds if kinds else (object,), nullable)
    _FIELDS[cls] = out
    return out


def parse_options(cls: type[OptionsT], raw: Mapping[str, Any], section: str) -> OptionsT:
    """``raw`` (one backend's config section) as a checked ``cls``.

    ``section`` names it in messages (``"Redis"`` gives ``backends.Redis.port``).
    Raises :class:`~fmi_async.errors.ConfigError` naming the key for an
    unknown key (with the known ones), a value of the wrong type, or one out
    of its bounds.
    """
    fields = option_fields(cls)
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        raise ConfigError(
            f"backends.{section}: unknown key(s) {unknown}; known keys are {sorted(fields)}"
        )
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    values = {
        name: _check(f"backends.{section}.{name}", value, *fields[name], meta[name])
        for name, value in raw.items()
    }
    return cls(**values)


def _check(
    where: str, value: Any, kinds: tuple[type, ...], nullable: bool, meta: Mapping[str, Any]
) -> Any:
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} must not be null")
    value = _typed(where, value, kinds)
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _bounds(where, value, meta)
    return value


def _typed(where: str, value: Any, kinds: tuple[type, ...]) -> Any:
    """``value`` as the first of ``kinds`` it fits, or ConfigError."""
    for kind in kinds:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer() and float not in kinds:
                return int(value)
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isnan(value):
                    raise ConfigError(f"{where} must be a number, got {value!r}")
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
        elif kind is dict:
            if isinstance(value, Mapping):
                return dict(value)
        elif kind is object or isinstance(value, kind):
            return value
    if bool in kinds and len(kinds) == 1:
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if int in kinds and float not in kinds and isinstance(value, float):
        raise ConfigError(f"{where} must be a whole number, got {value!r}")
    if int in kinds or float in kinds:
        raise ConfigError(f"{where} must be a number, got {value!r}")
    names = " or ".join(_KIND_NAMES.get(k, f"a {k.__name__}") for k in kinds)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


_KIND_NAMES: dict[type, str] = {str: "a string", dict: "an object"}


def _bounds(where: str, value: float, meta: Mapping[str, Any]) -> None:
    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    upper = f" and at most {le:g}" if le is not None else ""
    if ge is not None and value < ge:
        raise ConfigError(f"{where} must be at least {ge:g}{upper}, got {value!r}")
    if gt is not None and value <= gt:
        raise ConfigError(f"{where} must be greater than {gt:g}{upper}, got {value!r}")
    if le is not None and value > le:
        raise ConfigError(f"{where} must be at most {le:g}, got {value!r}")
    if math.isinf(value):
        raise ConfigError(f"{where} must be finite, got {value!r}")
