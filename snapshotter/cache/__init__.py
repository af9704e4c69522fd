"""Caches of decompressed layer bytes: a bounded memory tier and the persistent disk tier."""

from snapshotter.cache.budget import DiskBudget
from snapshotter.cache.disk import (
    BLOCK_SIZE,
    CacheClosed,
    CacheEntry,
    CacheFull,
    DiskCache,
    LayerCache,
    SequentialWriter,
    digest_hex,
    prune,
    scan,
)
from snapshotter.cache.memory import MemoryTier

__all__ = [
    "BLOCK_SIZE",
    "CacheClosed",
    "CacheEntry",
    "CacheFull",
    "DiskBudget",
    "DiskCache",
    "LayerCache",
    "MemoryTier",
    "SequentialWriter",
    "digest_hex",
    "prune",
    "scan",
]
