"""Sharing what this node has with the cluster's ContentCache: indexes, start profiles and,
for a layer complete on disk, every block the ContentCache lacks.

Runs on the asyncio loop (the ContentCache's home); file reads happen in worker threads on a
descriptor of its own, and a layer's cache is never opened for it (an open cache is locked
against eviction), so a layer released meanwhile is neither read through a closed descriptor
nor kept from eviction.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from snapshotter.cache import DiskCache, digest_hex
from snapshotter.contentcache import ContentCache, NoContentCache
from snapshotter.remote.store import IndexStore

log = logging.getLogger(__name__)

#: How often an upload checks whether the ContentCache's put queue drained (seconds).
_QUEUE_POLL = 0.02


class Sharer:
    """Puts this node's indexes and complete layers into the ContentCache."""

    def __init__(
        self,
        content: ContentCache,
        indexes: IndexStore,
        cache: DiskCache,
        put_queue_bytes: int,
        flush_timeout: float,
    ) -> None:
        self.content = content
        self.indexes = indexes
        self.cache = cache
        self.room = put_queue_bytes // 2
        self.flush_timeout = flush_timeout

    @property
    def enabled(self) -> bool:
        return not isinstance(self.content, NoContentCache)

    async def share(self, digest: str, upload_blocks: bool = False) -> None:
        """Put the index into the ContentCache; with `upload_blocks` also the layer's blocks."""
        if not self.enabled:
            return
        data = await asyncio.to_thread(self.indexes.path(digest).read_bytes)
        await self.content.put_index(digest, data)
        if upload_blocks:
            try:
                sent = await self._upload_blocks(digest)
            except (OSError, ValueError) as exc:
                log.warning("upload of %s to the content cache stopped: %s", digest, exc)
                return
            log.info("layer shared", extra={"fields": {"layer": digest, "blocks": sent}})

    async def _upload_blocks(self, digest: str) -> int:
        """Queue every cached block the ContentCache lacks, keeping its put queue at most half
        full so no put is dropped for lack of room."""
        # peeked, not opened: an open cache is locked, and a released layer must stay evictable
        size, blocks = await asyncio.to_thread(self.cache.peek, digest)
        bs, path = self.cache.block_size, self.cache.directory / digest_hex(digest) / "data"
        sent = 0
        for block in blocks:
            if size is None or await self.content.exists(digest, block):
                continue
            while self.content.health().queued_bytes > self.room:
                await asyncio.sleep(_QUEUE_POLL)
            if not self.content.health().healthy:
                log.info("content cache unhealthy: upload of %s stopped", digest)
                break
            start = block * bs
            data = await asyncio.to_thread(_pread, path, start, min(bs, size - start))
            await self.content.put_block(digest, block, data)
            sent += 1
        await self.content.flush(timeout=self.flush_timeout)
        return sent


def _pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
