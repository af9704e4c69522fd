"""Serialising a finished tree and its checkpoints into index bytes (format.py has the layout).

Everything that reaches the bytes is derived from the blob alone (no clocks, no hash-seeded
ordering, a fixed zstd level without multithreading), which is what makes the index
deterministic and shareable by digest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import zstandard

from snapshotter.index import format as fmt
from snapshotter.index.model import EntryType
from snapshotter.index.tree import Node


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
    """The part of the body that does not depend on the checkpoints, encoded once per build
    (pruning checkpoints re-assembles the index without encoding the entries again)."""

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


def encode_entries(nodes: list[Node]) -> Entries:
    """Entry records, xattrs, digests and strings of ``nodes``, which come from
    ``Tree.ordered()`` (breadth-first, so a directory's children are the contiguous run
    ``first_child .. + len(children)``)."""
    strings: list[bytes] = []  # joined once at the end; str_len is the running offset
    str_len = 0
    records: list[bytes] = []
    xattrs: list[bytes] = []
    digests: list[bytes] = []
    pack = fmt.ENTRY.pack
    pack_xattr = fmt.XATTR.pack
    directory, symlink, hardlink, regular = (
        EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK, EntryType.FILE)
    for node in nodes:
        m = node.member
        path = node.path
        path_off = str_len
        strings.append(path)
        str_len += len(path)
        etype = node.type
        parent = node.parent.ordinal if node.parent is not None else 0
        if etype is directory:
            nlink = 2 + node.subdirs
        else:
            inode = node.link if node.link is not None else node
            nlink = 1 + (len(inode.links) if inode.links else 0)
        link_target = node.link.ordinal if node.link is not None else -1
        x_first = len(xattrs)
        if m is None:  # the root or a synthesised directory
            records.append(pack(path_off, len(path), len(node.name), parent, int(etype), 0o755,
                                0, 0, 0, 0, 0, str_len, 0, link_target, nlink, 0, 0, x_first,
                                0, node.first_child, len(node.children), len(digests)))
            continue
        for key in sorted(m.xattrs) if m.xattrs else ():
            k = key.encode("utf-8", "surrogateescape")
            v = m.xattrs[key]
            xattrs.append(pack_xattr(str_len, len(k), str_len + len(k), len(v)))
            strings += (k, v)
            str_len += len(k) + len(v)
        link_off = str_len
        link_len = 0
        if etype is symlink or etype is hardlink:
            link = m.linkname.encode("utf-8", "surrogateescape")
            strings.append(link)
            link_len = len(link)
            str_len += link_len
        c_first = len(digests)
        if etype is regular:
            digests += m.digests
            size, uoff = m.size, m.uoff
        else:
            size = uoff = 0
        records.append(pack(path_off, len(path), len(node.name), parent, int(etype),
                            m.mode & 0o7777, m.uid, m.gid, size, m.mtime_ns, uoff, link_off,
                            link_len, link_target, nlink, m.devmajor, m.devminor, x_first,
                            len(xattrs) - x_first, node.first_child, len(node.children),
                            c_first))
    return Entries(len(nodes), b"".join(records), b"".join(xattrs), len(xattrs),
                   b"".join(digests), len(digests), b"".join(strings))


def assemble(
    entries: Entries,
    checkpoints: list[RawCheckpoint],
    marks: tuple[list[int], list[int]],
    meta: Meta,
    cctx: zstandard.ZstdCompressor,
) -> bytes:
    """The index bytes: header, compressed body, windows."""
    cps = bytearray()
    windows = bytearray()
    for cp in checkpoints:
        cps += fmt.CHECKPOINT.pack(cp.uoff, cp.coff, cp.bits, cp.window_len, len(windows),
                                   len(cp.packed))
        windows += cp.packed
    uoffs, cends = marks
    mark_uoffs = struct.pack(f"<{len(uoffs)}Q", *uoffs)
    mark_cends = struct.pack(f"<{len(cends)}Q", *cends)
    raw_body = b"".join((entries.records, entries.xattrs, cps, mark_uoffs, mark_cends,
                         entries.digests, entries.strings))
    body = cctx.compress(raw_body)
    header = fmt.HEADER.pack(
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
        len(body),
        len(raw_body),
        len(windows),
        len(uoffs),
    )
    return header + body + bytes(windows)
