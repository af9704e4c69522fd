"""``build_index``: one streaming pass over a layer blob produces its clip index.

Four threads form a pipeline. The reading thread reads the blob and hashes it; the decoding
thread decodes it (zlib-ng inflate in C, or zstd) and queues 1 MiB pieces; the calling thread
feeds the uncompressed bytes to ``on_data`` and the tar scanner, builds the tree and chooses
checkpoints; the side thread (``SideWorker``) hashes file data and compresses the chosen
checkpoints' windows. Everything but the tar parsing releases the GIL, so on two cores the
threads overlap; the end of the build (numbering and encoding the entries, then the index
body) runs once, mostly in C. The queues are bounded, so memory stays bounded: only the 32 KiB
windows of chosen checkpoints, per-entry metadata and digests are kept, never the layer.
"""

from __future__ import annotations

import array
import collections
import hashlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from snapshotter.index.decoders import (
    Bound,
    Decoder,
    GzipDecoder,
    Piece,
    PlainDecoder,
    ZstdDecoder,
)
from snapshotter.index.density import DensityBudget, DensityRule, Kept, prune
from snapshotter.index.digests import DeferredDigests
from snapshotter.index.model import BuildResult, IndexBuildOptions, LayerFormatError
from snapshotter.index.tarscan import TarScanner
from snapshotter.index.tree import Tree
from snapshotter.index.worker import SideWorker
from snapshotter.index.writer import Meta, RawCheckpoint, assemble, compressor

#: compressed bytes per read. Each chunk costs the decoding thread a return to Python (and
#: the GIL), a few microseconds per MiB; each chunk alive (one being read, QUEUE_CHUNKS queued,
#: one being decoded) costs its size in memory, times the layers building at once.
READ_SIZE = 1 << 20
HEAD_SIZE = 1 << 16  # the first read, enough to tell the compression
BATCH_BYTES = 1 << 20  # uncompressed bytes per queued batch (gzip: one piece)
#: batches queued for the calling thread: a gzip batch is one 1 MiB piece, so each costs 1 MiB
#: per layer building. Fewer save memory but slow builds that parse many small files (2 or 3:
#: first-node pulls of a 50,000-file image ~8% slower, measured in the bench).
QUEUE_BATCHES = 4
QUEUE_CHUNKS = 2  # compressed chunks read ahead of the decoder (4 gained nothing)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: Pruning aims this share (1/N) of the budget below it: the compressed body shifts by a few
#: KB when checkpoint records leave it (+15 KB on a 2 MB body once), and each miss costs
#: another compression of the whole body.
PRUNE_SLACK = 200
OnData = Callable[[int, memoryview], None]
WINDOW = 32768


def detect(head: bytes) -> str:
    """Compression of a blob from its first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Stopped(Exception):
    """The consumer gave up; the pipeline threads unwind quietly."""


_Item = TypeVar("_Item")


class _Stage(threading.Thread):
    """A pipeline thread with a bounded output queue. Every wait polls ``stop`` so that a
    failing consumer never leaves a thread blocked for good (a thread blocked in the blob's
    own ``read`` is a daemon and holds no resources)."""

    def __init__(self, name: str, stop: threading.Event, depth: int) -> None:
        super().__init__(name=name, daemon=True)
        self.stop = stop
        self.queue: queue.Queue[Any] = queue.Queue(depth)

    def _put(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(self, kind: type[_Item]) -> _Item | BaseException | None:
        """The next item, an exception the stage raised, or None at its end."""
        while not self.stop.is_set():
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is None or isinstance(item, (kind, BaseException)):
                return item
        raise _Stopped

    def _fail(self, exc: BaseException) -> None:
        """Hand ``exc`` downstream, where the calling thread re-raises it."""
        try:
            self._put(exc)
        except _Stopped:
            return


class _Reading(_Stage):
    """Reads the blob and hashes it: sha256 releases the GIL, so the blob digest costs the
    decoding thread nothing (it runs on whichever core is free)."""

    def __init__(self, blob: BinaryIO, head: bytes, stop: threading.Event) -> None:
        super().__init__("clip-index-read", stop, QUEUE_CHUNKS)
        self.blob = blob
        self.head = head
        self.sha = hashlib.sha256()
        self.size = 0

    def run(self) -> None:
        try:
            chunk = self.head
            while chunk:
                self.sha.update(chunk)
                self.size += len(chunk)
                self._put(chunk)
                chunk = self.blob.read(READ_SIZE)
            self._put(None)
        except _Stopped:
            return
        except BaseException as exc:
            self._fail(exc)


class _Decoding(_Stage):
    """Decodes the blob's chunks, handing batches of pieces to the calling thread."""

    def __init__(self, reading: _Reading, compression: str) -> None:
        super().__init__("clip-index-decode", reading.stop, QUEUE_BATCHES)
        self.reading = reading
        self._batch: list[Piece] = []
        self._batched = 0
        self.decoder: Decoder
        if compression == "gzip":
            self.decoder = GzipDecoder(self._emit)
        elif compression == "zstd":
            self.decoder = ZstdDecoder(self._emit)
        else:
            self.decoder = PlainDecoder(self._emit)

    def _emit(self, data: bytes, bounds: list[Bound]) -> None:
        self._batch.append((data, bounds))
        self._batched += len(data)
        if self._batched >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self._put(self._batch)
            self._batch = []
            self._batched = 0

    def run(self) -> None:
        try:
            step = self.decoder.read_size
            while True:
                chunk = self.reading.get(bytes)
                if chunk is None:
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
                for i in range(0, len(chunk), step):
                    self.decoder.feed(chunk[i : i + step])
            self.decoder.finish()
            self._flush()
            self._put(None)
        except _Stopped:
            return
        except BaseException as exc:
            self._fail(exc)


# A restart point seen in a piece, its window not yet cut out: (uoff, coff, bits, piece data,
# offset in the piece, the stream's last 32 KiB before the piece).
_Pending = tuple[int, int, int, bytes, int, bytes]


class _CheckpointPolicy:
    """Chooses gzip checkpoints among block boundaries.

    Every boundary becomes the *candidate*. It is kept when the compressed distance from the
    last checkpoint reaches ``checkpoint_spacing`` or the uncompressed one ``max_span``; and
    when a large file's data starts in the block after a boundary, that boundary is kept too,
    so reading the file never needs the previous file's bytes. Between those, ``DensityBudget``
    adds checkpoints as densely as the index-size budget allows. Windows are cut out of the
    stream only for boundaries that are kept (a few per 2 MiB), never for every block.
    """

    def __init__(self, options: IndexBuildOptions, forced: bool, windowed: bool,
                 worker: SideWorker) -> None:
        self.opts = options
        self.worker = worker
        self.forced = forced
        self.windowed = windowed
        self.checkpoints: list[RawCheckpoint] = []
        # every boundary: its uoff and the compressed bytes needed to produce everything
        # before it; lets compressed_range stop within one deflate block after the range end.
        # Arrays, not lists: an int object per boundary, scattered through the heap among the
        # tree's objects, would keep the freed tree's memory from going back to the system.
        self.mark_uoffs = array.array("Q")
        self.mark_cends = array.array("Q")
        self.mark_bits = array.array("B")  # so any mark is a restart place (given its window)
        self.candidate: _Pending | None = None
        self.large: collections.deque[int] = collections.deque()  # large files' data starts
        self.tail = b""  # the last 32 KiB of stream before the current piece
        rule = DensityRule(options.min_checkpoint_spacing, options.window_share,
                           options.index_share)
        self.density = DensityBudget(rule)
        self.dense: set[int] = set()  # positions of checkpoints only the density rule wants
        self.cctx = compressor()

    def on_large_file(self, uoff: int, size: int) -> None:
        if not self.forced:
            self.large.append(uoff)

    def piece(self, start: int, data: bytes, bounds: list[Bound]) -> None:
        """The restart points of one piece whose data starts at uncompressed ``start``."""
        for rel, coff, bits in bounds:
            here = (start + rel, coff, bits, data, rel, self.tail)
            self._boundary(here)
        if len(data) >= WINDOW:
            self.tail = data[-WINDOW:]
        elif data:
            self.tail = (self.tail + data)[-WINDOW:]

    def _boundary(self, here: _Pending) -> None:
        uoff, coff = here[0], here[1]
        self.mark_uoffs.append(uoff)
        self.mark_cends.append(coff + (1 if here[2] else 0))
        self.mark_bits.append(here[2])
        self.density.on_mark()
        if self.forced:
            self._keep(here)
            return
        large = self.large
        while large and large[0] <= uoff:
            pick = here if large.popleft() == uoff else self.candidate
            if pick is not None:
                self._keep(pick)
        self.candidate = here
        last = self.checkpoints[-1] if self.checkpoints else None
        if (
            last is None
            or coff - last.coff >= self.opts.checkpoint_spacing
            or uoff - last.uoff >= self.opts.max_span
        ):
            self._keep(here)
        elif self.density.due(uoff, uoff - last.uoff, coff - last.coff):
            self._keep(here, dense=True)

    def _keep(self, pending: _Pending, dense: bool = False) -> None:
        uoff, coff, bits, data, rel, tail = pending
        if self.checkpoints and self.checkpoints[-1].uoff >= uoff:
            if not dense:  # now wanted by a fixed rule: never pruned
                self.dense.discard(len(self.checkpoints) - 1)
            if self.forced and self.checkpoints[-1].uoff == uoff:
                # an empty zstd frame: the later start is closer
                self.checkpoints[-1] = RawCheckpoint(coff, bits, uoff, 0, b"")
            return
        window = b""
        if self.windowed:
            last_uoff, last_coff = ((self.checkpoints[-1].uoff, self.checkpoints[-1].coff)
                                    if self.checkpoints else (0, 0))
            self.density.kept(uoff, uoff - last_uoff, coff - last_coff)
            window = data[rel - WINDOW : rel] if rel >= WINDOW else (tail + data[:rel])[-WINDOW:]
        if dense:
            self.dense.add(len(self.checkpoints))
        checkpoint = RawCheckpoint(coff, bits, uoff, len(window), b"")
        if window:
            self.worker.call(self._pack, checkpoint, window)
        self.checkpoints.append(checkpoint)

    def _pack(self, checkpoint: RawCheckpoint, window: bytes) -> None:
        """Compress a window (on the side worker: the calling thread is the busier one)."""
        checkpoint.packed = self.cctx.compress(window)

    def prune(self, overshoot: int, end: Kept) -> bool:
        """Drop dense checkpoints worth ``overshoot`` index bytes; False if none can go.
        ``end`` is the stream end (the last interval's limit)."""
        kept = [Kept(cp.coff, cp.uoff, i in self.dense, len(cp.packed) if i in self.dense else 0)
                for i, cp in enumerate(self.checkpoints)]
        kept.append(end)
        drop = prune(kept, overshoot, self.opts.checkpoint_spacing, self.opts.max_span)
        if not drop:
            return False
        pos = [i for i in range(len(self.checkpoints)) if i not in drop]
        self.checkpoints = [self.checkpoints[i] for i in pos]
        self.dense = {j for j, i in enumerate(pos) if i in self.dense}
        return True


def build_index(
    blob: BinaryIO,
    out: BinaryIO | os.PathLike[str] | str,
    options: IndexBuildOptions = IndexBuildOptions(),  # noqa: B008 - frozen, immutable
    on_data: OnData | None = None,
) -> BuildResult:
    """Read ``blob`` once (it need not be seekable) and write its index to ``out``.

    ``on_data(uoff, view)`` receives the uncompressed stream in order, in the calling thread;
    the view is over an immutable buffer, so it may be kept. When ``out`` is a path the index
    is written to a temporary file next to it and renamed into place, so a failed build leaves
    nothing behind.
    """
    started = time.monotonic()
    head = blob.read(HEAD_SIZE)
    if not head:
        raise LayerFormatError("layer blob is empty")
    compression = detect(head)
    reading = _Reading(blob, head, threading.Event())
    decoding = _Decoding(reading, compression)
    decoder = decoding.decoder
    worker = SideWorker(reading.stop)
    policy = _CheckpointPolicy(options, decoder.forced, decoder.windowed, worker)
    tree = Tree()
    hashing = DeferredDigests(options.chunk_size, worker)
    scanner = TarScanner(options, tree.add, policy.on_large_file, hashing)
    uoff = 0
    reading.start()
    decoding.start()
    try:
        while True:
            batch = decoding.queue.get()
            if batch is None:
                break
            if isinstance(batch, BaseException):
                raise batch
            for data, bounds in batch:
                if data:
                    if on_data is not None:
                        on_data(uoff, memoryview(data))
                    scanner.feed(data)
                    policy.density.on_files(scanner.files, scanner.file_chunks)
                # after the scanner: it has announced every large file starting in this piece
                policy.piece(uoff, data, bounds)
                uoff += len(data)
            hashing.flush()  # hands the side thread this batch's hashing and windows
        scanner.finish()
        hashing.flush()
        worker.close()
    except BaseException:
        # The threads stop at their next queue put or get; the reading thread may be blocked
        # reading a stalled blob, so do not wait for it forever (it is a daemon thread and
        # holds no resources).
        reading.stop.set()
        decoding.join(timeout=5)
        reading.join(timeout=5)
        raise
    decoding.join()
    reading.join()
    meta = Meta(compression, options.chunk_size, uoff, reading.size, reading.sha.digest())
    entries = tree.encode()
    marks = (policy.mark_uoffs, policy.mark_cends, policy.mark_bits)
    data = assemble(entries, policy.checkpoints, marks, meta, policy.cctx)
    budget = int(options.index_share * uoff)
    end = Kept(reading.size, uoff, False, 0)
    while len(data) > budget and policy.prune(len(data) - budget + budget // PRUNE_SLACK, end):
        data = assemble(entries, policy.checkpoints, marks, meta, policy.cctx)
    _write(out, data)
    return BuildResult(
        entries=entries.count,
        uncompressed_size=uoff,
        compressed_size=reading.size,
        index_size=len(data),
        checkpoints=len(policy.checkpoints),
        seconds=time.monotonic() - started,
        blob_digest="sha256:" + reading.sha.hexdigest(),
        index_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        compression=compression,
    )


def _write(out: BinaryIO | os.PathLike[str] | str, data: bytearray) -> None:
    if not isinstance(out, (str, os.PathLike)):
        out.write(data)
        return
    path = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
