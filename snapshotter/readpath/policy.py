"""The bounds of a read (ReadPolicy), its counters (ReadStats) and its two errors."""

from __future__ import annotations

from dataclasses import dataclass

from snapshotter.errors import Unavailable


class ReadFailed(Unavailable):
    """A read could not be served by any tier within the policy's bounds."""


class VerifyError(Exception):
    """Inflated bytes did not match the index's chunk digests."""


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """Bounds of one miss. `timeout` covers all attempts of a flight (seconds)."""

    timeout: float = 30.0
    #: Tries of a run whose bytes arrive but do not inflate or verify (source errors are not
    #: retried here: the registry client retries transient ones within its own deadline).
    attempts: int = 2
    max_run: int = 8 << 20
    verify: bool = True
    #: A block whose flight failed fails again at once for this long (seconds), so the kernel's
    #: immediate retry of a failed read does not wait out a second timeout.
    failure_ttl: float = 1.0
    inflate_threads: int = 2


@dataclass(slots=True)
class ReadStats:
    """Counters for tests, benchmarks and metrics export."""

    disk_hits: int = 0
    memory_hits: int = 0
    misses: int = 0
    flights: int = 0
    shared_waits: int = 0
    compressed_bytes: int = 0
    inflated_bytes: int = 0
    source_errors: int = 0
    failures: int = 0
    content_hits: int = 0
    verify_failures: int = 0
    #: Fetched bytes served but not written to disk (cache at its limit or disk full).
    uncached_bytes: int = 0
