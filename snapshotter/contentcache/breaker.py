"""A circuit breaker that keeps a down or slow content cache off the read path.

closed -> (N consecutive failures) -> open -> (cool-down elapsed) -> half-open: exactly one call
(the probe) goes through; its success closes the breaker, its failure opens it again for another
cool-down. While open, or while the probe is out, `allow()` says no and callers miss at once,
so a broken cache costs a read nothing beyond the one bounded probe per cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """State machine only (no I/O, no locks: it lives on one asyncio loop)."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        on_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("breaker needs threshold >= 1 and cooldown > 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = CLOSED
        self.failures = 0
        self.last_error = ""
        self._opened_at = 0.0
        self._probing = False
        self._on_change = on_change
        #: Seconds, monotonic; injectable so cool-downs can be tested without waiting.
        self.clock = clock

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open, True only for the one probe."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() - self._opened_at < self.cooldown:
                return False
            self._set(HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        if self.state != CLOSED:
            self._set(CLOSED)

    def failure(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self._probing = False
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self._opened_at = self.clock()
            if self.state != OPEN:
                self._set(OPEN)

    def abandon(self) -> None:
        """A call was cancelled before it finished: neither outcome, but free the probe slot."""
        self._probing = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 otherwise)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self._opened_at))

    def _set(self, state: str) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)
