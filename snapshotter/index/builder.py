"""``build_index``: one streaming pass over a layer blob produces its clip index.

The pipeline is blob reader (sha256 + size of the compressed bytes) -> decoder (gzip via the
ctypes inflater, zstd via ``zstandard``, or passthrough) -> ``on_data`` and the tar scanner ->
tree -> serialised index. Only 32 KiB windows of emitted checkpoints, per-entry metadata and
digests are kept, so memory does not grow with the layer size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from snapshotter.index import inflate as zi
from snapshotter.index.model import BuildResult, IndexBuildOptions, LayerFormatError
from snapshotter.index.tarscan import TarScanner
from snapshotter.index.tree import Tree
from snapshotter.index.writer import Meta, RawCheckpoint, serialise

READ_SIZE = 1 << 20
ZSTD_READ_SIZE = 1 << 15  # small: a zstd frame can expand ~32000x per input byte
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

OnData = Callable[[int, memoryview], None]


def detect(head: bytes) -> str:
    """Compression of a blob from its first bytes."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Sink:
    """Receives the uncompressed stream in order: forwards it to on_data and the tar scanner."""

    def __init__(self, scanner: TarScanner, on_data: OnData | None) -> None:
        self.scanner = scanner
        self.on_data = on_data
        self.uoff = 0

    def push(self, data: bytes) -> None:
        if not data:
            return
        if self.on_data is not None:
            self.on_data(self.uoff, memoryview(data))
        self.uoff += len(data)
        self.scanner.feed(data)


class _GzipDecoder:
    """Inflates gzip members one after another, choosing checkpoints at deflate block ends.

    At every block boundary the boundary becomes the *candidate*; it is emitted as a checkpoint
    when the compressed distance from the last checkpoint reaches the spacing, or when a large
    file's data starts inside the block that follows it.
    """

    def __init__(self, sink: _Sink, options: IndexBuildOptions) -> None:
        self.sink = sink
        self.opts = options
        self.inf = zi.Inflater(zi.GZIP)
        self.consumed = 0  # compressed bytes handed to the inflater
        self.tail = b""  # last 32 KiB of output: the window at the current position
        self.checkpoints: list[RawCheckpoint] = []
        self.candidate: RawCheckpoint | None = None
        self.large_start: int | None = None
        self.member_done = False
        self.trailing = False  # inside zero padding after the last member

    def on_file_start(self, uoff: int, size: int) -> None:
        if size >= self.opts.large_file_size and self.large_start is None:
            self.large_start = uoff

    def feed(self, data: bytes) -> None:
        if self.member_done and data[:1] == b"\0":
            self.trailing = True
        if self.trailing:
            self._check_padding(data, self.consumed)
            self.consumed += len(data)
            return
        self.member_done = False
        self.consumed += len(data)
        self.inf.feed(data)
        self._drain()

    def _drain(self) -> None:
        inf = self.inf
        while True:
            try:
                rc, out = inf.run(zi.Z_BLOCK)
            except zi.InflateError as exc:
                at = self.consumed - inf.avail_in
                raise LayerFormatError(f"corrupt gzip data near offset {at}: {exc}") from None
            if len(out):
                self._output(bytes(out))
            if rc == zi.Z_BUF_ERROR:
                return
            if rc == zi.Z_STREAM_END:
                if not self._next_member():
                    return
                continue
            if inf.data_type & 0xC0 == 0x80:
                self._boundary()
            if not inf.avail_in and not len(out):
                return

    def _output(self, data: bytes) -> None:
        self.sink.push(data)
        if len(data) >= zi.WINDOW_SIZE:
            self.tail = data[-zi.WINDOW_SIZE :]
        else:
            self.tail = (self.tail + data)[-zi.WINDOW_SIZE :]

    def _boundary(self) -> None:
        bits = self.inf.data_type & 7
        coff = self.consumed - self.inf.avail_in - (1 if bits else 0)
        here = RawCheckpoint(coff, bits, self.sink.uoff, self.tail)
        large = self.large_start
        if large is not None and here.uoff >= large:
            self.large_start = None
            pick = here if here.uoff == large else self.candidate
            if pick is not None:
                self._emit(pick)
        self.candidate = here
        last = self.checkpoints[-1] if self.checkpoints else None
        if (
            last is None
            or coff - last.coff >= self.opts.checkpoint_spacing
            or here.uoff - last.uoff >= self.opts.max_span
        ):
            self._emit(here)

    def _emit(self, cp: RawCheckpoint) -> None:
        if self.checkpoints and self.checkpoints[-1].uoff >= cp.uoff:
            return
        self.checkpoints.append(cp)

    def _next_member(self) -> bool:
        """After a member's trailer: start the next member, or accept zero padding."""
        rest = self.inf.unused_input()
        if rest and rest[0] == 0:
            self.trailing = True
            self._check_padding(rest, self.consumed - len(rest))
            return False
        self.inf.reset(zi.GZIP)
        self.member_done = not rest
        if rest:
            self.inf.feed(rest)
        return bool(rest)

    def _check_padding(self, data: bytes, at: int) -> None:
        if data.count(0) != len(data):
            raise LayerFormatError(f"garbage after the last gzip member near offset {at}")

    def finish(self) -> None:
        if not (self.member_done or self.trailing):
            raise LayerFormatError("gzip stream is truncated (no end of the last member)")
        self.inf.close()


class _ZstdDecoder:
    """Decompresses zstd frames in order; every frame start is a checkpoint."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.consumed = 0
        self.frame_start = 0
        self.checkpoints: list[RawCheckpoint] = [RawCheckpoint(0, 0, 0, b"")]
        self.in_frame = False

    def feed(self, data: bytes) -> None:
        while data:
            if not self.in_frame and self.consumed:
                self._frame_start()
            self.in_frame = True
            start = self.consumed
            self.consumed += len(data)
            try:
                out = self.obj.decompress(data)
            except zstandard.ZstdError as exc:
                raise LayerFormatError(f"corrupt zstd data near offset {start}: {exc}") from None
            self.sink.push(out)
            if not self.obj.eof:
                return
            data = self.obj.unused_data
            self.consumed -= len(data)
            self.in_frame = False
            self.obj = self.dctx.decompressobj()

    def _frame_start(self) -> None:
        cp = RawCheckpoint(self.consumed, 0, self.sink.uoff, b"")
        if self.checkpoints[-1].uoff == cp.uoff:
            self.checkpoints[-1] = cp  # an empty frame: the later start is closer
        else:
            self.checkpoints.append(cp)

    def finish(self) -> None:
        if self.in_frame:
            raise LayerFormatError("zstd stream is truncated (last frame is incomplete)")


class _PlainDecoder:
    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.checkpoints: list[RawCheckpoint] = []

    def feed(self, data: bytes) -> None:
        self.sink.push(data)

    def finish(self) -> None:
        return


def build_index(
    blob: BinaryIO,
    out: BinaryIO | os.PathLike[str] | str,
    options: IndexBuildOptions = IndexBuildOptions(),  # noqa: B008 - frozen, immutable
    on_data: OnData | None = None,
) -> BuildResult:
    """Read ``blob`` once (it need not be seekable) and write its index to ``out``.

    ``on_data(uoff, view)`` receives the uncompressed stream in order; the view is over an
    immutable buffer, so it may be kept. When ``out`` is a path the index is written to a
    temporary file next to it and renamed into place, so a failed build leaves nothing behind.
    """
    started = time.monotonic()
    tree = Tree()
    scanner = TarScanner(options, tree.add)
    sink = _Sink(scanner, on_data)
    sha = hashlib.sha256()
    head = blob.read(READ_SIZE)
    compression = detect(head)
    decoder: _GzipDecoder | _ZstdDecoder | _PlainDecoder
    read_size = READ_SIZE
    if compression == "gzip":
        decoder = _GzipDecoder(sink, options)
        scanner.on_file_start = decoder.on_file_start
    elif compression == "zstd":
        decoder = _ZstdDecoder(sink)
        read_size = ZSTD_READ_SIZE
    else:
        decoder = _PlainDecoder(sink)
    compressed_size = 0
    chunk = head
    while chunk:
        sha.update(chunk)
        compressed_size += len(chunk)
        for i in range(0, len(chunk), read_size):
            decoder.feed(chunk[i : i + read_size])
        chunk = blob.read(READ_SIZE)
    decoder.finish()
    scanner.finish()
    if compressed_size == 0:
        raise LayerFormatError("layer blob is empty")
    nodes = tree.ordered()
    meta = Meta(compression, options.chunk_size, sink.uoff, compressed_size, sha.digest())
    data = serialise(nodes, decoder.checkpoints, meta)
    _write(out, data)
    return BuildResult(
        entries=len(nodes),
        uncompressed_size=sink.uoff,
        compressed_size=compressed_size,
        index_size=len(data),
        checkpoints=len(decoder.checkpoints),
        seconds=time.monotonic() - started,
        blob_digest="sha256:" + sha.hexdigest(),
        index_digest="sha256:" + hashlib.sha256(data).hexdigest(),
        compression=compression,
    )


def _write(out: BinaryIO | os.PathLike[str] | str, data: bytes) -> None:
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
