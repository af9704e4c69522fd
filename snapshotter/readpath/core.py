"""The one read path for every byte clip serves: memory -> disk -> ContentCache -> registry.

FUSE reads, start-profile prefetch and background fetch all come through here (`read` for
foreground reads, `fetch_blocks` for low-priority ones), so every byte is verified, cached and
counted the same way. A hit fills the tiers above it: ContentCache and registry bytes go to
disk; disk bytes are read with `pread`, so the kernel page cache is their memory tier (copying
them into the LRU as well would hold them twice, in the daemon's RSS). The LRU holds what the
disk could not take (cache full, write failed), so such a layer is not fetched again per read.

Unit of caching and of single flight: aligned blocks of `BLOCK_SIZE` (256 KiB) of the layer's
*uncompressed* stream (the last block ends at the stream end). A FUSE read of a file range maps
to stream bytes `[entry.uoff + off, ... + size)`, which touch one or two blocks.

- Every block present on disk: one `pread` inside the trio loop, no thread hop.
- Missing blocks: consecutive missing blocks form a *run*. One *flight* per run: fetch the
  compressed bytes from the nearest place inflation can restart (`compressed_range_from()`) from
  the layer source (an async callable on the asyncio side, reached through the Bridge),
  `inflate_from()` in a worker thread, verify every file chunk lying wholly inside the run against
  `chunk_digests`, store each complete block on disk and in memory. Concurrent reads needing a
  block in flight wait for that flight instead of fetching again. The flight inflates into one
  buffer and its blocks are views of it: bytes are copied only where they are kept (memory
  tier, fragments, ContentCache puts) or handed to a reader (just the range it asked for).
  Copies, not inflation, were most of a lazy start's CPU (py-spy, scipy).
- Restart places are the index's checkpoints plus the *resume points* every inflation records
  (deflate block boundaries about every 256 KiB, with their windows; bounded per layer), so a
  later miss in the same checkpoint interval fetches only the bytes after the last place an
  earlier fetch passed instead of the whole interval again.
- How far a flight reaches (widening, fragments of a sequential reader): see `plan.py`.
- A flight first asks the shared ContentCache (when configured) for its blocks, widened to
  whole verification chunks (chunks may cross blocks), in one round trip through the
  Bridge; the blocks are checked against every chunk digest the flight's range touches
  (hashed across block boundaries, never joined into a second copy).
  A missing block or a mismatch (logged, counted in `clip_verification_failures_total`) makes
  the flight go to the registry instead. Registry bytes are written to disk and queued for the
  ContentCache (bounded, fire and forget).
- Compressed bytes are requested through the layer's `LayerRanges` (`ranges.py`): a flight
  takes bytes another flight holds or has in flight and requests only the gaps, so no two
  requests of a layer overlap; each flight holds the head and tail its neighbours need.
- A failing source fails the flight at once (the registry client already retried within its
  deadline); bytes that do not inflate or verify are fetched again (`ReadPolicy.attempts`).
  A flight gives up after `ReadPolicy.timeout` seconds in total; its readers get `ReadFailed`
  (EIO at the FUSE layer) — never a hang.
- Every flight runs in its layer's cancel scope (`Layer.tasks`) and waits for its worker
  threads; `close_layer()` cancels and drains them before the owner closes the cache file.
- A write the disk budget refuses (cache at `limit_bytes`, disk full) is skipped: the bytes
  still reach the reader and the memory tier, the layer stays lazily served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from snapshotter.bridge import Bridge
from snapshotter.cache import CacheFull, MemoryTier
from snapshotter.contentcache import ContentCache, NoContentCache
from snapshotter.index import (
    Checkpoint,
    LayerFormatError,
    ResumePoint,
    compressed_range_from,
    inflate_from,
)
from snapshotter.readpath.layer import Block, Layer
from snapshotter.readpath.plan import Plan, plan, runs
from snapshotter.readpath.policy import ReadFailed, ReadPolicy, ReadStats, VerifyError
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_FRAGMENTS = 64
_MAX_FAILED = 4096


@dataclass(slots=True)
class _Flight:
    event: trio.Event = field(default_factory=trio.Event)
    blocks: dict[int, Block] = field(default_factory=dict)
    error: ReadFailed | None = None
    tier: str = "registry"


class ReadPath:
    """Serves stream ranges of attached layers; lives in the trio thread (`bind` a nursery)."""

    def __init__(
        self,
        bridge: Bridge | None = None,
        memory: MemoryTier | None = None,
        policy: ReadPolicy | None = None,
        content: ContentCache | None = None,
    ) -> None:
        self.bridge = bridge
        self.memory = memory if memory is not None else MemoryTier()
        self.policy = policy if policy is not None else ReadPolicy()
        #: The shared tier; its methods run on the asyncio loop (reached through the bridge).
        self.content: ContentCache = content if content is not None else NoContentCache()
        self.stats = ReadStats()
        #: Foreground reads currently waiting for a fetch (background fetch pauses meanwhile).
        self.waiting = 0
        #: trio time of the latest foreground read (background work waits for a quiet spell).
        self.last_read = -math.inf
        self._no_waiters: trio.Event | None = None
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._fragments: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._failed: dict[tuple[str, int], tuple[float, ReadFailed]] = {}
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(self.policy.inflate_threads)

    def bind(self, nursery: trio.Nursery) -> None:
        """Flights run in this nursery, so one reader's timeout never cancels a shared fetch."""
        self._nursery = nursery

    # --- ownership ------------------------------------------------------------------------------

    def spawn(self, layer: Layer, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the read path's nursery, owned by `layer` (trio thread)."""
        if self._nursery is None:
            raise RuntimeError("ReadPath.bind() was not called")
        layer.tasks.spawn(self._nursery, fn, *args)

    async def close_layer(self, layer: Layer) -> None:
        """Cancel the layer's flights and background work and wait for them (and their worker
        threads); afterwards nothing of the read path touches the layer's cache file."""
        await layer.tasks.close()
        layer.ranges.clear()
        for key in [k for k in self._fragments if k[0] == layer.digest]:
            del self._fragments[key]

    async def until_no_waiters(self) -> None:
        """Return once no foreground read waits for a fetch (background work yields to them)."""
        while self.waiting:
            if self._no_waiters is None:
                self._no_waiters = trio.Event()
            await self._no_waiters.wait()

    async def until_quiet(self, period: float) -> None:
        """Return once no foreground read waits for a fetch and none arrived in the last
        `period` seconds: a container's start (reads served from disk included) keeps the CPU
        and the link, the background pass takes what it leaves."""
        while True:
            await self.until_no_waiters()
            rest = self.last_read + period - trio.current_time()
            if rest <= 0:
                return
            await trio.sleep(rest)

    @contextlib.contextmanager
    def foreground_wait(self) -> Iterator[None]:
        """Marks a foreground read waiting for a fetch (background work pauses meanwhile)."""
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
            if self.waiting == 0 and self._no_waiters is not None:
                self._no_waiters.set()
                self._no_waiters = None

    # --- reads ----------------------------------------------------------------------------------

    async def read(self, layer: Layer, uoff: int, length: int) -> bytes:
        """Bytes [uoff, uoff+length) of the layer's uncompressed stream (clamped to its end)."""
        length = min(length, layer.size - uoff)
        if length <= 0:
            return b""
        self.last_read = trio.current_time()
        t0 = time.perf_counter()
        cache = layer.cache
        blocks = cache.block_range(uoff, length)
        layer.note(blocks)
        if cache.has_range(uoff, length):
            self.stats.disk_hits += 1
            hit = cache.read(uoff, length)
            TELEMETRY.tier_hit("disk", length)
            TELEMETRY.read_latency(time.perf_counter() - t0, "disk")
            return hit
        parts: dict[int, Block] = {}
        missing: list[int] = []
        tiers = set()
        for b in blocks:
            data, tier = self._local_block(layer, b)
            if data is None:
                missing.append(b)
            else:
                parts[b] = data
                tiers.add(tier)
        lowest = "disk" if "disk" in tiers else "memory"
        if missing:
            self.stats.misses += 1
            TELEMETRY.tier_miss("memory", len(missing))
            TELEMETRY.tier_miss("disk", len(missing))
            with TELEMETRY.slow_read(layer.digest, uoff, length) as extra:
                with self.foreground_wait():
                    got, lowest = await self._fetch(layer, missing)
                extra["tier"] = lowest
            parts.update(got)
        start = uoff - blocks[0] * cache.block_size
        TELEMETRY.read_latency(time.perf_counter() - t0, lowest)
        if len(blocks) == 1:  # copy only the bytes asked for, not the block
            return bytes(memoryview(parts[blocks[0]])[start : start + length])
        joined = b"".join(parts[b] for b in blocks)
        return joined[start : start + length]

    async def fetch_blocks(self, layer: Layer, blocks: list[int]) -> int:
        """Low priority: make `blocks` present on disk through the tiers (background fetch,
        start-profile prefetch). Returns the bytes that had to be fetched."""
        missing = [b for b in blocks if not layer.cache.has(b)]
        if not missing:
            return 0
        got, _ = await self._fetch(layer, missing)
        return sum(len(v) for v in got.values())

    def _local_block(self, layer: Layer, block: int) -> tuple[bytes | None, str]:
        data = self.memory.get(layer.digest, block)
        if data is not None:
            self.stats.memory_hits += 1
            TELEMETRY.tier_hit("memory", len(data))
            return data, "memory"
        if layer.cache.has(block):
            self.stats.disk_hits += 1
            start, end = layer.block_span(block)
            TELEMETRY.tier_hit("disk", end - start)
            return layer.cache.read(start, end - start), "disk"
        return None, ""

    # --- misses ---------------------------------------------------------------------------------

    def _recent_failure(self, layer: Layer, blocks: list[int]) -> ReadFailed | None:
        now = trio.current_time()
        for b in blocks:
            failed = self._failed.get((layer.digest, b))
            if failed is not None:
                if failed[0] > now:
                    return failed[1]
                del self._failed[(layer.digest, b)]
        return None

    async def _fetch(self, layer: Layer, missing: list[int]) -> tuple[dict[int, Block], str]:
        """The missing blocks through single-flight fetches, and the lowest tier that served."""
        recent = self._recent_failure(layer, missing)
        if recent is not None:
            self.stats.failures += 1
            raise ReadFailed(str(recent))
        if layer.tasks.closed:
            raise ReadFailed(f"layer {layer.digest}: detached")
        waits: list[tuple[int, _Flight]] = []
        for first, last in runs(missing):
            b = first
            while b <= last:
                flight = self._flights.get((layer.digest, b))
                if flight is not None:
                    self.stats.shared_waits += 1
                    waits.append((b, flight))
                    b += 1
                    continue
                end = b
                while end + 1 <= last and (layer.digest, end + 1) not in self._flights:
                    end += 1
                flight = self._start_flight(layer, b, end)
                waits.extend((x, flight) for x in range(b, end + 1))
                b = end + 1
        got: dict[int, Block] = {}
        lowest = "contentcache"
        # The flight itself is bounded by policy.timeout; this is a belt-and-braces bound.
        with trio.move_on_after(self.policy.timeout + 5.0):
            for b, flight in waits:
                await flight.event.wait()
                if flight.error is not None:
                    self.stats.failures += 1
                    raise ReadFailed(str(flight.error)) from flight.error
                got[b] = flight.blocks[b]
                if flight.tier == "registry":
                    lowest = "registry"
            return got, lowest
        self.stats.failures += 1
        raise ReadFailed(f"layer {layer.digest}: read timed out after {self.policy.timeout}s")

    def _start_flight(self, layer: Layer, first: int, last: int) -> _Flight:
        fragment = self._fragments.get((layer.digest, first), b"")
        p = plan(layer, first, last, self.policy.max_run, fragment,
                 lambda b: self._free(layer, b))
        flight = _Flight()
        for b in range(p.first, p.last + 1):
            self._flights[(layer.digest, b)] = flight
        self.stats.flights += 1
        self.spawn(layer, self._fly, layer, p, flight)
        return flight

    def _free(self, layer: Layer, block: int) -> bool:
        return not layer.cache.has(block) and (layer.digest, block) not in self._flights

    async def _fly(self, layer: Layer, p: Plan, flight: _Flight) -> None:
        start, _ = layer.block_span(p.first)
        _, end = layer.block_span(p.last)
        flight.error = ReadFailed(f"layer {layer.digest}: read of {start}+{end - start} cancelled")
        try:
            with trio.fail_after(self.policy.timeout):
                shared = await self._from_content(layer, p, start, end)
                if shared is not None:
                    flight.blocks, flight.tier = shared, "contentcache"
                else:
                    flight.blocks = await self._fetch_run(layer, p, start, end)
                    self._share(layer, flight.blocks)
            flight.error = None
        except trio.TooSlowError:
            flight.error = ReadFailed(
                f"layer {layer.digest}: source did not deliver stream bytes "
                f"{start}+{end - start} within {self.policy.timeout}s"
            )
        except Exception as exc:
            flight.error = exc if isinstance(exc, ReadFailed) else ReadFailed(str(exc))
        finally:
            if flight.error is not None and not layer.tasks.closed:
                until = trio.current_time() + self.policy.failure_ttl
                if len(self._failed) > _MAX_FAILED:
                    self._failed.clear()
                for b in range(p.first, p.last + 1):
                    self._failed[(layer.digest, b)] = (until, flight.error)
            for b in range(p.first, p.last + 1):
                if self._flights.get((layer.digest, b)) is flight:
                    del self._flights[(layer.digest, b)]
            flight.event.set()
        for b, data in flight.blocks.items():
            if not layer.cache.has(b):  # a copy: a view would keep the whole run's buffer
                self.memory.put(layer.digest, b, bytes(data))

    async def _fetch_run(self, layer: Layer, p: Plan, start: int, end: int) -> dict[int, Block]:
        """Fetch, inflate, verify and store [start, end) (plus the plan's tail fragment).

        Source errors are not retried here: the source (the registry client) retries what is
        transient within its deadline. Bytes that arrive but do not inflate or verify are
        what only this level sees: those are dropped and fetched again, `policy.attempts`
        times in all."""
        head = p.fragment if len(p.fragment) < end - start else b""
        istart = start + len(head)
        iend = p.tail if p.tail is not None else end
        error: Exception | None = None
        # a start at a published restart point that fails is not counted: it is dropped
        tries = self.policy.attempts + (1 if layer.resume.published else 0)
        for attempt in range(tries):
            begin = layer.best_start(istart)
            coff, cend = compressed_range_from(layer.index, begin, istart, iend - istart)
            try:
                data = await self._attempt(layer, begin, coff, cend, istart, iend, head, end)
            except (VerifyError, LayerFormatError) as exc:
                error = exc
                layer.ranges.discard(coff, cend)
                if isinstance(exc, VerifyError):
                    self.stats.verify_failures += 1
                    TELEMETRY.verification_failure("registry")
                if isinstance(begin, ResumePoint) and begin.published:
                    layer.resume.forget_published()  # the next attempt starts as before
                    log.warning("layer %s: published restart point at %d rejected (%s); "
                                "fetching from the index's checkpoints", layer.digest,
                                begin.uoff, exc)
                    continue
                log.warning("layer %s: attempt %d for %d+%d: %s",
                            layer.digest, attempt + 1, start, end - start, exc)
                continue
            except Exception as exc:  # from the source (or a request this flight waited for)
                raise ReadFailed(f"layer {layer.digest}: stream bytes {start}+{end - start} "
                                 f"unavailable: {exc}") from exc
            break
        else:
            raise ReadFailed(
                f"layer {layer.digest}: stream bytes {start}+{end - start} were bad in "
                f"{tries} attempts: {error}"
            )
        self._fragments.pop((layer.digest, p.first), None)
        if p.tail is not None and len(data) > end - start:
            self._keep_fragment(layer, p.last + 1, bytes(data[end - start :]))
        bs = layer.cache.block_size
        return {
            b: data[b * bs - start : min((b + 1) * bs, end) - start]
            for b in range(p.first, p.last + 1)
        }

    async def _attempt(
        self, layer: Layer, begin: Checkpoint | ResumePoint, coff: int, cend: int, istart: int,
        iend: int, head: bytes, end: int,
    ) -> Block:
        """One try of a run: its compressed bytes through the layer's `LayerRanges` (held,
        others' in flight, the gaps requested), inflated, verified and stored, and what the
        neighbours need held before the bytes stop being visible to other flights."""
        async with layer.ranges.fetching(
            coff, cend, lambda c, n: self._call_source(layer, c, n)
        ) as compressed:
            # not abandoned on cancel: the layer's owner waits for this thread
            data = await trio.to_thread.run_sync(
                self._inflate_store, layer, begin, compressed, istart, iend, head, end,
                limiter=self._limiter,
            )
            self._hold(layer, begin, compressed, coff, istart, iend)
        return data

    def _hold(
        self, layer: Layer, begin: Checkpoint | ResumePoint, compressed: bytes, coff: int,
        istart: int, iend: int,
    ) -> None:
        """Hold what neighbouring flights will need of `compressed` (bytes from `coff`): the
        tail from where the next flight restarts (`best_start(iend)`, now that this flight's
        resume points are known), and the head the flight ending at `istart` needs (up to the
        deflate block end after `istart`), when those neighbours are still missing."""
        bs = layer.cache.block_size
        cend = coff + len(compressed)
        after, before = iend // bs, istart // bs - 1
        if iend < layer.size and self._free(layer, after):
            nxt = layer.best_start(iend)
            if coff <= nxt.coff < cend:
                layer.ranges.hold(nxt.coff, compressed[nxt.coff - coff :], nxt,
                                  lambda: not layer.cache.has(after))
        if begin.uoff < istart and istart % bs == 0 and self._free(layer, before):
            reach = min(layer.index.compressed_range(istart, 0)[1], cend)
            if reach > coff:
                layer.ranges.hold(coff, compressed[: reach - coff],
                                  needed=lambda: not layer.cache.has(before))

    # --- the shared ContentCache tier -----------------------------------------------------------

    async def _from_content(
        self, layer: Layer, p: Plan, start: int, end: int
    ) -> dict[int, Block] | None:
        """The plan's blocks from the ContentCache, verified and stored; None on any miss."""
        if isinstance(self.content, NoContentCache):
            return None
        bs = layer.cache.block_size
        # off the loop: the first call decodes every entry of the index (the file map)
        lo, hi = await trio.to_thread.run_sync(layer.chunk_cover, start, end)
        numbers = list(range(lo // bs, (hi - 1) // bs + 1))
        values = await self._call_content(self.content.get_blocks, layer.digest, numbers)
        if any(v is None for v in values):
            return None
        dstart = numbers[0] * bs
        blocks = {n: v for n, v in zip(numbers, values, strict=True) if v is not None}
        del values
        try:
            for n, value in blocks.items():  # each whole, so the pieces are the stream
                expected = min(bs, layer.size - n * bs)
                if len(value) != expected:
                    raise VerifyError(f"layer {layer.digest}: content cache block {n} has "
                                      f"{len(value)} bytes, expected {expected}")
            await trio.to_thread.run_sync(
                self._verify_store, layer, dstart, list(blocks.values()), start, end,
                limiter=self._limiter,
            )
        except VerifyError as exc:
            self.stats.verify_failures += 1
            TELEMETRY.verification_failure("contentcache")
            log.warning("layer %s: content cache bytes rejected, trying the registry: %s",
                        layer.digest, exc)
            return None
        self.stats.content_hits += 1
        return {b: blocks[b] for b in range(p.first, p.last + 1)}

    def _verify_store(self, layer: Layer, dstart: int, pieces: list[bytes], start: int, end: int,
                      ) -> None:
        """Worker thread: verify every chunk touching [start, end) across the blocks (never
        joined: that was a second copy of every run a ContentCache node reads), then store the
        blocks of [start, end)."""
        if self.policy.verify:
            layer.verify_cover(dstart, pieces, start, end)
        bs = layer.cache.block_size
        for n, piece in enumerate(pieces, dstart // bs):
            lo, hi = max(start, n * bs), min(end, n * bs + len(piece))
            if lo < hi:
                self._store(layer, lo, memoryview(piece)[lo - n * bs : hi - n * bs])

    def _store(self, layer: Layer, start: int, data: memoryview) -> None:
        """Worker thread: write fetched bytes to disk unless the budget refuses them."""
        if layer.tasks.closed:
            return
        try:
            layer.cache.store(start, data)
        except CacheFull as exc:
            self.stats.uncached_bytes += len(data)
            if not layer.cache_full_logged:
                layer.cache_full_logged = True
                log.warning("layer %s: served without caching: %s", layer.digest, exc.strerror)
        except OSError as exc:
            self.stats.uncached_bytes += len(data)
            log.warning("layer %s: disk cache write failed: %s", layer.digest, exc)

    async def _call_content(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        if self.bridge is not None:
            return await self.bridge.to_asyncio(fn, *args)
        return await fn(*args)

    def _share(self, layer: Layer, blocks: dict[int, Block]) -> None:
        """Queue registry-fetched blocks for the ContentCache without waiting (puts are
        bounded and dropped when the cache's queue is full)."""
        if isinstance(self.content, NoContentCache):
            return
        for b, data in blocks.items():
            coro = self.content.put_block(layer.digest, b, bytes(data))
            if self.bridge is not None and not self.bridge.loop.is_closed():
                asyncio.run_coroutine_threadsafe(coro, self.bridge.loop)
            else:
                coro.close()

    def _keep_fragment(self, layer: Layer, block: int, data: bytes) -> None:
        self._fragments[(layer.digest, block)] = data
        while len(self._fragments) > _MAX_FRAGMENTS:
            self._fragments.popitem(last=False)

    async def _call_source(self, layer: Layer, coff: int, length: int) -> bytes:
        """One source request (a gap `LayerRanges` found neither held nor in flight)."""
        try:
            if self.bridge is not None:
                data = await self.bridge.to_asyncio(layer.source, coff, length)
            else:
                data = await layer.source(coff, length)
        except Exception:
            self.stats.source_errors += 1
            raise
        if len(data) != length:
            raise ReadFailed(
                f"layer {layer.digest}: source returned {len(data)} bytes for {coff}+{length}"
            )
        self.stats.compressed_bytes += length
        TELEMETRY.tier_hit("registry", length)
        return data

    def _inflate_store(
        self, layer: Layer, begin: Checkpoint | ResumePoint, compressed: bytes, istart: int,
        iend: int, head: bytes, end: int,
    ) -> Block:
        """Worker thread: inflate [istart, iend), prepend the head fragment, verify, write the
        complete blocks of [start, end) to disk. Returns head + inflated bytes (a view of the
        inflation's buffer when there is no head: no copy)."""
        t0 = time.perf_counter()
        result = inflate_from(layer.index, begin, compressed, istart, iend - istart)
        inflated = result.data
        TELEMETRY.inflate(time.perf_counter() - t0, len(inflated), layer.index.compression)
        self.stats.inflated_bytes += len(inflated)
        data = head + inflated if head else inflated
        start = istart - len(head)
        if self.policy.verify:
            layer.verify(start, data)
        layer.resume.add(result.points)  # after verification: never points of bad bytes
        self._store(layer, start, memoryview(data)[: end - start])
        return data
