"""Background fetch and start profiles: how a node stops depending on the registry.

After a layer is attached, `BackgroundFetcher` first fetches the blocks of the layer's *start
profile* (the blocks a container read in its first seconds on the node that recorded it) in
parallel, then, when `[background_fetch] enabled`, the rest of the layer at low priority:
rate-limited to `bytes_per_second`, `concurrency` runs at a time, and paused whenever a
foreground (FUSE) read is waiting for a fetch. Every byte goes through the one read path
(`ReadPath.fetch_blocks`, reached across the Bridge), so it comes from the ContentCache when
other nodes have put it there and is verified, stored on disk and shared like any other read.

A start profile is a small JSON document stored next to the layer's index: in
`<root>/indexes/<hex>.profile`, in the ContentCache (under the index key of `profile_digest()`,
a digest derived from the layer digest, so no new key family is needed) and in the OCI
artifact `clip index push` publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable

from snapshotter.bridge import Bridge
from snapshotter.config import BackgroundFetchConfig
from snapshotter.errors import ClipError
from snapshotter.readpath import Layer, ReadPath
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

PROFILE_MEDIA_TYPE = "application/vnd.clip.start-profile.v1+json"
#: Blocks per background fetch (each is one flight through the read path).
RUN_BLOCKS = 4
_RETRIES = 5
_PAUSE_POLL = 0.05


def profile_digest(layer_digest: str) -> str:
    """The pseudo digest whose ContentCache index key holds the layer's start profile."""
    return "sha256:" + hashlib.sha256(f"clip:start-profile:v1:{layer_digest}".encode()).hexdigest()


def encode_profile(layer_digest: str, block_size: int, blocks: Iterable[int]) -> bytes:
    doc = {"layer": layer_digest, "block_size": block_size, "blocks": sorted(set(blocks))}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_profile(data: bytes, layer_digest: str, block_size: int) -> list[int] | None:
    """The profile's blocks, or None when it is malformed or for another layer/block size."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("layer") != layer_digest:
        return None
    blocks = doc.get("blocks")
    if doc.get("block_size") != block_size or not isinstance(blocks, list):
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        return None
    return sorted(set(blocks))


def runs(blocks: Iterable[int], limit: int = RUN_BLOCKS) -> list[list[int]]:
    """Sorted blocks grouped into runs of consecutive numbers, at most `limit` long."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][-1] == b - 1 and len(out[-1]) < limit:
            out[-1].append(b)
        else:
            out.append([b])
    return out


class BackgroundFetcher:
    """One task per attached layer (asyncio side); see the module doc."""

    def __init__(
        self,
        readpath: ReadPath,
        bridge: Bridge,
        options: BackgroundFetchConfig,
        on_complete: Callable[[Layer], None] | None = None,
    ) -> None:
        self.readpath = readpath
        self.bridge = bridge
        self.options = options
        #: Called (asyncio side) when a background fetch leaves a layer complete on disk.
        self.on_complete = on_complete
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next_slot = 0.0

    def start(self, layer: Layer, profile: list[int]) -> None:
        """Fetch `profile` blocks now, then (if enabled) the rest of the layer."""
        if layer.digest in self._tasks and not self._tasks[layer.digest].done():
            return
        if not profile and not self.options.enabled:
            return
        task = asyncio.create_task(self._run(layer, profile))
        self._tasks[layer.digest] = task

    def active(self, digest: str) -> bool:
        task = self._tasks.get(digest)
        return task is not None and not task.done()

    async def cancel(self, digest: str) -> None:
        task = self._tasks.pop(digest, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def close(self) -> None:
        for digest in list(self._tasks):
            await self.cancel(digest)

    async def _run(self, layer: Layer, profile: list[int]) -> None:
        try:
            if profile:
                await self._parallel(layer, runs(profile), limited=False)
                log.info("start profile fetched", extra={"fields": {
                    "layer": layer.digest, "blocks": len(profile)}})
            if self.options.enabled:
                nblocks = -(-layer.size // layer.cache.block_size)
                rest = [b for b in range(nblocks) if not layer.cache.has(b)]
                await self._parallel(layer, runs(rest), limited=True)
                self._progress(layer)
                if layer.cache.complete():
                    layer.cache.flush()
                    log.info("layer fully fetched", extra={"fields": {"layer": layer.digest}})
                    if rest and self.on_complete is not None:
                        self.on_complete(layer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background fetch of %s stopped", layer.digest)

    async def _parallel(self, layer: Layer, work: list[list[int]], limited: bool) -> None:
        queue: asyncio.Queue[list[int]] = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                blocks = queue.get_nowait()
                await self._fetch(layer, blocks, limited)

        await asyncio.gather(*(worker() for _ in range(self.options.concurrency)))

    async def _fetch(self, layer: Layer, blocks: list[int], limited: bool) -> None:
        for attempt in range(_RETRIES):
            if limited:
                while self.readpath.waiting > 0:
                    await asyncio.sleep(_PAUSE_POLL)
            try:
                fetched = await self.bridge.to_trio(self.readpath.fetch_blocks, layer, blocks)
            except (ClipError, RuntimeError, OSError) as exc:
                log.debug("background fetch of %s blocks %s: %s", layer.digest, blocks, exc)
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            self._progress(layer)
            if limited and fetched:
                await self._throttle(fetched)
            return
        raise ClipError(f"layer {layer.digest}: blocks {blocks[0]}..{blocks[-1]} unavailable")

    async def _throttle(self, nbytes: int) -> None:
        """Token bucket shared by all layers: the next fetch may start once `nbytes` were
        'paid' at `bytes_per_second`."""
        now = time.monotonic()
        self._next_slot = max(self._next_slot, now) + nbytes / self.options.bytes_per_second
        delay = self._next_slot - now
        if delay > 0:
            await asyncio.sleep(delay)

    @staticmethod
    def _progress(layer: Layer) -> None:
        cache = layer.cache
        done = min(cache.present_blocks() * cache.block_size, layer.size)
        TELEMETRY.background_progress(layer.digest, done, layer.size)
