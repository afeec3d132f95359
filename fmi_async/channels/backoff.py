"""Retry and polling waits as small objects, passed into the channels.

Storage channels wait for objects that another peer has not written yet (S3,
DynamoDB), retry requests the backend refused for load (DynamoDB
unprocessed items), and retry requests that failed on the way (a reset
connection, a restarted Redis, an HTTP 503).  All need the same thing: a
growing wait with jitter, bounded by a deadline.  Keeping it in two objects
(:class:`Backoff`, the waits; :class:`RetryPolicy`, which failures to retry
and until when) means the policy is tuned in one place and tested once,
instead of a sleep loop copied into every channel.

A :class:`RetryPolicy` only decides *when* to try again.  *Whether* a request
may be sent twice is the channel's business: it passes in only attempts that
are idempotent (a conditional write, a write keyed by message id, a read).

The jitter is "equal jitter" (half fixed, half random; see the AWS
Architecture Blog, "Exponential Backoff and Jitter", 2015): peers that started
polling at the same moment spread out, yet no wait drops to near zero.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from .options import StorageOptions

__all__ = ["Backoff", "RetryPolicy", "poll_until"]

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
    def from_options(cls, options: StorageOptions) -> Backoff:
        """Read a backend's options.

        FMI's ``timeout`` key (milliseconds between two polls) sets the first
        wait when present; ``backoff_initial``, ``backoff_max`` (seconds),
        ``backoff_multiplier`` and ``backoff_jitter`` are ours and win over it.
        Raises :class:`~fmi_async.errors.ConfigError` for values that do not
        make a backoff.
        """
        initial = _INITIAL
        if options.timeout is not None:
            initial = options.timeout / 1000.0
        if options.backoff_initial is not None:
            initial = options.backoff_initial
        maximum = options.backoff_max
        return cls(
            initial=initial,
            maximum=maximum if maximum is not None else max(_MAXIMUM, initial),
            multiplier=_given(options.backoff_multiplier, _MULTIPLIER),
            jitter=_given(options.backoff_jitter, _JITTER),
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


def _never(exc: BaseException) -> bool:
    return False


_RETRY_INITIAL = 0.02
_RETRY_MAXIMUM = 1.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Try an idempotent operation again after a transient failure, until a deadline.

    ``transient`` says which exceptions are worth another attempt (a reset
    connection, a server that is restarting or overloaded); anything else is
    raised at once.  Waits between attempts come from ``backoff`` (jittered,
    growing), and are cut short by the deadline: no attempt starts after it.
    When the deadline passes with the operation still failing,
    :meth:`run` raises :class:`~fmi_async.errors.BackendUnavailable` (a
    ``BrokenChannelError``) that names what failed, how often and for how
    long, chained to the last error.

    ``on_retry(exc, failures)`` is called before each wait (for counting and
    logging).
    """

    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=_RETRY_INITIAL, maximum=_RETRY_MAXIMUM)
    )
    transient: Callable[[BaseException], bool] = _never
    on_retry: Callable[[BaseException, int], None] | None = None

    @classmethod
    def from_options(
        cls,
        options: StorageOptions,
        transient: Callable[[BaseException], bool],
        on_retry: Callable[[BaseException, int], None] | None = None,
    ) -> RetryPolicy:
        """Read ``retry_initial`` and ``retry_max`` (seconds) of a backend's options.

        Raises :class:`~fmi_async.errors.ConfigError` when they are not ordered.
        """
        initial = _given(options.retry_initial, _RETRY_INITIAL)
        maximum = _given(options.retry_max, max(_RETRY_MAXIMUM, initial))
        return cls(Backoff(initial=initial, maximum=maximum), transient, on_retry)

    async def run(self, attempt: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
        """``await attempt()`` until it succeeds, fails for good, or ``deadline`` passes.

        ``deadline`` is in ``loop.time()`` seconds; one attempt is always
        made.  Raises what ``attempt`` raised when it is not transient, and
        :class:`~fmi_async.errors.BackendUnavailable` (``what`` failed N
        times in S seconds) when the deadline passed on a transient failure.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        failures = 0
        delays = self.backoff.delays()
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not self.transient(exc):
                    raise
                failures += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BackendUnavailable(
                        f"{what} failed {failures} time(s) in {loop.time() - start:.3g}s and "
                        f"the operation's deadline passed; last error: {exc}"
                    ) from exc
                if self.on_retry is not None:
                    self.on_retry(exc, failures)
                delay = min(next(delays), remaining)
                logger.debug("%s failed (%s); attempt %d in %.3gs", what, exc, failures + 1, delay)
                await asyncio.sleep(delay)


def _given(value: float | None, default: float) -> float:
    return default if value is None else value
