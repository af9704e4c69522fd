"""The disk cache's byte budget: what keeps every writer of the cache under `limit_bytes`.

Every write into a layer cache (the streaming build, read-path fills from the registry or the
ContentCache, background fetch) first `charge()`s the bytes it is about to add. While the total
stays under the limit a charge is one locked addition. A charge that would cross the limit (or
any charge after the filesystem said ENOSPC) first evicts the least recently used layers no
process has open, then succeeds only if that made room: a refused charge means "do not write
these bytes" — the bytes are still served to the reader, the layer just stays lazily served.

The running total is an estimate between evictions (charged bytes, not allocated blocks); each
eviction re-reads the real allocation from disk, so errors never accumulate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from pathlib import Path

from snapshotter.cache.disk import BLOCK_SIZE, CacheEntry, prune, scan

log = logging.getLogger(__name__)

#: After ENOSPC (with or without a limit), an eviction tries to free at least this much.
ENOSPC_SLACK = 64 << 20


class DiskBudget:
    """Thread-safe byte budget of one disk cache directory (see the module doc).

    `limit` 0 means no configured limit: charges always succeed until the filesystem fills.
    `keep()` names layers eviction must not remove although no process holds them open (layers
    whose index is being resolved).
    """

    def __init__(
        self,
        directory: Path,
        limit: int,
        keep: Callable[[], Collection[str]] = frozenset,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.directory = directory
        self.limit = limit
        self.keep = keep
        self.block_size = block_size
        self.used = 0
        self._full = False  # the filesystem said ENOSPC since the last eviction
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self.evicted: list[CacheEntry] = []

    def measure(self) -> int:
        """Re-read the cache's real size from disk (blocking: call from a worker thread)."""
        total = sum(e.bytes_cached for e in scan(self.directory, self.block_size))
        with self._lock:
            self.used = total
            self._full = False
        return total

    def _fits(self, nbytes: int) -> bool:
        if self._full:
            return False
        return self.limit <= 0 or self.used + nbytes <= self.limit

    def charge(self, nbytes: int) -> bool:
        """Account `nbytes` about to be written; False (nothing charged) when they do not fit
        even after evicting unused layers. Blocking when it evicts: worker threads only."""
        with self._lock:
            if self._fits(nbytes):
                self.used += nbytes
                return True
        self.make_room(nbytes)
        with self._lock:
            if self._fits(nbytes):
                self.used += nbytes
                return True
        return False

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more would fit, evicting unused layers if needed (charges nothing)."""
        with self._lock:
            if self._fits(nbytes):
                return True
        self.make_room(nbytes)
        with self._lock:
            return self._fits(nbytes)

    def disk_full(self) -> None:
        """The filesystem refused a write (ENOSPC): refuse charges until an eviction frees room."""
        with self._lock:
            self._full = True

    def credit(self, nbytes: int) -> None:
        """Bytes removed from the cache outside an eviction."""
        with self._lock:
            self.used = max(0, self.used - nbytes)

    def make_room(self, nbytes: int) -> list[CacheEntry]:
        """Evict least recently used unused layers until `nbytes` more fit; returns them."""
        with self._evict_lock:
            with self._lock:
                full, used = self._full, self.used
                if not full and (self.limit <= 0 or used + nbytes <= self.limit):
                    return []
            if self.limit > 0 and not full:
                target = max(0, self.limit - nbytes)
            else:
                target = max(0, used - max(nbytes, ENOSPC_SLACK))
            try:
                removed = prune(self.directory, target, set(self.keep()), self.block_size)
            except OSError as exc:
                log.warning("disk cache eviction failed: %s", exc)
                return []
            for entry in removed:
                log.info("evicted layer cache", extra={"fields": {
                    "layer": entry.digest, "bytes": entry.bytes_cached}})
            self.evicted.extend(removed)
            del self.evicted[:-64]
            total = sum(e.bytes_cached for e in scan(self.directory, self.block_size))
            with self._lock:
                self.used = total
                if removed:
                    self._full = False
            return removed
