"""The one read path for every byte clip serves: memory -> disk -> ContentCache -> registry.

FUSE reads, start-profile prefetch and background fetch all come through here (`read` for
foreground reads, `fetch_blocks` for low-priority ones), so every byte is verified, cached and
counted the same way. A hit fills the tiers above it: ContentCache and registry bytes go to
disk and memory; disk bytes are read with `pread`, so the kernel page cache is their memory
tier (copying them into the LRU as well would hold them twice).

Unit of caching and of single flight: aligned blocks of `BLOCK_SIZE` (1 MiB) of the layer's
*uncompressed* stream (the last block ends at the stream end). A FUSE read of a file range maps
to stream bytes `[entry.uoff + off, ... + size)`, which touch one or two blocks.

- Every block present on disk: one `pread` inside the trio loop, no thread hop.
- Missing blocks: consecutive missing blocks form a *run*. One *flight* per run: fetch the
  compressed bytes from the nearest place inflation can restart (`compressed_range_from()`) from
  the layer source (an async callable on the asyncio side, reached through the Bridge),
  `inflate_from()` in a worker thread, verify every file chunk lying wholly inside the run against
  `chunk_digests`, store each complete block on disk and in memory. Concurrent reads needing a
  block in flight wait for that flight instead of fetching again.
- Restart places are the index's checkpoints plus the *resume points* every inflation records
  (deflate block boundaries about every 256 KiB, with their windows; bounded per layer), so a
  later miss in the same checkpoint interval fetches only the bytes after the last place an
  earlier fetch passed instead of the whole interval again.
- A run is widened downwards to the place its fetch starts from (those bytes are inflated
  anyway). When it continues blocks already present (a sequential reader), it is also widened
  upwards to the next checkpoint, and the bytes between the last block boundary and that
  checkpoint are kept as a *fragment*: the reader's next miss then starts fetching exactly at the
  checkpoint, so a sequential read fetches and inflates each compressed byte about once. Random
  reads do not pay for that look-ahead. Runs are capped at `ReadPolicy.max_run` bytes.
- A flight first asks the shared ContentCache (when configured) for its blocks, widened to
  whole verification chunks (chunks may cross 1 MiB blocks), in one round trip through the
  Bridge; the joined bytes are checked against every chunk digest the flight's range touches.
  A missing block or a mismatch (logged, counted in `clip_verification_failures_total`) makes
  the flight go to the registry instead. Registry bytes are written to disk and queued for the
  ContentCache (bounded, fire and forget).
- A flight retries a failing source with backoff and gives up after `ReadPolicy.timeout` seconds
  in total; its readers get `ReadFailed` (EIO at the FUSE layer) — never a hang.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from snapshotter.bridge import Bridge
from snapshotter.cache import LayerCache, MemoryTier
from snapshotter.contentcache import ContentCache, NoContentCache
from snapshotter.errors import Unavailable
from snapshotter.index import (
    Checkpoint,
    EntryType,
    LayerIndex,
    ResumePoint,
    ResumePoints,
    compressed_range_from,
    inflate_from,
)
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

#: An async callable returning `length` compressed bytes of the blob starting at `coff`.
Source = Callable[[int, int], Awaitable[bytes]]
T = TypeVar("T")


class HitMetrics:
    """Memory and disk hits recorded into TELEMETRY in batches.

    A page-cache-warm disk hit takes microseconds, and recording it into three OpenTelemetry
    instruments took ~40 µs on the development VM, so hits are summed here and handed over at
    most once a second (and by `flush()`, which the daemon calls periodically), and the latency
    of local hits is sampled one read in `SAMPLE`. Misses are recorded one by one.
    """

    SAMPLE = 16
    PERIOD = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[int]] = {"memory": [0, 0], "disk": [0, 0]}
        self._reads = 0
        self._last = time.monotonic()

    def add(self, tier: str | None, nbytes: int, seconds: float | None = None,
            lowest: str = "disk") -> None:
        """Count a hit of `tier` (None: none, only a read's latency) and maybe its latency."""
        now = time.monotonic()
        with self._lock:
            if tier is not None:
                entry = self._pending[tier]
                entry[0] += 1
                entry[1] += nbytes
            if seconds is not None:
                self._reads += 1
                if self._reads % self.SAMPLE == 0:
                    TELEMETRY.read_latency(seconds, tier or lowest)
            due = now - self._last >= self.PERIOD
        if due:
            self.flush()

    def flush(self) -> None:
        """Hand the pending sums to TELEMETRY (any thread)."""
        with self._lock:
            pending = self._pending
            self._pending = {"memory": [0, 0], "disk": [0, 0]}
            self._last = time.monotonic()
        for tier, (count, nbytes) in pending.items():
            if count:
                TELEMETRY.tier_hit(tier, nbytes, count)


class ReadFailed(Unavailable):
    """A read could not be served by any tier within the policy's bounds."""


class VerifyError(Exception):
    """Inflated bytes did not match the index's chunk digests."""


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """Bounds of one miss. `timeout` covers all attempts of a flight (seconds)."""

    timeout: float = 30.0
    attempts: int = 3
    backoff: float = 0.2
    max_run: int = 8 << 20
    verify: bool = True
    #: A block whose flight failed fails again at once for this long (seconds), so the kernel's
    #: immediate retry of a failed read does not wait out a second timeout.
    failure_ttl: float = 1.0
    inflate_threads: int = 2


@dataclass(slots=True)
class ReadStats:
    """Counters for tests, benchmarks and metrics export."""

    disk_hits: int = 0
    memory_hits: int = 0
    misses: int = 0
    flights: int = 0
    shared_waits: int = 0
    compressed_bytes: int = 0
    inflated_bytes: int = 0
    source_errors: int = 0
    failures: int = 0
    content_hits: int = 0
    verify_failures: int = 0


class Layer:
    """Read-side state of one attached layer: its index, source and disk cache."""

    def __init__(self, name: str, index: LayerIndex, source: Source, cache: LayerCache) -> None:
        self.name = name
        self.index = index
        self.source = source
        self.cache = cache
        self.digest = index.blob_digest
        self.size = int(index.uncompressed_size)
        # Places inflation can restart besides the index's checkpoints, recorded by every fetch
        # (bounded): a later miss in the same checkpoint interval starts at the nearest one.
        self.resume = ResumePoints(index)
        cache.set_size(self.size)
        self._file_starts: list[int] | None = None
        self._file_ordinals: list[int] = []
        self._file_ends: list[int] = []
        self._map_lock = threading.Lock()
        #: Blocks read by foreground reads while a start profile is being recorded.
        self.profile: set[int] | None = None
        self.profile_until = 0.0

    def record_profile(self, seconds: float) -> None:
        """Record the blocks foreground reads touch during the next `seconds`."""
        self.profile = set()
        self.profile_until = time.monotonic() + seconds

    def _note(self, blocks: range) -> None:
        if self.profile is not None and time.monotonic() < self.profile_until:
            self.profile.update(blocks)

    def _file_map(self) -> list[int]:
        """Regular files sorted by stream offset (built on first verification, off the loop)."""
        with self._map_lock:
            if self._file_starts is None:
                triples = []
                for i in range(len(self.index)):
                    e = self.index.entry(i)
                    if e.type == EntryType.FILE and e.size > 0:
                        triples.append((e.uoff, i, e.uoff + e.size))
                triples.sort()
                self._file_ordinals = [o for _, o, _ in triples]
                self._file_ends = [end for _, _, end in triples]
                self._file_starts = [u for u, _, _ in triples]
            return self._file_starts

    def chunk_cover(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) widened to the whole verification chunks of the files it touches."""
        starts = self._file_map()
        cs = int(self.index.chunk_size)
        lo, hi = start, end
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(starts) and starts[i] < end:
            fstart, fend = starts[i], self._file_ends[i]
            if fend > start:
                first = fstart + (max(start, fstart) - fstart) // cs * cs
                last = fstart + (min(end, fend) - 1 - fstart) // cs * cs
                lo, hi = min(lo, first), max(hi, min(last + cs, fend))
            i += 1
        return lo, hi

    def verify_cover(self, dstart: int, data: bytes, start: int, end: int) -> int:
        """Check every chunk digest of the files touching [start, end); `data` (bytes from
        `dstart`) must hold all of them (see `chunk_cover`). Returns the chunks checked."""
        starts = self._file_map()
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        view = memoryview(data)
        dend = dstart + len(data)
        checked = 0
        while i < len(starts) and starts[i] < end:
            for cu, clen, digest in self.index.chunk_digests(self._file_ordinals[i]):
                if cu + clen <= start or cu >= end:
                    continue
                if cu < dstart or cu + clen > dend:
                    raise VerifyError(f"layer {self.name}: chunk at {cu}+{clen} not covered")
                if hashlib.sha256(view[cu - dstart : cu + clen - dstart]).digest() != digest:
                    raise VerifyError(f"layer {self.name}: chunk at {cu}+{clen} is corrupt")
                checked += 1
            i += 1
        return checked

    def verify(self, uoff: int, data: bytes) -> int:
        """Check every chunk digest whose chunk lies wholly inside [uoff, uoff+len(data)).

        Returns the number of chunks checked; raises VerifyError on a mismatch.
        """
        end = uoff + len(data)
        starts = self._file_map()
        i = max(bisect.bisect_right(starts, uoff) - 1, 0)
        checked = 0
        view = memoryview(data)
        while i < len(starts) and starts[i] < end:
            for cu, clen, digest in self.index.chunk_digests(self._file_ordinals[i]):
                if cu >= uoff and cu + clen <= end:
                    if hashlib.sha256(view[cu - uoff : cu + clen - uoff]).digest() != digest:
                        raise VerifyError(f"layer {self.name}: chunk at {cu}+{clen} is corrupt")
                    checked += 1
            i += 1
        return checked


@dataclass(slots=True)
class _Flight:
    event: trio.Event = field(default_factory=trio.Event)
    blocks: dict[int, bytes] = field(default_factory=dict)
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
        #: Memory and disk hits, batched into the metrics (see HitMetrics).
        self.hits = HitMetrics()
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._fragments: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._failed: dict[tuple[str, int], tuple[float, ReadFailed]] = {}
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(self.policy.inflate_threads)

    def bind(self, nursery: trio.Nursery) -> None:
        """Flights run in this nursery, so one reader's timeout never cancels a shared fetch."""
        self._nursery = nursery

    async def read(self, layer: Layer, uoff: int, length: int) -> bytes:
        """Bytes [uoff, uoff+length) of the layer's uncompressed stream (clamped to its end)."""
        length = min(length, layer.size - uoff)
        if length <= 0:
            return b""
        t0 = time.monotonic()
        cache = layer.cache
        blocks = cache.block_range(uoff, length)
        layer._note(blocks)
        if cache.has_range(uoff, length):
            self.stats.disk_hits += 1
            hit = cache.read(uoff, length)
            self.hits.add("disk", length, time.monotonic() - t0)
            return hit
        parts: dict[int, bytes] = {}
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
                self.waiting += 1
                try:
                    got, lowest = await self._fetch(layer, missing)
                finally:
                    self.waiting -= 1
                extra["tier"] = lowest
            parts.update(got)
        joined = b"".join(parts[b] for b in blocks)
        start = uoff - blocks[0] * cache.block_size
        if missing:
            TELEMETRY.read_latency(time.monotonic() - t0, lowest)
        else:
            self.hits.add(None, 0, time.monotonic() - t0, lowest)
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
            self.hits.add("memory", len(data))
            return data, "memory"
        if layer.cache.has(block):
            self.stats.disk_hits += 1
            start, end = self._block_span(layer, block)
            self.hits.add("disk", end - start)
            return layer.cache.read(start, end - start), "disk"
        return None, ""

    def _block_span(self, layer: Layer, block: int) -> tuple[int, int]:
        bs = layer.cache.block_size
        return block * bs, min((block + 1) * bs, layer.size)

    # --- misses -------------------------------------------------------------------------------

    def _recent_failure(self, layer: Layer, blocks: list[int]) -> ReadFailed | None:
        now = trio.current_time()
        for b in blocks:
            failed = self._failed.get((layer.digest, b))
            if failed is not None:
                if failed[0] > now:
                    return failed[1]
                del self._failed[(layer.digest, b)]
        return None

    async def _fetch(self, layer: Layer, missing: list[int]) -> tuple[dict[int, bytes], str]:
        """The missing blocks through single-flight fetches, and the lowest tier that served."""
        recent = self._recent_failure(layer, missing)
        if recent is not None:
            self.stats.failures += 1
            raise ReadFailed(str(recent))
        waits: list[tuple[int, _Flight]] = []
        for first, last in _runs(missing):
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
        got: dict[int, bytes] = {}
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
        raise ReadFailed(f"layer {layer.name}: read timed out after {self.policy.timeout}s")

    def _start_flight(self, layer: Layer, first: int, last: int) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("ReadPath.bind() was not called")
        plan = self._plan(layer, first, last)
        flight = _Flight()
        for b in range(plan.first, plan.last + 1):
            self._flights[(layer.digest, b)] = flight
        self.stats.flights += 1
        self._nursery.start_soon(self._fly, layer, plan, flight)
        return flight

    def _free(self, layer: Layer, block: int) -> bool:
        return not layer.cache.has(block) and (layer.digest, block) not in self._flights

    def _plan(self, layer: Layer, first: int, last: int) -> _Plan:
        """Grow a run of missing blocks to what its fetch should cover (see module doc).

        Downwards to the checkpoint the fetch starts from anyway (free). Upwards, when the run
        continues blocks already present (a sequential reader), to the next checkpoint: the
        complete blocks up to it are stored and the bytes from the last block boundary to the
        checkpoint are kept as a fragment, so the reader's next miss starts fetching exactly
        at that checkpoint instead of refetching the interval before it.
        """
        bs = layer.cache.block_size
        limit = max(1, self.policy.max_run // bs)
        fragment = self._fragments.get((layer.digest, first), b"")
        sequential = first > 0 and not self._free(layer, first - 1)
        if layer.index.compression == "none":
            return _Plan(first, last, None, fragment)
        if not fragment:
            floor = layer.resume.best_start(first * bs).uoff
            while first > 0 and (first - 1) * bs >= floor and last - first + 1 < limit:
                if not self._free(layer, first - 1):
                    break
                first -= 1
        if not sequential:
            return _Plan(first, last, None, fragment)
        ceiling = self._next_checkpoint(layer, (last + 1) * bs)
        nblocks = -(-layer.size // bs)
        while last + 1 < nblocks and last - first + 1 < limit:
            if min((last + 2) * bs, layer.size) > ceiling or not self._free(layer, last + 1):
                break
            last += 1
        end = min((last + 1) * bs, layer.size)
        tail = ceiling if end < ceiling < end + bs and self._free(layer, last + 1) else None
        return _Plan(first, last, tail, fragment)

    @staticmethod
    def _next_checkpoint(layer: Layer, uoff: int) -> int:
        """Stream offset of the first checkpoint at or after uoff (the stream end if none)."""
        index = layer.index
        cp = index.checkpoint_before(uoff)
        if cp.uoff >= uoff:
            return int(cp.uoff)
        following = cp.number + 1
        if following < index.checkpoint_count:
            return int(index.checkpoint(following).uoff)
        return layer.size

    async def _fly(self, layer: Layer, plan: _Plan, flight: _Flight) -> None:
        start, _ = self._block_span(layer, plan.first)
        _, end = self._block_span(layer, plan.last)
        flight.error = ReadFailed(f"layer {layer.name}: read of {start}+{end - start} cancelled")
        try:
            with trio.fail_after(self.policy.timeout):
                shared = await self._from_content(layer, plan, start, end)
                if shared is not None:
                    flight.blocks, flight.tier = shared, "contentcache"
                else:
                    flight.blocks = await self._fetch_run(layer, plan, start, end)
                    self._share(layer, flight.blocks)
            flight.error = None
        except trio.TooSlowError:
            flight.error = ReadFailed(
                f"layer {layer.name}: source did not deliver stream bytes {start}+{end - start} "
                f"within {self.policy.timeout}s"
            )
        except Exception as exc:
            flight.error = exc if isinstance(exc, ReadFailed) else ReadFailed(str(exc))
        finally:
            if flight.error is not None:
                until = trio.current_time() + self.policy.failure_ttl
                if len(self._failed) > _MAX_FAILED:
                    self._failed.clear()
                for b in range(plan.first, plan.last + 1):
                    self._failed[(layer.digest, b)] = (until, flight.error)
            for b in range(plan.first, plan.last + 1):
                if self._flights.get((layer.digest, b)) is flight:
                    del self._flights[(layer.digest, b)]
            flight.event.set()
        for b, data in flight.blocks.items():
            self.memory.put(layer.digest, b, data)

    async def _fetch_run(
        self, layer: Layer, plan: _Plan, start: int, end: int
    ) -> dict[int, bytes]:
        """Fetch, inflate, verify and store [start, end) (plus the plan's tail fragment)."""
        head = plan.fragment if len(plan.fragment) < end - start else b""
        istart = start + len(head)
        iend = plan.tail if plan.tail is not None else end
        begin = layer.resume.best_start(istart)
        coff, cend = compressed_range_from(layer.index, begin, istart, iend - istart)
        last_error: Exception | None = None
        for attempt in range(self.policy.attempts):
            try:
                compressed = await self._call_source(layer, coff, cend - coff)
                self.stats.compressed_bytes += len(compressed)
                TELEMETRY.tier_hit("registry", len(compressed))
                data = await trio.to_thread.run_sync(
                    self._inflate_store, layer, begin, compressed, istart, iend, head, end,
                    limiter=self._limiter, abandon_on_cancel=True,
                )
                break
            except Exception as exc:
                if isinstance(exc, VerifyError):
                    self.stats.verify_failures += 1
                    TELEMETRY.verification_failure("registry")
                self.stats.source_errors += 1
                last_error = exc
                log.warning("layer %s: attempt %d for %d+%d failed: %s",
                            layer.name, attempt + 1, start, end - start, exc)
                if attempt + 1 < self.policy.attempts:
                    await trio.sleep(self.policy.backoff * (2**attempt))
        else:
            raise ReadFailed(
                f"layer {layer.name}: stream bytes {start}+{end - start} unavailable after "
                f"{self.policy.attempts} attempts: {last_error}"
            )
        self._fragments.pop((layer.digest, plan.first), None)
        if plan.tail is not None and len(data) > end - start:
            self._keep_fragment(layer, plan.last + 1, data[end - start :])
        bs = layer.cache.block_size
        return {
            b: data[b * bs - start : min((b + 1) * bs, end) - start]
            for b in range(plan.first, plan.last + 1)
        }

    # --- the shared ContentCache tier ---------------------------------------------------------

    async def _from_content(
        self, layer: Layer, plan: _Plan, start: int, end: int
    ) -> dict[int, bytes] | None:
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
        data = b"".join(v for v in values if v is not None)
        expected = min((numbers[-1] + 1) * bs, layer.size) - dstart
        try:
            if len(data) != expected:
                raise VerifyError(f"layer {layer.name}: content cache blocks have "
                                  f"{len(data)} bytes, expected {expected}")
            await trio.to_thread.run_sync(
                self._verify_store, layer, dstart, data, start, end,
                limiter=self._limiter, abandon_on_cancel=True,
            )
        except VerifyError as exc:
            self.stats.verify_failures += 1
            TELEMETRY.verification_failure("contentcache")
            log.warning("layer %s: content cache bytes rejected, trying the registry: %s",
                        layer.name, exc)
            return None
        self.stats.content_hits += 1
        return {
            b: data[b * bs - dstart : min((b + 1) * bs, layer.size) - dstart]
            for b in range(plan.first, plan.last + 1)
        }

    def _verify_store(self, layer: Layer, dstart: int, data: bytes, start: int, end: int) -> None:
        """Worker thread: verify every chunk touching [start, end), then store those blocks."""
        if self.policy.verify:
            layer.verify_cover(dstart, data, start, end)
        try:
            layer.cache.store(start, memoryview(data)[start - dstart : end - dstart])
        except OSError as exc:
            log.warning("layer %s: disk cache write failed: %s", layer.name, exc)

    async def _call_content(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        if self.bridge is not None:
            return await self.bridge.to_asyncio(fn, *args)
        return await fn(*args)

    def _share(self, layer: Layer, blocks: dict[int, bytes]) -> None:
        """Queue registry-fetched blocks for the ContentCache without waiting (puts are
        bounded and dropped when the cache's queue is full)."""
        if isinstance(self.content, NoContentCache):
            return
        for b, data in blocks.items():
            coro = self.content.put_block(layer.digest, b, data)
            if self.bridge is not None and not self.bridge.loop.is_closed():
                asyncio.run_coroutine_threadsafe(coro, self.bridge.loop)
            else:
                coro.close()

    def _keep_fragment(self, layer: Layer, block: int, data: bytes) -> None:
        self._fragments[(layer.digest, block)] = data
        while len(self._fragments) > _MAX_FRAGMENTS:
            self._fragments.popitem(last=False)

    async def _call_source(self, layer: Layer, coff: int, length: int) -> bytes:
        if self.bridge is not None:
            data = await self.bridge.to_asyncio(layer.source, coff, length)
        else:
            data = await layer.source(coff, length)
        if len(data) != length:
            raise ReadFailed(
                f"layer {layer.name}: source returned {len(data)} bytes for {coff}+{length}"
            )
        return data

    def _inflate_store(
        self, layer: Layer, begin: Checkpoint | ResumePoint, compressed: bytes, istart: int,
        iend: int, head: bytes, end: int,
    ) -> bytes:
        """Worker thread: inflate [istart, iend), prepend the head fragment, verify, write the
        complete blocks of [start, end) to disk. Returns head + inflated bytes."""
        t0 = time.monotonic()
        result = inflate_from(layer.index, begin, compressed, istart, iend - istart)
        layer.resume.add(result.points)
        inflated = result.data
        TELEMETRY.inflate(time.monotonic() - t0, len(inflated), layer.index.compression)
        self.stats.inflated_bytes += len(inflated)
        data = head + inflated
        start = istart - len(head)
        if self.policy.verify:
            layer.verify(start, data)
        try:
            layer.cache.store(start, memoryview(data)[: end - start])
        except OSError as exc:
            log.warning("layer %s: disk cache write failed: %s", layer.name, exc)
        return data


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one flight covers: blocks first..last, inflating on to `tail` (a checkpoint) when
    set, starting after `fragment` (bytes of block `first` a previous flight already made)."""

    first: int
    last: int
    tail: int | None
    fragment: bytes


_MAX_FRAGMENTS = 64
_MAX_FAILED = 4096


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers -> inclusive (first, last) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


class FileSource:
    """A layer source reading a local blob file (tests, `clip` tools, pre-downloaded blobs).

    Counts the compressed bytes it served, which is how tests measure laziness.
    """

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = os.fspath(path)
        self.bytes_read = 0
        self.calls = 0

    async def __call__(self, coff: int, length: int) -> bytes:
        self.calls += 1
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, coff)
        self.bytes_read += len(data)
        return data
