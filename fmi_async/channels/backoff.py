"""Retry and polling waits as one small object, passed into the channels.

Storage channels wait for objects that another peer has not written yet (S3,
DynamoDB), and retry requests the backend refused for load (DynamoDB
unprocessed items).  Both need the same thing: a growing wait with jitter,
bounded by a deadline.  Keeping it in one object means the policy is tuned in
one place and tested once, instead of a sleep loop copied into every channel.

The jitter is "equal jitter" (half fixed, half random; see the AWS
Architecture Blog, "Exponential Backoff and Jitter", 2015): peers that started
polling at the same moment spread out, yet no wait drops to near zero.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError

__all__ = ["Backoff", "poll_until"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INITIAL = 0.01
_MAXIMUM = 0.5
_MULTIPLIER = 2.0
_JITTER = 0.5


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits of ``initial`` seconds growing by ``multiplier`` up to ``maximum``.

    ``jitter`` is the fraction of each wait that is random (0 = none, 1 = all).
    """

    initial: float = _INITIAL
    maximum: float = _MAXIMUM
    multiplier: float = _MULTIPLIER
    jitter: float = _JITTER

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ConfigError(
                f"backoff needs 0 < initial ({self.initial}) <= maximum ({self.maximum})"
            )
        if self.multiplier < 1:
            raise ConfigError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"backoff jitter must be between 0 and 1, got {self.jitter}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], backend: str) -> Backoff:
        """Read a backend's options.

        FMI's ``timeout`` key (milliseconds between two polls) sets the first
        wait when present; ``backoff_initial``, ``backoff_max`` (seconds),
        ``backoff_multiplier`` and ``backoff_jitter`` are ours and win over it.
        """
        initial = _INITIAL
        if "timeout" in options:
            initial = _number(options, "timeout", backend) / 1000.0
        initial = _number(options, "backoff_initial", backend, initial)
        maximum = _number(options, "backoff_max", backend, max(_MAXIMUM, initial))
        return cls(
            initial=initial,
            maximum=maximum,
            multiplier=_number(options, "backoff_multiplier", backend, _MULTIPLIER),
            jitter=_number(options, "backoff_jitter", backend, _JITTER),
        )

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """An endless series of waits in seconds."""
        uniform = (rng or random).uniform
        base = self.initial
        while True:
            fixed = base * (1.0 - self.jitter)
            yield fixed + uniform(0.0, base - fixed)
            base = min(base * self.multiplier, self.maximum)


async def poll_until(
    attempt: Callable[[], Awaitable[T | None]],
    deadline: float,
    backoff: Backoff,
) -> T | None:
    """Call ``attempt`` until it returns something other than None, or the deadline passes.

    ``deadline`` is in ``loop.time()`` seconds.  The last attempt is made at
    the deadline, never after it, so a caller's timeout is kept within one
    request's latency.  Returns None when the deadline passed.
    """
    loop = asyncio.get_running_loop()
    for delay in backoff.delays():
        result = await attempt()
        if result is not None:
            return result
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(delay, remaining))
    raise AssertionError("unreachable: Backoff.delays() is endless")  # pragma: no cover


def _number(options: Mapping[str, Any], name: str, backend: str, default: float = 0.0) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"backends.{backend}.{name} must be a non-negative number, got {value!r}")
    return float(value)
