"""Background fetch: how a node stops depending on the registry for an attached layer.

A trio task owned by the layer (it runs in the read path's nursery inside the layer's cancel
scope, so detaching the layer cancels and awaits it). It first fetches the blocks of the
layer's start profile, `concurrency` runs at a time, then, when `[background_fetch] enabled`,
the rest of the layer at low priority: rate-limited to `bytes_per_second` and paused while a
foreground read waits for a fetch (woken by the read path's event, never by polling). Every
byte goes through the one read path (`ReadPath.fetch_blocks`), so it comes from the
ContentCache when other nodes put it there and is verified, stored and shared like any read.

Disk pressure: before each run it asks the disk budget for room (which evicts unused layers);
when there is none it stops, and the layer stays lazily served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import trio

from snapshotter.cache import DiskBudget
from snapshotter.config import BackgroundFetchConfig
from snapshotter.errors import ClipError
from snapshotter.readpath import Layer, ReadPath
from snapshotter.remote.profile import runs
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

_RETRIES = 5


class BackgroundFetch:
    """Runs `run(layer, profile)` per attached layer (see the module doc); trio thread."""

    def __init__(
        self,
        readpath: ReadPath,
        options: BackgroundFetchConfig,
        budget: DiskBudget | None = None,
        on_complete: Callable[[Layer], None] | None = None,
    ) -> None:
        self.readpath = readpath
        self.options = options
        self.budget = budget
        #: Called (trio thread) when a background fetch leaves a layer complete on disk.
        self.on_complete = on_complete
        self._next_slot = 0.0

    def wanted(self, profile: list[int]) -> bool:
        """Whether `run` has anything to do for a layer with this start profile."""
        return bool(profile) or self.options.enabled

    async def run(self, layer: Layer, profile: list[int]) -> None:
        """Fetch `profile` blocks now, then (if enabled) the rest of the layer."""
        room = bool(profile) and await self._room(layer, len(profile) * layer.cache.block_size)
        if room and await self._parallel(layer, runs(profile), limited=False):
            log.info("start profile fetched", extra={"fields": {
                    "layer": layer.digest, "blocks": len(profile)}})
        if self.options.enabled:
            await self._rest(layer)

    async def _rest(self, layer: Layer) -> None:
        rest = [b for b in range(layer.nblocks()) if not layer.cache.has(b)]
        if not await self._parallel(layer, runs(rest), limited=True):
            return
        self._progress(layer)
        if not layer.cache.complete():
            return
        await trio.to_thread.run_sync(layer.cache.flush)
        log.info("layer fully fetched", extra={"fields": {"layer": layer.digest}})
        if rest and self.on_complete is not None:
            self.on_complete(layer)

    async def _parallel(self, layer: Layer, work: list[list[int]], limited: bool) -> bool:
        """Fetch every run of `work`, `concurrency` at a time; False when it stopped early
        (no room on disk, or blocks that stayed unavailable)."""
        items: Iterator[list[int]] = iter(work)
        stopped = False

        async def worker() -> None:
            nonlocal stopped
            for blocks in items:
                if stopped:
                    return
                if limited and not await self._room(layer, len(blocks) * layer.cache.block_size):
                    stopped = True
                    return
                if not await self._fetch(layer, blocks, limited):
                    stopped = True
                    return

        async with trio.open_nursery() as nursery:
            for _ in range(self.options.concurrency):
                nursery.start_soon(worker)
        return not stopped

    async def _room(self, layer: Layer, nbytes: int) -> bool:
        """Whether the disk cache can take `nbytes` more (evicting unused layers if needed)."""
        if self.budget is None or await trio.to_thread.run_sync(self.budget.has_room, nbytes):
            return True
        log.warning("background fetch of %s stopped: the disk cache is full (limit %d bytes); "
                    "the layer stays lazily served", layer.digest, self.budget.limit)
        return False

    async def _fetch(self, layer: Layer, blocks: list[int], limited: bool) -> bool:
        """Fetch one run, retrying with backoff; False (logged) when it stayed unavailable."""
        error: Exception | None = None
        for attempt in range(_RETRIES):
            if limited:
                await self.readpath.until_no_waiters()
            try:
                fetched = await self.readpath.fetch_blocks(layer, blocks)
            except (ClipError, OSError) as exc:
                log.debug("background fetch of %s blocks %s: %s", layer.digest, blocks, exc)
                error = exc
                await trio.sleep(0.5 * 2**attempt)
                continue
            self._progress(layer)
            if limited and fetched:
                await self._throttle(fetched)
            return True
        log.warning("background fetch of %s stopped: blocks %d..%d unavailable: %s",
                    layer.digest, blocks[0], blocks[-1], error)
        return False

    async def _throttle(self, nbytes: int) -> None:
        """Token bucket shared by all layers: the next fetch may start once `nbytes` were
        'paid' at `bytes_per_second`."""
        now = trio.current_time()
        self._next_slot = max(self._next_slot, now) + nbytes / self.options.bytes_per_second
        delay = self._next_slot - now
        if delay > 0:
            await trio.sleep(delay)

    @staticmethod
    def _progress(layer: Layer) -> None:
        cache = layer.cache
        done = min(cache.present_blocks() * cache.block_size, layer.size)
        TELEMETRY.background_progress(layer.digest, done, layer.size)
