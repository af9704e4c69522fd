"""One attached layer as the read path sees it: index, source, disk cache, verification, and the
cancel scopes of everything running for it.

Ownership: every flight and background fetch of a layer runs inside a cancel scope the layer's
`LayerTasks` holds, and worker threads are awaited, never abandoned. `ReadPath.close_layer()`
cancels them all and returns only once none is left, so the caller may then close the layer's
cache file knowing nothing will write to it again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from snapshotter.cache import LayerCache
from snapshotter.index import Checkpoint, EntryType, LayerIndex, ResumePoint, ResumePoints
from snapshotter.readpath.policy import VerifyError
from snapshotter.readpath.ranges import LayerRanges
from snapshotter.readpath.source import Source

#: Stream bytes as the read path hands them on: a flight's blocks are views of its one buffer.
Block = bytes | memoryview


class LayerTasks:
    """The cancel scopes of one layer's running tasks (trio thread only)."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._count = 0
        self._idle: trio.Event | None = None
        self.closed = False

    def spawn(
        self, nursery: trio.Nursery, fn: Callable[..., Awaitable[Any]], *args: Any
    ) -> None:
        """Run `fn(*args)` in `nursery`, owned by this layer (cancelled at once if closed)."""
        self._count += 1
        nursery.start_soon(self._run, fn, *args)

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            with trio.CancelScope() as scope:
                if self.closed:
                    scope.cancel()  # fn still runs its cleanup (a flight wakes its readers)
                self._scopes.add(scope)
                try:
                    await fn(*args)
                finally:
                    self._scopes.discard(scope)
        finally:
            self._count -= 1
            if self._count == 0 and self._idle is not None:
                self._idle.set()

    @property
    def running(self) -> int:
        return self._count

    async def close(self) -> None:
        """Cancel every task of the layer and wait until all (and their threads) are done."""
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()
        while self._count:
            self._idle = trio.Event()
            await self._idle.wait()


class Layer:
    """Read-side state of one attached layer: its index, source and disk cache."""

    def __init__(self, name: str, index: LayerIndex, source: Source, cache: LayerCache) -> None:
        self.name = name
        self.index = index
        self.source = source
        self.cache = cache
        self.digest = index.blob_digest
        self.size = int(index.uncompressed_size)
        #: Everything running for this layer (flights, background fetch).
        self.tasks = LayerTasks()
        # Places inflation can restart besides the index's checkpoints, recorded by every fetch
        # (bounded): a later miss in the same checkpoint interval starts at the nearest one.
        self.resume = ResumePoints(index, max_points=64)
        #: Compressed bytes held and in flight, so no two fetches request the same bytes.
        self.ranges = LayerRanges()
        cache.set_size(self.size)
        self._file_starts: list[int] | None = None
        self._file_ordinals: list[int] = []
        self._file_ends: list[int] = []
        self._map_lock = threading.Lock()
        #: Blocks read by foreground reads while a start profile is being recorded, each with
        #: when it was first read (seconds after the recording started), in the order they were
        #: first read (a dict keeps insertion order: the prefetch's order).
        self.profile: dict[int, float] | None = None
        self.profile_since = 0.0
        self.profile_until = 0.0
        #: Wall-clock time the recording started (the profile's time base: the layers one
        #: container start reads are recorded on one timeline, whenever each was attached).
        self.profile_started = 0.0
        #: The clock of the profile's times (tests replace it).
        self.clock: Callable[[], float] = time.monotonic
        #: Set while the layer's known start profile is being prefetched: its runs are warmed
        #: into the page cache as they land, so the blob server does not also warm around each
        #: answered read (`BlobServer.add`'s ``warm_around``).
        self.prefetching_profile = False
        #: Set once a refused cache write was logged, so a full cache logs once per layer.
        self.cache_full_logged = False

    def best_start(self, uoff: int) -> Checkpoint | ResumePoint:
        """The nearest place at or before `uoff` inflation can restart: a checkpoint, a recorded
        resume point, or the place a held compressed tail starts (`LayerRanges`)."""
        begin = self.resume.best_start(uoff)
        held = self.ranges.restart_before(uoff)
        return held if held is not None and held.uoff > begin.uoff else begin

    def record_profile(self, seconds: float) -> None:
        """Record the blocks foreground reads touch during the next `seconds`, and when."""
        self.profile = {}
        self.profile_started = time.time()
        self.profile_since = self.clock()
        self.profile_until = self.profile_since + seconds

    @property
    def recording_profile(self) -> bool:
        """Whether this node's first reads are being recorded as the layer's start profile."""
        return self.profile is not None and self.clock() < self.profile_until

    def note(self, blocks: range) -> None:
        """Foreground reads touched `blocks` (kept while a start profile is recorded)."""
        if self.profile is None:  # every read comes here: no clock unless recording
            return
        now = self.clock()
        if now < self.profile_until:
            for b in blocks:
                self.profile.setdefault(b, now - self.profile_since)

    def nblocks(self) -> int:
        return -(-self.size // self.cache.block_size)

    def block_span(self, block: int) -> tuple[int, int]:
        bs = self.cache.block_size
        return block * bs, min((block + 1) * bs, self.size)

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

    def verify_cover(self, dstart: int, data: bytes | Sequence[Block], start: int, end: int,
                     ) -> int:
        """Check every chunk digest of the files touching [start, end); `data` (bytes from
        `dstart`, whole or as consecutive pieces, e.g. the ContentCache's blocks, so they are
        never joined into a second copy) must hold all of them (see `chunk_cover`). Returns
        the chunks checked."""
        pieces = _Pieces(dstart, [data] if isinstance(data, bytes | memoryview) else data)
        starts = self._file_map()
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        checked = 0
        while i < len(starts) and starts[i] < end:
            for cu, clen, digest in self.index.chunk_digests(self._file_ordinals[i]):
                if cu + clen <= start or cu >= end:
                    continue
                if cu < dstart or cu + clen > pieces.end:
                    raise VerifyError(f"layer {self.digest}: chunk at {cu}+{clen} not covered")
                if pieces.sha256(cu, cu + clen) != digest:
                    raise VerifyError(f"layer {self.digest}: chunk at {cu}+{clen} is corrupt")
                checked += 1
            i += 1
        return checked

    def verify(self, uoff: int, data: bytes | memoryview) -> int:
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
                        raise VerifyError(f"layer {self.digest}: chunk at {cu}+{clen} is corrupt")
                    checked += 1
            i += 1
        return checked


class _Pieces:
    """Consecutive byte pieces from stream offset `start`, hashed by range without joining."""

    def __init__(self, start: int, pieces: Sequence[Block]) -> None:
        self.views = [memoryview(p) for p in pieces]
        self.starts = list(itertools.accumulate((len(v) for v in self.views), initial=start))
        self.end = self.starts[-1]

    def sha256(self, lo: int, hi: int) -> bytes:
        h = hashlib.sha256()
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            view, base = self.views[i], self.starts[i]
            take = min(hi, base + len(view))
            h.update(view[lo - base : take - base])
            lo, i = take, i + 1
        return h.digest()
