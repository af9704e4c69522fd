"""Serialising a finished tree and its checkpoints into index bytes (format.py has the layout).

Everything that reaches the bytes is derived from the blob alone (no clocks, no hash-seeded
ordering, a fixed zstd level without multithreading), which is what makes the index
deterministic and shareable by digest.
"""

from __future__ import annotations

import array
import sys
from dataclasses import dataclass

import zstandard

from snapshotter.index import format as fmt


@dataclass(slots=True)
class RawCheckpoint:
    """A chosen checkpoint; ``packed`` is its window already compressed (its own zstd frame,
    empty for no window), filled in by the build's side worker when the checkpoint is chosen,
    so a window is compressed once however often the index is assembled."""

    coff: int
    bits: int
    uoff: int
    window_len: int
    packed: bytes


def compressor() -> zstandard.ZstdCompressor:
    """The compressor for the body and the windows (one per build: they are not thread-safe)."""
    return zstandard.ZstdCompressor(level=fmt.ZSTD_LEVEL, write_checksum=True)


@dataclass(frozen=True, slots=True)
class Entries:
    """The part of the body that does not depend on the checkpoints (``Tree.encode``), encoded
    once per build: pruning checkpoints re-assembles the index without encoding it again."""

    count: int
    records: bytes
    xattrs: bytes
    xattr_count: int
    digests: bytes
    digest_count: int
    strings: bytes


@dataclass(frozen=True, slots=True)
class Meta:
    compression: str
    chunk_size: int
    uncompressed_size: int
    compressed_size: int
    blob_sha256: bytes


def _little_endian(values: array.array[int]) -> bytes:
    """A u64 array's bytes in the index's byte order."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array.array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def assemble(
    entries: Entries,
    checkpoints: list[RawCheckpoint],
    marks: tuple[array.array[int], array.array[int], array.array[int]],
    meta: Meta,
    cctx: zstandard.ZstdCompressor,
) -> bytearray:
    """The index bytes: header, compressed body, windows.

    Written into one buffer as they are made (the header last, in front): joining the
    compressed parts, then header, body and windows, would hold two more copies of the index
    at the build's peak."""
    uoffs, cends, bits = marks
    mark_uoffs, mark_cends = _little_endian(uoffs), _little_endian(cends)
    cps = bytearray()
    windows_len = 0
    for cp in checkpoints:
        cps += fmt.CHECKPOINT.pack(cp.uoff, cp.coff, cp.bits, cp.window_len, windows_len,
                                   len(cp.packed))
        windows_len += len(cp.packed)
    parts = (entries.records, entries.xattrs, cps, mark_uoffs, mark_cends, bits.tobytes(),
             entries.digests, entries.strings)
    raw_len = sum(len(part) for part in parts)
    out = bytearray(fmt.HEADER_SIZE)
    # compressed part by part: the joined body would be one more copy of every record
    stream = cctx.compressobj(size=raw_len)
    for part in parts:
        out += stream.compress(part)
    out += stream.flush()
    body_len = len(out) - fmt.HEADER_SIZE
    for cp in checkpoints:
        out += cp.packed
    fmt.HEADER.pack_into(
        out,
        0,
        fmt.MAGIC,
        fmt.VERSION,
        fmt.HEADER_SIZE,
        fmt.COMPRESSIONS.index(meta.compression),
        meta.chunk_size,
        entries.count,
        entries.xattr_count,
        len(checkpoints),
        entries.digest_count,
        len(entries.strings),
        meta.uncompressed_size,
        meta.compressed_size,
        meta.blob_sha256,
        body_len,
        raw_len,
        windows_len,
        len(uoffs),
    )
    return out
