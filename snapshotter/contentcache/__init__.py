"""The shared ContentCache tier: decompressed layer blocks and indexes shared by all nodes."""

from snapshotter.contentcache.base import (
    KEY_PREFIX,
    ContentCache,
    ContentCacheHealth,
    ContentCacheStats,
    NoContentCache,
    block_key,
    digest_hex,
    index_key,
)
from snapshotter.contentcache.breaker import CircuitBreaker
from snapshotter.contentcache.settings import (
    ContentCacheSettings,
    RedisTarget,
    open_content_cache,
    parse_url,
)

__all__ = [
    "KEY_PREFIX",
    "CircuitBreaker",
    "ContentCache",
    "ContentCacheHealth",
    "ContentCacheSettings",
    "ContentCacheStats",
    "NoContentCache",
    "RedisTarget",
    "block_key",
    "digest_hex",
    "index_key",
    "open_content_cache",
    "parse_url",
]
