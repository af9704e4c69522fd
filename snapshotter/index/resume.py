"""Resume points: restart gzip inflation where an earlier read stopped, not at a checkpoint.

An index checkpoint can lie up to ``checkpoint_spacing`` (2 MiB) of compressed data before a
read, and every read from it fetches and inflates that whole prefix again. While a read
inflates, it passes deflate block boundaries; at any of them inflation could restart with the
same four facts a checkpoint stores (compressed offset, bit offset, uncompressed offset, the
32 KiB window before it). ``inflate_from`` records such *resume points* as it goes, at most one
per ``record_every`` uncompressed bytes plus the block boundary just past the range, and starts
from either a checkpoint or a resume point. The read path keeps a bounded set of points per
layer (``ResumePoints``) and starts each fetch at the nearest one, so a later read in the same
checkpoint interval costs only the bytes after the point.

Which boundaries become points is a property of the stream alone: the first boundary at or
after each multiple of ``record_every`` (and the first boundary at or after the range end). So
two reads that pass the same place record the same point, whatever they started from.

Another node can publish points too: ``RestartPoint``s in a layer's start profile (a block
boundary of the index, whose version 2 marks carry bit offsets, with its window compressed;
see snapshotter/remote/profile.py). ``ResumePoints.publish`` keeps them beside the recorded
ones and ``best_start`` considers both.

gzip only. Plain tar is random access already (the range itself is fetched), and zstd frames
have no block-level restart state that could be captured from Python (``zstandard`` exposes no
way to snapshot or prime a decompression context mid-frame); a zstd layer restarts at frame
starts, which the index records as checkpoints. For those layers ``inflate_from`` with a
``Checkpoint`` behaves like ``inflate_range`` and records no points.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import zstandard

from snapshotter.index import _native
from snapshotter.index import inflate as zi
from snapshotter.index.model import Checkpoint, LayerFormatError
from snapshotter.index.reader import LayerIndex, inflate_range

#: the longest range one inflation takes: its output buffer is one piece for the C block
#: loop, whose zlib stream counts output room in 32 bits
MAX_RANGE = 1 << 30
#: default spacing of recorded points, in uncompressed bytes
RECORD_EVERY = 256 << 10
#: past the range end, inflation continues to the next block boundary for at most this many
#: bytes (deflate blocks are usually 20-100 KiB; a run of zeros can make one megabytes long)
TAIL_LIMIT = 1 << 20
WINDOW = zi.WINDOW_SIZE
#: block boundaries one C call may record (a range of a few MiB passes tens of them)
BOUNDS_PER_CALL = 64


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """A deflate block boundary of one gzip layer where inflation can restart.

    Same meaning as a ``Checkpoint``'s fields (``coff`` first compressed byte, ``bits`` high
    bits of that byte that belong to the block, ``uoff`` uncompressed offset), plus the window
    itself (the up to 32 KiB of stream before ``uoff``) and the digest of the blob it belongs
    to, so a point is never applied to another layer.
    """

    blob_digest: str
    coff: int
    bits: int
    uoff: int
    window: bytes
    #: made from a `RestartPoint` another node published (not recorded here)
    published: bool = False


@dataclass(frozen=True, slots=True)
class RestartPoint:
    """A deflate block boundary another node published (`coff`, `bits`, `uoff`, as in a
    `Checkpoint`) and the zstd frame of the up to 32 KiB of stream before it, decompressed
    only when a fetch starts there (a node keeps dozens of these per layer)."""

    coff: int
    bits: int
    uoff: int
    packed: bytes

    @property
    def place(self) -> Checkpoint:
        return Checkpoint(-1, self.coff, self.bits, self.uoff)

    def window(self) -> bytes:
        """The window; ValueError when the frame is corrupt or of the wrong size."""
        try:
            window = zstandard.ZstdDecompressor().decompress(self.packed, max_output_size=WINDOW)
        except zstandard.ZstdError as exc:
            raise ValueError(f"restart point at {self.uoff}: corrupt window ({exc})") from None
        if len(window) != min(WINDOW, self.uoff):
            raise ValueError(f"restart point at {self.uoff}: window of {len(window)} bytes")
        return window


Start = Checkpoint | ResumePoint


@dataclass(frozen=True, slots=True)
class InflateResult:
    """The requested bytes and the resume points passed on the way, in stream order.

    For a gzip layer ``data`` is a view of the inflation's own output buffer (never copied:
    the read path hands slices of it on and copies only what it keeps)."""

    data: bytes | memoryview
    points: tuple[ResumePoint, ...]


def compressed_range_from(
    index: LayerIndex, start: Start, uoff: int, length: int
) -> tuple[int, int]:
    """(coff_start, coff_end): the compressed bytes ``inflate_from(index, start, …)`` needs to
    produce [uoff, uoff+length), i.e. from ``start`` to just past the first deflate block end
    at or after the range end (the same end ``compressed_range`` names)."""
    _check_start(index, start, uoff)
    end = index.compressed_range(uoff, length)[1]
    if index.compression == "none":
        return uoff, end
    return start.coff, max(end, start.coff)


def inflate_from(
    index: LayerIndex,
    start: Start,
    compressed: bytes,
    uoff: int,
    length: int,
    *,
    record_every: int | None = RECORD_EVERY,
) -> InflateResult:
    """Uncompressed bytes [uoff, uoff+length) from ``compressed`` (which begins at
    ``start.coff``, as ``compressed_range_from`` names), and the resume points passed.

    Pure CPU and thread-safe (each call has its own inflate stream; ctypes releases the GIL).
    ``record_every=None`` records nothing (then it costs the same as ``inflate_range``). Raises
    LayerFormatError when the bytes do not inflate or end before the range does, ValueError for
    a gzip range longer than ``MAX_RANGE``.
    """
    _check_start(index, start, uoff)
    index.compressed_range(uoff, length)  # validates the range against the layer
    if length == 0:
        return InflateResult(b"", ())
    if index.compression == "none":
        return InflateResult(inflate_range(index, uoff, compressed, uoff, length), ())
    if index.compression == "zstd":
        if isinstance(start, ResumePoint):
            raise ValueError("resume points exist only for gzip layers")
        return InflateResult(inflate_range(index, start.coff, compressed, uoff, length), ())
    if record_every is not None and record_every <= 0:
        raise ValueError("record_every must be positive")
    window = start.window if isinstance(start, ResumePoint) else index.window(start)
    run = _Run(index.blob_digest, start, window, uoff + length, record_every)
    try:
        run.inflate(bytes(compressed))
    except zi.InflateError as exc:
        raise LayerFormatError(
            f"layer {index.blob_digest}: corrupt gzip data after offset {start.coff}: {exc}"
        ) from None
    data = run.slice(uoff, uoff + length)
    if len(data) != length:
        raise LayerFormatError(
            f"layer {index.blob_digest}: compressed range at {start.coff} "
            f"ends before uncompressed offset {uoff + length}"
        )
    return InflateResult(data, tuple(run.points))


def _check_start(index: LayerIndex, start: Start, uoff: int) -> None:
    if isinstance(start, ResumePoint) and start.blob_digest != index.blob_digest:
        raise ValueError(
            f"resume point of layer {start.blob_digest} used with layer {index.blob_digest}"
        )
    if start.uoff > uoff:
        raise ValueError(f"start at uncompressed offset {start.uoff} is after {uoff}")


class _Run:
    """One inflation from a start point, recording boundaries as it goes.

    Output is inflated straight into ``out``, a buffer sized once for the range (plus the
    tail allowance when recording), from ``start.uoff`` on; ``n`` bytes of it are filled.
    The loop over deflate blocks runs in C (``Inflater.run_blocks``, as the index build's
    does): it returns to Python once per ``BOUNDS_PER_CALL`` block boundaries, or at the
    first boundary past the range, not at every block. Returning at every block (a few
    thousand times in a lazy scipy start) meant taking the GIL back each time from the
    threads serving the container, and py-spy counted the inflating threads' waits as
    most of the daemon's samples. The buffer is a ``_native.new_piece``, not zeroed first
    (a zeroed ctypes array touched every page of the 1 MiB tail allowance most reads never
    use, ~1.3 ms a read); slices of it are handed on as views. The compressed position of
    the inflater is ``fed_end - avail_in`` because every buffer fed is a suffix of the
    caller's.
    """

    def __init__(
        self, digest: str, start: Start, window: bytes, end: int, every: int | None
    ) -> None:
        self.digest = digest
        self.start = start
        self.window = window
        self.end = end
        self.every = every
        capacity = end - start.uoff + (TAIL_LIMIT + 1 if every is not None else 0)
        if capacity > MAX_RANGE:
            raise ValueError(f"a range of {end - start.uoff} bytes is longer than one "
                             f"inflation takes ({MAX_RANGE} bytes with the tail allowance)")
        self.buffer = _native.new_piece(max(capacity, 1))
        self.out = memoryview(self.buffer)
        self.capacity = capacity
        self.n = 0
        self.points: list[ResumePoint] = []
        self.last_boundary = start.uoff  # the previous boundary seen (the start is one)
        self.inf = zi.Inflater(zi.RAW)
        self.bounds = zi.new_bounds(BOUNDS_PER_CALL)

    def inflate(self, compressed: bytes) -> None:
        inf = self.inf
        try:
            if not compressed:
                return  # the caller reports the missing bytes
            skip = 0
            if self.start.bits:
                inf.prime(self.start.bits, compressed[0] >> (8 - self.start.bits))
                skip = 1  # the primed byte (fed from the next one on: no copy)
            inf.set_dictionary(self.window)
            fed_end = self.start.coff + len(compressed)
            inf.feed_bytes(compressed, skip)
            self._loop(fed_end)
        finally:
            inf.close()

    def _loop(self, fed_end: int) -> None:
        inf = self.inf
        fields = zi.BOUND_FIELDS
        trailer = 8  # the start's member is inflated raw; later members in gzip mode
        stop = self.end - self.start.uoff if self.every is not None else -1
        while self.n < self.capacity:
            in_start = fed_end - inf.avail_in
            rc, _piece, filled, count = inf.run_blocks([self.buffer], self.n, self.bounds, stop)
            self.n = filled
            found = self.bounds[: fields * count]
            if self.every is not None:
                for k in range(0, len(found), fields):
                    _p, offset, in_rel, bits = found[k : k + fields]
                    if self._boundary(offset, in_start + in_rel, bits):
                        return
            if rc == zi.Z_STREAM_END:
                rest = inf.unused_input()[trailer:]
                if not rest or rest[0] == 0:
                    return
                inf.reset(zi.GZIP)
                inf.feed_bytes(rest)  # a suffix of the input: ``fed_end`` stays
                trailer = 0
                continue
            if rc == zi.Z_BUF_ERROR:
                return
            last_offset = found[-fields + 1] if count else -1  # of the last boundary
            if count < BOUNDS_PER_CALL and not (stop >= 0 and last_offset >= stop):
                return  # the input is used up

    def _boundary(self, offset: int, consumed: int, bits: int) -> bool:
        """Record the boundary at ``offset`` in the buffer if it is due; True once past the
        range end."""
        uoff = self.start.uoff + offset
        assert self.every is not None
        prev, self.last_boundary = self.last_boundary, uoff
        tail = uoff >= self.end
        if uoff == prev or not (tail or uoff // self.every > prev // self.every):
            return False
        coff = consumed - (1 if bits else 0)
        self.points.append(ResumePoint(self.digest, coff, bits, uoff, self._window(uoff)))
        return tail

    def _window(self, uoff: int) -> bytes:
        rel = uoff - self.start.uoff
        if rel >= WINDOW:
            return bytes(self.out[rel - WINDOW : rel])
        return (self.window + bytes(self.out[:rel]))[-WINDOW:]

    def slice(self, a: int, b: int) -> memoryview:
        """A view (no copy) of the inflated bytes [a, b), cut short where inflation ended."""
        base = self.start.uoff
        return self.out[a - base : min(b - base, self.n)]


class ResumePoints:
    """A bounded, thread-safe set of one layer's resume points (least recently used go first).

    ``best_start(uoff)`` is the nearest known point at or before ``uoff`` when it is after the
    index checkpoint there, else that checkpoint; ``add`` takes the points an inflation
    returned. Each point holds its 32 KiB window, so ``max_points=256`` is 8 MiB per layer.
    ``publish`` adds the restart points of the layer's start profile (kept apart, windows
    compressed, never evicted: they are few and each is the start of a profile run);
    ``forget_published`` drops them when a fetch from one failed.
    """

    def __init__(self, index: LayerIndex, max_points: int = 256) -> None:
        if max_points <= 0:
            raise ValueError("max_points must be positive")
        self.index = index
        self.max_points = max_points
        self._uoffs: list[int] = []  # sorted
        self._points: OrderedDict[int, ResumePoint] = OrderedDict()  # LRU order
        self._published: list[RestartPoint] = []  # sorted by uoff
        self._published_uoffs: list[int] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._points)

    def add(self, points: tuple[ResumePoint, ...] | list[ResumePoint]) -> None:
        with self._lock:
            for p in points:
                if p.blob_digest != self.index.blob_digest:
                    raise ValueError(f"resume point of layer {p.blob_digest} added to "
                                     f"the points of {self.index.blob_digest}")
                if p.uoff in self._points:
                    self._points.move_to_end(p.uoff)
                    continue
                self._points[p.uoff] = p
                bisect.insort(self._uoffs, p.uoff)
            while len(self._points) > self.max_points:
                old, _p = self._points.popitem(last=False)
                del self._uoffs[bisect.bisect_left(self._uoffs, old)]

    def publish(self, points: Iterable[RestartPoint]) -> int:
        """Take the published points that are exactly block boundaries of this layer's index
        (the others are ignored); returns how many were taken."""
        valid = sorted((p for p in points if self.index.is_boundary(p.place)),
                       key=lambda p: p.uoff)
        with self._lock:
            self._published = valid
            self._published_uoffs = [p.uoff for p in valid]
        return len(valid)

    @property
    def published(self) -> int:
        return len(self._published)

    def forget_published(self) -> None:
        """Drop the published points (a fetch from one did not inflate or verify, or the
        layer is complete on disk)."""
        with self._lock:
            self._published, self._published_uoffs = [], []

    def best_start(self, uoff: int) -> Start:
        best: Start = self.index.checkpoint_before(uoff)
        with self._lock:
            i = bisect.bisect_right(self._uoffs, uoff) - 1
            if i >= 0 and self._uoffs[i] > best.uoff:
                best = self._points[self._uoffs[i]]
                self._points.move_to_end(best.uoff)
            j = bisect.bisect_right(self._published_uoffs, uoff) - 1
            if j < 0 or self._published_uoffs[j] <= best.uoff:
                return best
            chosen = self._published[j]
        try:
            window = chosen.window()
        except ValueError:
            self.forget_published()
            return best
        return ResumePoint(self.index.blob_digest, chosen.coff, chosen.bits, chosen.uoff,
                           window, published=True)
