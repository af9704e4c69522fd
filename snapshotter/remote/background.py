"""Background fetch: how a node stops depending on the registry for an attached layer.

A trio task owned by the layer (it runs in the read path's nursery inside the layer's cancel
scope, so detaching the layer cancels and awaits it). Every byte goes through the one read path
(`ReadPath.fetch_blocks`), so it comes from the ContentCache when other nodes put it there and
is verified, stored and shared like any read.

1. The layer's start profile, at once: its blocks grouped into runs of at most one flight
   (`ReadPolicy.max_run`), neighbouring runs merged when the second would restart inflation
   before the first one's compressed end (one request instead of two overlapping ones), in the
   order the recording container first read them. The runs of all layers share
   `[background_fetch] concurrency` slots node-wide (`PrefetchSlots`), handed out by when the
   recording container first read a run's blocks (the profile's wall-clock times: one container
   start records all of an image's layers on one timeline), so on a slow link the blocks its
   start needs first arrive first, whichever layer holds them (measured on the scipy start at
   200 Mbit/s: two runs per layer at once left the link a third idle once the small layers
   were done, while the container waited 0.4-0.8 s for its first blocks behind the big
   layer's runs). Foreground reads never wait for a slot. The layer's `LayerRanges` keeps
   concurrent runs from requesting the same compressed bytes.
2. When `[background_fetch] enabled`, the rest of the layer as *one sequential pass*: the
   missing blocks in stream order, one run of up to `max_run` after another. Each run restarts
   at the resume point the previous one recorded and takes the compressed bytes it held past
   it, so the pass requests each compressed byte of the layer once. Foreground reads of blocks
   in the run being fetched wait for it (single flight); before each run the pass waits while
   a foreground read waits for a fetch (the read path's event, no polling) and until no
   foreground read arrived for `quiet_seconds` (a deadline, not a poll: a container's start
   keeps the CPU and the link on a small node), and after it pays for the run's bytes at
   `bytes_per_second` (one token bucket for all layers).

Errors: the registry client retries transient errors within its deadline, so a run that still
fails is tried once more after `RETRY_PAUSE` (a registry restart) and then the pass stops,
logged; the layer stays lazily served. Disk pressure: before each run it asks the disk budget
for room (which evicts unused layers); when there is none it stops the same way.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NamedTuple

import trio

from snapshotter.cache import DiskBudget
from snapshotter.config import BackgroundFetchConfig
from snapshotter.errors import ClipError
from snapshotter.readpath import Layer, ReadPath
from snapshotter.remote.profile import StartProfile, in_first_read_order, runs
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

#: Tries of one run (the registry client has retried within its deadline before each fails).
_TRIES = 2
#: Pause before a failed run's second try (seconds).
RETRY_PAUSE = 5.0


class _Ticket(NamedTuple):
    """A place in `PrefetchSlots`' line, ordered by its first three fields (`arrival` is
    unique, so the event is never compared)."""

    due: float
    place: int
    arrival: int
    granted: trio.Event


class PrefetchSlots:
    """A semaphore that hands a freed slot to the waiter due first (trio thread): the node's
    slots for start-profile runs, so the run some container will need first is fetched next,
    whichever layer it belongs to."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._waiting: list[_Ticket] = []
        self._arrival = itertools.count()

    def queue(self, due: float, place: int = 0) -> _Ticket:
        """Take a place in line now (a slot at once if one is free and nobody waits): behind
        every ticket due earlier and, due at the same time, with a lower `place` or taken
        earlier. `held` waits for the slot; a layer queues all its runs before any waits, so
        its own order never depends on which of its tasks runs first."""
        ticket = _Ticket(due, place, next(self._arrival), trio.Event())
        if self._free and not self._waiting:
            self._free -= 1
            ticket.granted.set()
        else:
            heapq.heappush(self._waiting, ticket)
        return ticket

    @contextlib.asynccontextmanager
    async def held(self, ticket: _Ticket) -> AsyncIterator[None]:
        """Wait for the ticket's slot and hold it for the body."""
        granted = ticket.granted
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self._release()  # the slot came as it was cancelled: it goes to the next
            else:
                self._waiting.remove(ticket)
                heapq.heapify(self._waiting)
            raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:
            heapq.heappop(self._waiting).granted.set()
        else:
            self._free += 1


class BackgroundFetch:
    """Runs `run(layer, profile)` per attached layer (see the module doc); trio thread."""

    def __init__(
        self,
        readpath: ReadPath,
        options: BackgroundFetchConfig,
        budget: DiskBudget | None = None,
        on_complete: Callable[[Layer], None] | None = None,
        on_profile_run: Callable[[Layer, list[int]], None] | None = None,
    ) -> None:
        self.readpath = readpath
        self.options = options
        self.budget = budget
        #: Called (trio thread) when a background fetch leaves a layer complete on disk.
        self.on_complete = on_complete
        #: Called (trio thread) with each start-profile run once it is fetched: blocks the
        #: workload is about to read (the EROFS mode warms the kernel's page cache with them).
        self.on_profile_run = on_profile_run
        self._next_slot = 0.0
        self.slots = PrefetchSlots(options.concurrency)

    def wanted(self, profile: StartProfile | None) -> bool:
        """Whether `run` has anything to do for a layer with this start profile."""
        return (profile is not None and bool(profile.blocks)) or self.options.enabled

    def run_blocks(self, layer: Layer) -> int:
        """Blocks per run: one flight of the read path."""
        return max(1, self.readpath.policy.max_run // layer.cache.block_size)

    async def run(self, layer: Layer, profile: StartProfile | None) -> None:
        """Fetch `profile` blocks now, then (if enabled) the rest of the layer. A layer already
        complete on disk has nothing to fetch and its mount reads the cache file, not the
        stream: handing its profile on for warming would only read the stream through FUSE
        into a page cache nobody reads (measured: 130 blocks, 0.5 s of daemon CPU, on a warm
        node's smallfiles pull)."""
        if layer.cache.complete():
            return
        blocks = profile.blocks if profile is not None else []
        room = bool(blocks) and await self._room(layer, len(blocks) * layer.cache.block_size)
        if profile is not None and room and await self._profile(layer, profile):
            log.info("start profile fetched", extra={"fields": {
                    "layer": layer.digest, "blocks": len(blocks),
                    "restart_points": layer.resume.published}})
        if self.options.enabled:
            await self._rest(layer)

    async def _profile(self, layer: Layer, profile: StartProfile) -> bool:
        """The start profile's merged runs, each a task waiting for a node-wide slot due when
        the recording container first read the run (a profile without times: when this layer
        was attached); False when one failed (the others are then cancelled)."""
        limit = self.run_blocks(layer)
        merged = merge_runs(layer, runs(profile.blocks, limit), limit)
        failed = False

        async def fetch_run(ticket: _Ticket, blocks: list[int]) -> None:
            nonlocal failed
            async with self.slots.held(ticket):
                fetched = await self._fetch(layer, blocks, limited=False)
            if not fetched:
                failed = True
                nursery.cancel_scope.cancel()
            elif self.on_profile_run is not None:
                self.on_profile_run(layer, blocks)

        layer.prefetching_profile = True
        try:
            async with trio.open_nursery() as nursery:
                ordered = in_first_read_order(merged, profile, untimed=time.time())
                for place, (read_at, blocks) in enumerate(ordered):
                    nursery.start_soon(fetch_run, self.slots.queue(read_at, place), blocks)
        finally:
            layer.prefetching_profile = False
        return not failed

    async def _rest(self, layer: Layer) -> None:
        """The sequential pass over every block still missing (see the module doc)."""
        fetched_any = False
        for blocks in self._missing_runs(layer):
            if not await self._room(layer, len(blocks) * layer.cache.block_size):
                return
            if not await self._fetch(layer, blocks, limited=True):
                return
            fetched_any = True
        self._progress(layer)
        if not layer.cache.complete():
            return
        layer.ranges.clear()  # nothing of the layer is fetched again
        layer.resume.forget_published()
        await trio.to_thread.run_sync(layer.cache.flush)
        log.info("layer fully fetched", extra={"fields": {"layer": layer.digest}})
        if fetched_any and self.on_complete is not None:
            self.on_complete(layer)

    def _missing_runs(self, layer: Layer) -> Iterator[list[int]]:
        """Runs of missing blocks in stream order, looked up as the pass goes (foreground
        reads fill blocks meanwhile)."""
        cache, limit, b = layer.cache, self.run_blocks(layer), 0
        nblocks = layer.nblocks()
        while b < nblocks:
            if cache.has(b):
                b += 1
                continue
            run = [b]
            while len(run) < limit and run[-1] + 1 < nblocks and not cache.has(run[-1] + 1):
                run.append(run[-1] + 1)
            yield run
            b = run[-1] + 1

    async def _room(self, layer: Layer, nbytes: int) -> bool:
        """Whether the disk cache can take `nbytes` more (evicting unused layers if needed)."""
        if self.budget is None or await trio.to_thread.run_sync(self.budget.has_room, nbytes):
            return True
        log.warning("background fetch of %s stopped: the disk cache is full (limit %d bytes); "
                    "the layer stays lazily served", layer.digest, self.budget.limit)
        return False

    async def _fetch(self, layer: Layer, blocks: list[int], limited: bool) -> bool:
        """Fetch one run (see the module doc on errors); False (logged) when it failed."""
        error: Exception | None = None
        for attempt in range(_TRIES):
            if attempt:
                await trio.sleep(RETRY_PAUSE)
            if limited:
                await self.readpath.until_quiet(self.options.quiet_seconds)
            try:
                fetched = await self.readpath.fetch_blocks(layer, blocks)
            except (ClipError, OSError) as exc:
                log.debug("background fetch of %s blocks %s: %s", layer.digest, blocks, exc)
                error = exc
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


def merge_runs(layer: Layer, work: list[list[int]], limit: int) -> list[list[int]]:
    """Join each run to the one before (with the blocks between) when its fetch would restart
    inflation before the previous run's compressed end, i.e. when the two requests would
    overlap, and the joined run stays within `limit` blocks."""
    out: list[list[int]] = []
    index, bs = layer.index, layer.cache.block_size
    for blocks in work:
        if out:
            prev = out[-1]
            start, end = prev[0] * bs, min((prev[-1] + 1) * bs, layer.size)
            prev_end = index.compressed_range(start, end - start)[1]
            restart = layer.best_start(blocks[0] * bs).coff
            if restart < prev_end and blocks[-1] - prev[0] + 1 <= limit:
                out[-1] = list(range(prev[0], blocks[-1] + 1))
                continue
        out.append(list(blocks))
    return out
