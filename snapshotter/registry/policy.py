"""The one retry policy of the registry client: attempts, backoff and a deadline per operation.

Every public operation (resolve a manifest, read a range, stream a blob, check a blob) runs
under one absolute deadline, either the caller's (a read's or a Prepare's own budget) or
``operation_timeout`` from now. Inside it, a *round* tries the endpoints in order (mirrors
first) and hands over to the next one at once when one times out, refuses or lacks the
content; rounds are retried by tenacity with exponential backoff while attempts remain and the
next round could still start before the deadline. Each request's own timeouts (connect, first
byte) are short and clipped to what is left of the deadline, so one hung host cannot eat the
budget of the next.

Times are read from an injectable clock and sleeps go through an injectable sleep, so tests
drive the whole policy on a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import tenacity

from snapshotter.config import RegistrySettings

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Transient(Exception):
    """A failure worth another round (connection, timeout, 408/429/5xx); carries the reason."""


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts, attempts and breaker settings (``[registry]`` in clip.toml)."""

    connect_timeout: float = 2.0
    response_timeout: float = 3.0
    operation_timeout: float = 12.0
    attempts: int = 3
    backoff: float = 0.25
    backoff_max: float = 2.0
    failure_threshold: int = 3
    cooldown: float = 10.0
    redirect_ttl: float = 60.0

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> RetryPolicy:
        return cls(
            connect_timeout=settings.connect_timeout_seconds,
            response_timeout=settings.response_timeout_seconds,
            operation_timeout=settings.operation_timeout_seconds,
            attempts=settings.attempts,
            failure_threshold=settings.failure_threshold,
            cooldown=settings.cooldown_seconds,
            redirect_ttl=settings.redirect_ttl_seconds,
        )

    def worst_case(self) -> float:
        """How long an operation against a hung host can take: the deadline, or less when
        every attempt and backoff fits before it (docs/operations.md "Bounds")."""
        backoffs = sum(
            min(self.backoff * 2.0**i + self.backoff, self.backoff_max)
            for i in range(self.attempts - 1)
        )
        per_attempt = self.connect_timeout + self.response_timeout
        return float(min(self.operation_timeout, self.attempts * per_attempt + backoffs))

    def request_timeout(self, remaining: float, *, stream: bool) -> aiohttp.ClientTimeout:
        """One request's timeouts: short connect and first-byte (socket read) bounds, clipped
        to what is left of the operation; a whole body must also arrive before the deadline,
        except for a stream (whose stalls the read bound still catches)."""
        remaining = max(remaining, 0.001)
        return aiohttp.ClientTimeout(
            total=None if stream else remaining,
            sock_connect=min(self.connect_timeout, remaining),
            sock_read=min(self.response_timeout, remaining),
        )


@dataclass(frozen=True)
class Deadline:
    """An absolute point on ``clock`` by which an operation must have ended."""

    at: float
    clock: Clock = time.monotonic

    def remaining(self) -> float:
        return float(self.at - self.clock())

    def expired(self) -> bool:
        return self.remaining() <= 0


class _StopAtDeadline(tenacity.stop.stop_base):
    """Stop when the next round could not start before the deadline (backoff included)."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.deadline.remaining() - retry_state.upcoming_sleep <= 0


async def retrying(
    round_: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    deadline: Deadline,
    sleep: Sleep = asyncio.sleep,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run ``round_`` until it returns, raises something other than :class:`Transient`,
    or attempts or time run out (then its last Transient is raised)."""
    retryer = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.attempts) | _StopAtDeadline(deadline),
        wait=tenacity.wait_exponential_jitter(
            multiplier=policy.backoff, max=policy.backoff_max, jitter=policy.backoff
        ),
        retry=tenacity.retry_if_exception_type(Transient),
        sleep=sleep,
        before_sleep=(lambda _state: on_retry()) if on_retry else None,
        reraise=True,
    )
    return await retryer(round_)
