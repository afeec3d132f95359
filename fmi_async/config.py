"""Configuration: FMI's ``config/fmi.json`` format plus our extensions.

FMI's file has two sections, ``backends`` (``S3``, ``Redis``, ``Direct``, each
with ``enabled`` and backend options) and ``model`` (performance and price
parameters per backend).  It loads unchanged.  Our extensions:

* more backends: every channel of :mod:`fmi_async.channels.registry`
  (``Memory``, ``TCP`` -- FMI's ``Direct`` --, ``UDP``, ``DynamoDB``); each
  backend's keys are its channel's typed options
  (:mod:`fmi_async.channels.options`), checked when the channel is built;
* top-level keys: ``timeout`` (seconds, the default deadline of every
  operation), ``serializer`` (``"msgpack"`` or ``"pickle"``), ``channel`` (the
  preferred point-to-point channel), ``collective_channel`` (the channel every
  collective runs on, as if each call passed ``channel=``; the algorithm is
  still planned), ``security`` (see below), ``limits``
  (frame limits, see :class:`fmi_async.wire.Limits`).

The ``security`` section (``docs/security.md`` has the threat model):
``secret`` (the shared secret every direct connection and rendezvous request
proves knowledge of), ``insecure`` (``true`` to run direct channels without a
secret, which is refused otherwise), ``handshake_timeout`` (seconds an
accepted connection has to prove membership, default 5),
``max_unproven`` and ``max_unproven_per_source`` (connections proving
membership at once, in all and per source address; beyond them the oldest is
dropped, default 128 and 32), ``encrypt`` (seal every frame and datagram of
the direct channels with keys derived from the secret; default true whenever
a secret is set, ``false`` for trusted networks).

Backend names are case-insensitive and normalized to lower case
(``direct`` becomes ``tcp``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .channels import registry
from .errors import ArgumentError, ConfigError
from .wire import SERIALIZERS, Limits

__all__ = ["Config", "JobConfig", "backend_name", "check_timeout"]

_TOP_LEVEL = {
    "backends",
    "model",
    "timeout",
    "serializer",
    "channel",
    "collective_channel",
    "security",
    "limits",
    "job",
}
_SECURITY_KEYS = frozenset(
    (
        "secret",
        "insecure",
        "handshake_timeout",
        "max_unproven",
        "max_unproven_per_source",
        "encrypt",
    )
)
_INF = float("inf")
logger = logging.getLogger(__name__)


ON_CONFLICT = ("wait", "error")
_JOB_KEYS = frozenset(("on_conflict", "lease_ttl", "settle"))


@dataclass(frozen=True)
class JobConfig:
    """The ``job`` section: how a communicator's job lease behaves (``docs/jobs.md``).

    ``on_conflict``: ``"wait"`` (default) waits, within the open deadline, for
    another live job that holds the same communicator name and run id to
    close; ``"error"`` raises :class:`~fmi_async.errors.JobConflictError` at
    once.  ``lease_ttl``: seconds a lease lives unless renewed (every
    ``lease_ttl / 3``); a crashed job's lease is gone after it.  ``settle``:
    seconds a group that just formed waits for stragglers of a job that
    opened the same name at the same moment; ``None`` means 0.5 s for the run
    id ``"default"`` (none given) and 0 otherwise.
    """

    on_conflict: str = "wait"
    lease_ttl: float = 30.0
    settle: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"on_conflict": self.on_conflict, "lease_ttl": self.lease_ttl}
        if self.settle is not None:
            out["settle"] = self.settle
        return out


@dataclass(frozen=True)
class Config:
    """Validated configuration shared by every peer of a job."""

    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeout: float = 60.0
    serializer: str = "msgpack"
    channel: str | None = None
    collective_channel: str | None = None
    job: JobConfig = field(default_factory=JobConfig)
    secret: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    insecure: bool = False
    handshake_timeout: float = 5.0
    max_unproven: int = 128
    max_unproven_per_source: int = 32
    encrypt: bool | None = None  # None: whenever a secret is set

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, source: Config | Mapping[str, Any] | str | os.PathLike[str] | None) -> Config:
        """Load from a Config, a dict, a JSON file path, or a JSON string."""
        if source is None:
            return cls()
        if isinstance(source, Config):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        text = os.fspath(source)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"config JSON is malformed: {exc}") from exc
            return cls.from_dict(data)
        path = Path(text)
        try:
            raw = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, origin=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "config") -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: the top level must be a JSON object")
        unknown = set(data) - _TOP_LEVEL
        if unknown:
            raise ConfigError(
                f"{origin}: unknown key(s) {sorted(unknown)}; expected some of {sorted(_TOP_LEVEL)}"
            )
        backends = _normalize_section(data.get("backends", {}), origin, "backends")
        for name, opts in backends.items():
            enabled = opts.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"{origin}: backends.{name}.enabled must be true or false")
        model = _normalize_section(data.get("model", {}), origin, "model")
        timeout = data.get("timeout", 60.0)
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigError(f"{origin}: timeout must be a positive, finite number of seconds")
        serializer = data.get("serializer", "msgpack")
        if serializer not in SERIALIZERS:
            raise ConfigError(f"{origin}: serializer must be one of {SERIALIZERS}")
        channel = data.get("channel")
        if channel is not None:
            channel = backend_name(channel, origin)
        collective_channel = data.get("collective_channel")
        if collective_channel is not None:
            collective_channel = backend_name(collective_channel, origin)
        security = _security(data.get("security", {}), origin)
        limits_raw = data.get("limits", {})
        try:
            limits = Limits(**limits_raw)
        except TypeError as exc:
            raise ConfigError(f"{origin}: limits: {exc}") from exc
        return cls(
            backends=backends,
            model=model,
            timeout=float(timeout),
            serializer=serializer,
            channel=channel,
            collective_channel=collective_channel,
            job=_job(data.get("job", {}), origin),
            limits=limits,
            **security,
        )

    # ---------------------------------------------------------------- queries

    def enabled(self) -> list[str]:
        """Names of enabled backends, in a fixed order shared by every peer."""
        return sorted(n for n, o in self.backends.items() if o.get("enabled", True))

    @property
    def encrypts(self) -> bool:
        """Whether the direct channels seal their traffic (``security.encrypt``)."""
        return self.secret is not None if self.encrypt is None else self.encrypt

    def check_security(self, channel: str) -> None:
        """Refuse to run ``channel`` (``tcp`` or ``udp``) without a secret, unless opted out.

        Raises :class:`~fmi_async.errors.ConfigError` naming the two keys
        that fix it when neither ``security.secret`` nor ``security.insecure``
        is set.  The opt-out is logged as a WARNING (logging, not
        :mod:`warnings`: it is a fact about the deployment, not about the
        calling code, and must not turn into an exception under
        ``-W error``).
        """
        if self.secret is not None:
            return
        if self.encrypt:
            raise ConfigError(
                f"channel {channel}: security.encrypt is true but there is no security.secret "
                "to derive keys from; set the secret (the same on every peer)"
            )
        if not self.insecure:
            raise ConfigError(
                f"channel {channel} needs a shared secret: set security.secret (the same on "
                "every peer and on the rendezvous server; `fmi run` makes one per run), or "
                "set security.insecure: true to run without one, where anyone who knows the "
                "communicator name can join as a peer (see docs/security.md)"
            )
        logger.warning(
            "channel %s runs WITHOUT a secret (security.insecure: true): anyone who can reach "
            "the rendezvous server or this peer and knows the communicator name can join, read "
            "and inject messages",
            channel,
        )

    def options(self, backend: str) -> dict[str, Any]:
        return dict(self.backends.get(backend_name(backend, "config"), {}))

    def with_backend(self, name: str, **options: Any) -> Config:
        """A copy with one backend enabled (and options merged)."""
        key = backend_name(name, "config")
        backends = {k: dict(v) for k, v in self.backends.items()}
        merged = {**backends.get(key, {}), **options}
        merged.setdefault("enabled", True)
        backends[key] = merged
        return replace(self, backends=backends)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backends": self.backends,
            "model": self.model,
            "timeout": self.timeout,
            "serializer": self.serializer,
        }
        if self.channel:
            out["channel"] = self.channel
        if self.collective_channel:
            out["collective_channel"] = self.collective_channel
        if self.job != JobConfig():
            out["job"] = self.job.to_dict()
        security: dict[str, Any] = {}
        if self.secret is not None:
            security["secret"] = self.secret.decode()
        defaults = Config()
        for key in sorted(_SECURITY_KEYS - {"secret"}):
            if getattr(self, key) != getattr(defaults, key):
                security[key] = getattr(self, key)
        if security:
            out["security"] = security
        if self.limits != Limits():
            out["limits"] = asdict(self.limits)
        return out


COMPUTE = "compute"
"""Name of the ``model`` section's entry for the peers' own work (not a channel)."""


def _security(section: Any, origin: str) -> dict[str, Any]:
    """The ``security`` section as :class:`Config` fields, or :class:`ConfigError`."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{origin}: security must be an object")
    unknown = set(section) - _SECURITY_KEYS
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {sorted(unknown)} in security; expected some of "
            f"{sorted(_SECURITY_KEYS)}"
        )
    out: dict[str, Any] = {}
    secret = section.get("secret")
    if secret is not None:
        if not isinstance(secret, str) or not secret:
            raise ConfigError(f"{origin}: security.secret must be a non-empty string")
        out["secret"] = secret.encode()
    insecure = section.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{origin}: security.insecure must be true or false, got {insecure!r}")
    out["insecure"] = insecure
    if "encrypt" in section:
        encrypt = section["encrypt"]
        if not isinstance(encrypt, bool):
            raise ConfigError(f"{origin}: security.encrypt must be true or false, got {encrypt!r}")
        out["encrypt"] = encrypt
    if "handshake_timeout" in section:
        value = section["handshake_timeout"]
        # not 0 < value < inf also refuses nan, whose comparisons are all false
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < _INF:
            raise ConfigError(
                f"{origin}: security.handshake_timeout must be a positive, finite number of "
                f"seconds, got {value!r}"
            )
        out["handshake_timeout"] = float(value)
    for key in ("max_unproven", "max_unproven_per_source"):
        if key in section:
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{origin}: security.{key} must be a positive integer, got {value!r}"
                )
            out[key] = value
    return out


def backend_name(name: Any, origin: str = "config") -> str:
    """The canonical channel name a config spells ``name`` (``"Direct"`` -> ``"tcp"``).

    Raises :class:`~fmi_async.errors.ConfigError` naming the known backends.
    """
    return registry.resolve(name, origin, what="backend")


def _normalize_section(section: Any, origin: str, what: str) -> dict[str, dict[str, Any]]:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{origin}: {what} must be an object keyed by backend name")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in section.items():
        if what == "model" and isinstance(name, str) and name.lower() == COMPUTE:
            key = COMPUTE  # the model's one entry that is not a channel
        else:
            key = backend_name(name, f"{origin}: {what}")
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{origin}: {what}.{name} must be an object")
        out[key] = dict(opts)
    return out


def check_timeout(value: object, what: str = "timeout") -> float:
    """``value`` as a positive, finite number of seconds, or :class:`ArgumentError`.

    ``nan`` and ``inf`` are refused: a wait without an end is exactly what a
    deadline exists to prevent (DESIGN.md section 8).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(
            f"{what} must be a number of seconds (int or float), got {type(value).__name__} "
            f"{value!r}"
        )
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ArgumentError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def _job(section: Any, origin: str) -> JobConfig:
    """The ``job`` section as a :class:`JobConfig`, or :class:`ConfigError` naming the bad key."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{origin}: job must be an object")
    unknown = set(section) - _JOB_KEYS
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {sorted(unknown)} in job; expected some of "
            f"{sorted(_JOB_KEYS)}"
        )
    on_conflict = section.get("on_conflict", "wait")
    if on_conflict not in ON_CONFLICT:
        raise ConfigError(
            f'{origin}: job.on_conflict must be "wait" or "error", got {on_conflict!r}'
        )
    ttl = section.get("lease_ttl", 30.0)
    # not 0 < ttl <= 86400 also refuses nan, whose comparisons are all false
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 86400:
        raise ConfigError(
            f"{origin}: job.lease_ttl must be a positive number of seconds (at most a day), "
            f"got {ttl!r}"
        )
    settle = section.get("settle")
    if settle is not None and (
        isinstance(settle, bool) or not isinstance(settle, (int, float)) or not 0 <= settle <= 60
    ):
        raise ConfigError(
            f"{origin}: job.settle must be null or seconds between 0 and 60, got {settle!r}"
        )
    return JobConfig(
        on_conflict=on_conflict,
        lease_ttl=float(ttl),
        settle=None if settle is None else float(settle),
    )
