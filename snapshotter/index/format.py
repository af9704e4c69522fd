"""The on-disk layout of a clip index (version 2); docs/index-format.md is the prose version.

    header   128 bytes, uncompressed, fixed layout (HEADER)
    body     one zstd frame (with content checksum) holding, back to back:
               entries      entry_count   x ENTRY (96 bytes)
               xattrs       xattr_count   x XATTR (16 bytes)
               checkpoints  checkpoint_count x CHECKPOINT (40 bytes)
               mark uoffs   mark_count x u64 (every deflate block end / zstd frame start)
               mark cends   mark_count x u64 (compressed bytes needed to reach that uoff)
               mark bits    mark_count x u8 (bits of the byte before cend that belong to the
                            next block; version 2 on: a mark is then a full restart place)
               digests      digest_count  x 32-byte sha256
               strings      strings_len bytes (paths, link names, xattr names and values)
    windows  checkpoint windows, each its own zstd frame, at the offsets CHECKPOINT names

Fixed-size records make every lookup an ``unpack_from`` at a computed offset, so opening an
index is one read plus one zstd decompression, with no per-entry Python objects. The body is
compressed as a whole because records are mostly zero bytes; windows are compressed one by one
so opening never inflates them.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = b"CLIPIDX\x00"
VERSION: Final = 2
#: Versions this clip reads: version 1 lacks the mark bits (its marks bound ranges but are
#: not restart places).
READABLE: Final = (1, 2)

COMPRESSIONS: Final = ("none", "gzip", "zstd")

# magic, version, header size, compression, chunk size, entry/xattr/checkpoint/digest counts,
# strings length, uncompressed size, compressed size, blob sha256, body compressed length,
# body raw length, windows length, mark count, reserved.
HEADER: Final = struct.Struct("<8sIIIIIIIIQQQ32sQQQI4x")
HEADER_SIZE: Final = 128

# path_off, path_len, name_len, parent, type, pad, mode, uid, gid, size, mtime_ns, uoff,
# link_off, link_len, link_target, nlink, devmajor, devminor, xattr_first, xattr_count,
# first_child, child_count, chunk_first.
ENTRY: Final = struct.Struct("<IIIIBxHIIQqQIIiIIIIIIII")
# key_off, key_len, value_off, value_len
XATTR: Final = struct.Struct("<IIII")
# uoff, coff, bits, window raw length, window offset (in the windows section), window length
CHECKPOINT: Final = struct.Struct("<QQB3xIQI4x")
DIGEST_SIZE: Final = 32

assert HEADER.size == HEADER_SIZE
assert ENTRY.size == 96
assert CHECKPOINT.size == 40

#: zstd level for the body and windows: decompression speed is level-independent, and 6 is a
#: good size/time trade for a few MB of records.
ZSTD_LEVEL: Final = 3
