"""Decoders turn compressed blob bytes into an ordered stream of *pieces* of the tar stream.

A piece is ``(data, bounds)``: the next ``data`` bytes of uncompressed stream and the restart
points found while producing them, each ``(rel, coff, bits)`` at uncompressed offset
``piece_start + rel`` (``0 <= rel <= len(data)``). For gzip those are every deflate block
boundary (the builder's policy picks a few of them as checkpoints and derives their 32 KiB
windows from the stream it has already seen); for zstd every frame start (all kept). Decoders
run in the builder's decoding thread; the zlib and zstd calls release the GIL, so decoding
overlaps with tar parsing and hashing in the calling thread.

gzip output is inflated straight into 1 MiB pieces (bytes objects that are then handed on,
never copied), and the loop over deflate blocks runs in C: per block the decoding thread only
records a bound, so its Python work per MiB stays small whatever the block size.
"""

from __future__ import annotations

from collections.abc import Callable

import zstandard

from snapshotter.index import _native
from snapshotter.index import inflate as zi
from snapshotter.index.model import LayerFormatError

Bound = tuple[int, int, int]  # (offset in the piece, coff, bits)
Piece = tuple[bytes, list[Bound]]
Emit = Callable[[bytes, list[Bound]], None]
#: gzip output is handed on in pieces of this size. Every piece costs the decoding thread a
#: trip through the interpreter (and the GIL) and the calling thread a scan call, but a build
#: keeps ~10 pieces alive (queued for the scan, pinned by hashing on the side thread): 4 MiB
#: pieces cost +86 MB of peak RSS building the 50,000-file bench layer and +43-51 MB the scipy
#: one, 1 MiB pieces +62 and +23 MB, in the same time within noise (0.88-1.02 s vs 1.00 s,
#: 3.1-3.8 s both). Piece boundaries shape the index (checkpoint density is re-estimated per
#: piece), so this is part of what makes builds deterministic.
PIECE_SIZE = 1 << 20
#: pieces one C call may fill: a 1 MiB input chunk of a typical layer (gzip -6, ratio 2-3)
#: inflates into at most three, so a call usually consumes its whole chunk (and one spare)
PIECES_PER_CALL = 4
#: block boundaries one C call may record (a piece rarely holds more than ~200 blocks)
BOUNDS_PER_CALL = 1024


class GzipDecoder:
    """Inflates gzip members one after another, reporting every deflate block boundary.

    ``inflate(Z_BLOCK)`` returns at each block end; ``data_type`` then has bit 7 set (and bit 6
    if that was the member's last block) and its low 3 bits say how many bits of the last byte
    consumed belong to the next block. The loop over blocks runs in C (``Inflater.run_blocks``),
    which hands back every boundary of a buffer at once.
    """

    forced = False  # boundaries are candidates, not mandatory checkpoints
    windowed = True
    read_size = 4 << 20

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.inf = zi.Inflater(zi.GZIP)
        self.consumed = 0  # compressed bytes handed to the inflater
        # pieces[0] is being filled, in place, then handed on; the rest are ready for the
        # output that follows within the same input chunk
        self.pieces = [_native.new_piece(PIECE_SIZE) for _ in range(PIECES_PER_CALL)]
        self.filled = 0  # bytes of pieces[0] inflated so far
        self.bounds: list[Bound] = []
        self.member_done = False
        self.trailing = False  # inside zero padding after the last member
        self._bounds = zi.new_bounds(BOUNDS_PER_CALL)

    def feed(self, data: bytes) -> None:
        if self.member_done and data[:1] == b"\0":
            self.trailing = True
        elif self.member_done:
            self._check_magic(data, self.consumed)
        if self.trailing:
            self._check_padding(data, self.consumed)
            self.consumed += len(data)
            return
        self.member_done = False
        self.consumed += len(data)
        self.inf.feed_bytes(data)
        self._drain()

    def _drain(self) -> None:
        inf = self.inf
        bounds = self._bounds
        fields = zi.BOUND_FIELDS
        while True:
            start = self.filled
            in_start = self.consumed - inf.avail_in  # blob offset of the pending input
            try:
                rc, reached, filled, count = inf.run_blocks(self.pieces, start, bounds)
            except zi.InflateError as exc:
                at = self.consumed - inf.avail_in
                raise LayerFormatError(f"corrupt gzip data near offset {at}: {exc}") from None
            done = 0  # pieces handed on in this round
            found = bounds[: fields * count]
            for k in range(0, len(found), fields):
                piece, offset, in_rel, bits = found[k : k + fields]
                while done < piece:  # the pieces before this boundary's are full
                    self._hand_on(PIECE_SIZE)
                    done += 1
                # a block starting mid-byte begins in the byte before the next one read
                self.bounds.append((offset, in_start + in_rel - (1 if bits else 0), bits))
            while done < reached:
                self._hand_on(PIECE_SIZE)
                done += 1
            produced = done * PIECE_SIZE + filled - start
            self.filled = filled
            if filled == PIECE_SIZE:  # before a member change: the next call needs room
                self._hand_on(PIECE_SIZE)
            if rc == zi.Z_STREAM_END:
                if not self._next_member():
                    return
                continue
            if rc == zi.Z_BUF_ERROR or (not inf.avail_in and not produced):
                return

    def _hand_on(self, length: int) -> None:
        """Emit the first ``length`` bytes of pieces[0] with its bounds; the next piece is
        filled from its start."""
        piece = self.pieces.pop(0)
        self.emit(piece if length == PIECE_SIZE else piece[:length], self.bounds)
        self.pieces.append(_native.new_piece(PIECE_SIZE))
        self.filled = 0
        self.bounds = []

    def _flush(self) -> None:
        if self.filled or self.bounds:
            self._hand_on(self.filled)

    def _next_member(self) -> bool:
        """After a member's trailer: start the next member, or accept zero padding."""
        rest = self.inf.unused_input()
        if rest and rest[0] == 0:
            self.trailing = True
            self._check_padding(rest, self.consumed - len(rest))
            return False
        self._check_magic(rest, self.consumed - len(rest))
        self.inf.reset(zi.GZIP)
        self.member_done = not rest
        if rest:
            self.inf.feed_bytes(rest)
        return bool(rest)

    @staticmethod
    def _check_magic(data: bytes, at: int) -> None:
        if data[:2] != b"\x1f\x8b"[: len(data[:2])]:
            raise LayerFormatError(f"garbage after the last gzip member near offset {at}")

    @staticmethod
    def _check_padding(data: bytes, at: int) -> None:
        if data.count(0) != len(data):
            raise LayerFormatError(f"garbage after the last gzip member near offset {at}")

    def finish(self) -> None:
        self._flush()
        self.inf.close()
        if not (self.member_done or self.trailing):
            raise LayerFormatError("gzip stream is truncated (no end of the last member)")


class ZstdDecoder:
    """Decompresses zstd frames in order; every frame start is a (mandatory) checkpoint.

    Input must arrive in small pieces: zstd can expand one input byte ~32000 times, and
    ``decompressobj`` returns all output of a piece at once.
    """

    forced = True
    windowed = False
    read_size = 1 << 15

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.consumed = 0
        self.in_frame = False
        emit(b"", [(0, 0, 0)])

    def feed(self, data: bytes) -> None:
        while data:
            if not self.in_frame and self.consumed:
                self.emit(b"", [(0, self.consumed, 0)])
            self.in_frame = True
            start = self.consumed
            self.consumed += len(data)
            try:
                out = self.obj.decompress(data)
            except zstandard.ZstdError as exc:
                raise LayerFormatError(f"corrupt zstd data near offset {start}: {exc}") from None
            if out:
                self.emit(out, [])
            if not self.obj.eof:
                return
            data = self.obj.unused_data
            self.consumed -= len(data)
            self.in_frame = False
            self.obj = self.dctx.decompressobj()

    def finish(self) -> None:
        if self.in_frame:
            raise LayerFormatError("zstd stream is truncated (last frame is incomplete)")


class PlainDecoder:
    """An uncompressed tar: the blob is the stream, and needs no checkpoints."""

    forced = True
    windowed = False
    read_size = 1 << 20

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def feed(self, data: bytes) -> None:
        self.emit(data, [])

    def finish(self) -> None:
        return


Decoder = GzipDecoder | ZstdDecoder | PlainDecoder
