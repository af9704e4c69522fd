"""Memory tier: a small LRU of recently fetched blocks.

Disk hits are already served from the kernel page cache, so this tier exists for the blocks a miss
just produced: concurrent and immediately following readers get them without a disk round trip,
and they are still served when the disk cache could not store them (disk full, I/O error).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

DEFAULT_CAPACITY = 64 << 20


class MemoryTier:
    """Bounded by total bytes; evicts least recently used blocks first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.used = 0
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str, block: int) -> bytes | None:
        key = (digest, block)
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def put(self, digest: str, block: int, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        key = (digest, block)
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self.used -= len(old)
            self._blocks[key] = data
            self.used += len(data)
            while self.used > self.capacity:
                _, evicted = self._blocks.popitem(last=False)
                self.used -= len(evicted)

    def drop_layer(self, digest: str) -> None:
        with self._lock:
            for key in [k for k in self._blocks if k[0] == digest]:
                self.used -= len(self._blocks.pop(key))
