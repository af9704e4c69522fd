"""The ContentCache interface, its keys, its health report, and the default `NoContentCache`.

A ContentCache holds *decompressed* bytes of layers, shared by every node of a cluster, so a
layer is fetched and inflated once per cluster instead of once per node. It is an optional
accelerator: every method answers within a bounded time and any failure is a miss, never an
error, because the registry can always serve the same bytes.

Keys are content addressed, so any node computes them without coordination and a value never
needs invalidating: `clip:v1:<hex>:b<block size>:<n>` is block `n` (bytes `[n*size, (n+1)*size)`,
clamped at the stream end) of the uncompressed stream of layer `sha256:<hex>`; the block size
is part of the key so a change of granularity can never serve a wrong-sized value.
`clip:v1:<hex>:index` is the layer's clip index. No Redis Cluster hash tag is used: blocks of
one layer spread over all masters (docs/contentcache.md has the measurements behind that).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from snapshotter.cache import BLOCK_SIZE
from snapshotter.errors import InvalidArgument

KEY_PREFIX = "clip:v1"
_DIGEST_RE = re.compile(r"^(?:(sha256|sha384|sha512):)?([0-9a-f]{32,128})$")


def digest_hex(layer_digest: str) -> str:
    """`sha256:<hex>` (or a bare hex) -> hex; InvalidArgument naming a malformed digest."""
    match = _DIGEST_RE.match(layer_digest)
    if match is None:
        raise InvalidArgument(f"content cache: {layer_digest!r} is not a layer digest")
    return match.group(2)


def block_key(layer_digest: str, block: int, block_size: int = BLOCK_SIZE) -> str:
    """The key of one block of a layer's uncompressed stream."""
    if block < 0:
        raise InvalidArgument(f"content cache: negative block index {block}")
    return f"{KEY_PREFIX}:{digest_hex(layer_digest)}:b{block_size}:{block}"


def index_key(layer_digest: str) -> str:
    """The key of a layer's clip index."""
    return f"{KEY_PREFIX}:{digest_hex(layer_digest)}:index"


@dataclass(slots=True)
class ContentCacheStats:
    """Running totals of one cache object (also exported as metrics)."""

    gets: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    puts_queued: int = 0
    puts_written: int = 0
    bytes_written: int = 0
    puts_failed: int = 0
    puts_dropped_full: int = 0
    puts_dropped_open: int = 0
    puts_dropped_too_large: int = 0


@dataclass(frozen=True, slots=True)
class ContentCacheHealth:
    """A snapshot of a cache's state; `healthy` means calls currently go to the backend."""

    backend: str
    target: str
    state: str
    healthy: bool
    consecutive_failures: int = 0
    last_error: str = ""
    retry_in_seconds: float = 0.0
    queued_puts: int = 0
    queued_bytes: int = 0
    stats: ContentCacheStats = field(default_factory=ContentCacheStats)


class ContentCache(ABC):
    """Async (asyncio loop) access to shared decompressed layer bytes and indexes.

    Gets return None on a miss *or* on any failure; puts are fire-and-forget and bounded. Only
    `check()` raises, for callers that want to report a misconfigured cache at startup.
    """

    block_size: int = BLOCK_SIZE

    @abstractmethod
    async def get_block(self, layer_digest: str, block: int) -> bytes | None:
        """Block `block` of the layer's uncompressed stream, or None."""

    @abstractmethod
    async def get_blocks(self, layer_digest: str, blocks: Sequence[int]) -> list[bytes | None]:
        """Several blocks of one layer in one round trip; a None for each miss."""

    @abstractmethod
    async def put_block(self, layer_digest: str, block: int, data: bytes) -> None:
        """Queue a block for writing; returns at once (dropped and counted when full)."""

    @abstractmethod
    async def exists(self, layer_digest: str, block: int) -> bool:
        """Whether the block is stored (False when unknown)."""

    @abstractmethod
    async def get_index(self, layer_digest: str) -> bytes | None:
        """The layer's clip index bytes, or None."""

    @abstractmethod
    async def put_index(self, layer_digest: str, data: bytes) -> bool:
        """Store the layer's index now (bounded); True when the backend acknowledged it."""

    @abstractmethod
    def health(self) -> ContentCacheHealth:
        """The current state, without I/O."""

    @abstractmethod
    async def check(self) -> None:
        """One bounded round trip; raises Unavailable with a one-line reason on failure."""

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until queued puts are written; True when the queue drained."""
        return True

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and release connections (queued puts are abandoned)."""


class NoContentCache(ContentCache):
    """The default: stores nothing, every get misses, always healthy."""

    def __init__(self) -> None:
        self.stats = ContentCacheStats()

    async def get_block(self, layer_digest: str, block: int) -> bytes | None:
        return None

    async def get_blocks(self, layer_digest: str, blocks: Sequence[int]) -> list[bytes | None]:
        return [None] * len(blocks)

    async def put_block(self, layer_digest: str, block: int, data: bytes) -> None:
        return None

    async def exists(self, layer_digest: str, block: int) -> bool:
        return False

    async def get_index(self, layer_digest: str) -> bytes | None:
        return None

    async def put_index(self, layer_digest: str, data: bytes) -> bool:
        return False

    def health(self) -> ContentCacheHealth:
        return ContentCacheHealth(
            backend="none", target="", state="closed", healthy=True, stats=self.stats
        )

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None
