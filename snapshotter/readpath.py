"""The one read path for every byte a FUSE read returns: memory -> disk -> the layer's source.

Unit of caching and of single flight: aligned blocks of `BLOCK_SIZE` (1 MiB) of the layer's
*uncompressed* stream (the last block ends at the stream end). A FUSE read of a file range maps
to stream bytes `[entry.uoff + off, ... + size)`, which touch one or two blocks.

- Every block present on disk: one `pread` inside the trio loop, no thread hop.
- Missing blocks: consecutive missing blocks form a *run*, widened to the whole checkpoint interval
  it falls in (the compressed bytes for that are fetched anyway, so inflating them once saves a
  refetch on the next sequential read), capped at `ReadPolicy.max_run` bytes. One *flight* per
  run: fetch `compressed_range()` from the layer source (an async callable on the asyncio side,
  reached through the Bridge), `inflate_range()` in a worker thread, verify every file chunk lying
  wholly inside the run against `chunk_digests`, store each complete block on disk and in memory.
  Concurrent reads needing a block in flight wait for that flight instead of fetching again.
- A flight retries a failing source with backoff and gives up after `ReadPolicy.timeout` seconds
  in total; its readers get `ReadFailed` (EIO at the FUSE layer) — never a hang.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from snapshotter.bridge import Bridge
from snapshotter.cache import LayerCache, MemoryTier
from snapshotter.errors import Unavailable
from snapshotter.index import EntryType, LayerIndex, inflate_range

log = logging.getLogger(__name__)

#: An async callable returning `length` compressed bytes of the blob starting at `coff`.
Source = Callable[[int, int], Awaitable[bytes]]


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


class Layer:
    """Read-side state of one attached layer: its index, source and disk cache."""

    def __init__(self, name: str, index: LayerIndex, source: Source, cache: LayerCache) -> None:
        self.name = name
        self.index = index
        self.source = source
        self.cache = cache
        self.digest = index.blob_digest
        self.size = index.uncompressed_size
        cache.set_size(self.size)
        self._file_starts: list[int] | None = None
        self._file_ordinals: list[int] = []
        self._map_lock = threading.Lock()

    def _file_map(self) -> list[int]:
        """Regular files sorted by stream offset (built on first verification, off the loop)."""
        with self._map_lock:
            if self._file_starts is None:
                pairs = []
                for i in range(len(self.index)):
                    e = self.index.entry(i)
                    if e.type == EntryType.FILE and e.size > 0:
                        pairs.append((e.uoff, i))
                pairs.sort()
                self._file_ordinals = [o for _, o in pairs]
                self._file_starts = [u for u, _ in pairs]
            return self._file_starts

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
    error: Exception | None = None


class ReadPath:
    """Serves stream ranges of attached layers; lives in the trio thread (`bind` a nursery)."""

    def __init__(
        self,
        bridge: Bridge | None = None,
        memory: MemoryTier | None = None,
        policy: ReadPolicy | None = None,
    ) -> None:
        self.bridge = bridge
        self.memory = memory if memory is not None else MemoryTier()
        self.policy = policy if policy is not None else ReadPolicy()
        self.stats = ReadStats()
        self._flights: dict[tuple[str, int], _Flight] = {}
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
        cache = layer.cache
        if cache.has_range(uoff, length):
            self.stats.disk_hits += 1
            return cache.read(uoff, length)
        blocks = cache.block_range(uoff, length)
        parts: dict[int, bytes] = {}
        missing: list[int] = []
        for b in blocks:
            data = self._local_block(layer, b)
            if data is None:
                missing.append(b)
            else:
                parts[b] = data
        if missing:
            self.stats.misses += 1
            parts.update(await self._fetch(layer, missing))
        joined = b"".join(parts[b] for b in blocks)
        start = uoff - blocks[0] * cache.block_size
        return joined[start : start + length]

    def _local_block(self, layer: Layer, block: int) -> bytes | None:
        data = self.memory.get(layer.digest, block)
        if data is not None:
            self.stats.memory_hits += 1
            return data
        if layer.cache.has(block):
            self.stats.disk_hits += 1
            start, end = self._block_span(layer, block)
            return layer.cache.read(start, end - start)
        return None

    def _block_span(self, layer: Layer, block: int) -> tuple[int, int]:
        bs = layer.cache.block_size
        return block * bs, min((block + 1) * bs, layer.size)

    # --- misses -------------------------------------------------------------------------------

    async def _fetch(self, layer: Layer, missing: list[int]) -> dict[int, bytes]:
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
        # The flight itself is bounded by policy.timeout; this is a belt-and-braces bound.
        with trio.move_on_after(self.policy.timeout + 5.0):
            for b, flight in waits:
                await flight.event.wait()
                if flight.error is not None:
                    self.stats.failures += 1
                    raise ReadFailed(str(flight.error)) from flight.error
                got[b] = flight.blocks[b]
            return got
        self.stats.failures += 1
        raise ReadFailed(f"layer {layer.name}: read timed out after {self.policy.timeout}s")

    def _start_flight(self, layer: Layer, first: int, last: int) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("ReadPath.bind() was not called")
        first, last = self._widen(layer, first, last)
        flight = _Flight()
        for b in range(first, last + 1):
            self._flights[(layer.digest, b)] = flight
        self.stats.flights += 1
        self._nursery.start_soon(self._fly, layer, first, last, flight)
        return flight

    def _free(self, layer: Layer, block: int) -> bool:
        return not layer.cache.has(block) and (layer.digest, block) not in self._flights

    def _widen(self, layer: Layer, first: int, last: int) -> tuple[int, int]:
        """Grow a run to the blocks its compressed range inflates anyway (see module doc)."""
        if layer.index.compression == "none":
            return first, last
        bs = layer.cache.block_size
        limit = max(1, self.policy.max_run // bs)
        floor = layer.index.checkpoint_before(first * bs).uoff
        while first > 0 and (first - 1) * bs >= floor and last - first + 1 < limit:
            if not self._free(layer, first - 1):
                break
            first -= 1
        ceiling = self._next_checkpoint(layer, (last + 1) * bs, limit - (last - first + 1))
        nblocks = -(-layer.size // bs)
        while last + 1 < nblocks and last - first + 1 < limit:
            if min((last + 2) * bs, layer.size) > ceiling or not self._free(layer, last + 1):
                break
            last += 1
        return first, last

    def _next_checkpoint(self, layer: Layer, uoff: int, blocks: int) -> int:
        """Stream offset of the first checkpoint at/after uoff, probing at most `blocks` blocks
        ahead; the stream end if none follows; uoff itself when none is found that close."""
        bs = layer.cache.block_size
        for k in range(1, blocks + 1):
            probe = uoff + k * bs
            if probe >= layer.size:
                cp = layer.index.checkpoint_before(layer.size)
                return cp.uoff if cp.uoff >= uoff else layer.size
            cp = layer.index.checkpoint_before(probe)
            if cp.uoff >= uoff:
                return int(cp.uoff)
        return uoff

    async def _fly(self, layer: Layer, first: int, last: int, flight: _Flight) -> None:
        start, _ = self._block_span(layer, first)
        _, end = self._block_span(layer, last)
        flight.error = ReadFailed(f"layer {layer.name}: read of {start}+{end - start} cancelled")
        try:
            with trio.fail_after(self.policy.timeout):
                flight.blocks = await self._fetch_run(layer, start, end)
            flight.error = None
        except trio.TooSlowError:
            flight.error = ReadFailed(
                f"layer {layer.name}: source did not deliver stream bytes {start}+{end - start} "
                f"within {self.policy.timeout}s"
            )
        except Exception as exc:
            flight.error = exc if isinstance(exc, ReadFailed) else ReadFailed(str(exc))
        finally:
            for b in range(first, last + 1):
                if self._flights.get((layer.digest, b)) is flight:
                    del self._flights[(layer.digest, b)]
            flight.event.set()
        for b, data in flight.blocks.items():
            self.memory.put(layer.digest, b, data)

    async def _fetch_run(self, layer: Layer, start: int, end: int) -> dict[int, bytes]:
        coff, cend = layer.index.compressed_range(start, end - start)
        last_error: Exception | None = None
        for attempt in range(self.policy.attempts):
            try:
                compressed = await self._call_source(layer, coff, cend - coff)
                self.stats.compressed_bytes += len(compressed)
                return await trio.to_thread.run_sync(
                    self._inflate_store, layer, coff, compressed, start, end,
                    limiter=self._limiter, abandon_on_cancel=True,
                )
            except Exception as exc:
                self.stats.source_errors += 1
                last_error = exc
                log.warning("layer %s: attempt %d for %d+%d failed: %s",
                            layer.name, attempt + 1, start, end - start, exc)
                if attempt + 1 < self.policy.attempts:
                    await trio.sleep(self.policy.backoff * (2**attempt))
        raise ReadFailed(
            f"layer {layer.name}: stream bytes {start}+{end - start} unavailable after "
            f"{self.policy.attempts} attempts: {last_error}"
        )

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
        self, layer: Layer, coff: int, compressed: bytes, start: int, end: int
    ) -> dict[int, bytes]:
        """Worker thread: inflate, verify, write to disk; returns the run's blocks."""
        data = inflate_range(layer.index, coff, compressed, start, end - start)
        if len(data) != end - start:
            raise ReadFailed(f"layer {layer.name}: inflate gave {len(data)} of {end - start}")
        self.stats.inflated_bytes += len(data)
        if self.policy.verify:
            layer.verify(start, data)
        try:
            layer.cache.store(start, data)
        except OSError as exc:
            log.warning("layer %s: disk cache write failed: %s", layer.name, exc)
        bs = layer.cache.block_size
        return {
            b: data[b * bs - start : min((b + 1) * bs, end) - start]
            for b in range(start // bs, -(-end // bs))
        }


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
