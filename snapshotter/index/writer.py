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


@dataclass(frozen=True, slots=True)
class RawCheckpoint:
    coff: int
    bits: int
    uoff: int
    window: bytes


@dataclass(frozen=True, slots=True)
class Meta:
    compression: str
    chunk_size: int
    uncompressed_size: int
    compressed_size: int
    blob_sha256: bytes


def serialise(
    nodes: list[Node],
    checkpoints: list[RawCheckpoint],
    marks: tuple[list[int], list[int]],
    meta: Meta,
) -> bytes:
    """The index bytes; ``nodes`` come from ``Tree.ordered()`` (breadth-first, so a
    directory's children are the contiguous run ``first_child .. + len(children)``)."""
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
    entries = b"".join(records)
    string_bytes = b"".join(strings)
    xattr_count = len(xattrs)
    digest_count = len(digests)
    cps = bytearray()
    windows = bytearray()
    cctx = zstandard.ZstdCompressor(level=fmt.ZSTD_LEVEL, write_checksum=True)
    for cp in checkpoints:
        packed = cctx.compress(cp.window) if cp.window else b""
        cps += fmt.CHECKPOINT.pack(cp.uoff, cp.coff, cp.bits, len(cp.window), len(windows),
                                   len(packed))
        windows += packed
    uoffs, cends = marks
    mark_uoffs = struct.pack(f"<{len(uoffs)}Q", *uoffs)
    mark_cends = struct.pack(f"<{len(cends)}Q", *cends)
    raw_body = b"".join(
        (entries, b"".join(xattrs), cps, mark_uoffs, mark_cends, b"".join(digests),
         string_bytes)
    )
    body = cctx.compress(raw_body)
    header = fmt.HEADER.pack(
        fmt.MAGIC,
        fmt.VERSION,
        fmt.HEADER_SIZE,
        fmt.COMPRESSIONS.index(meta.compression),
        meta.chunk_size,
        len(nodes),
        xattr_count,
        len(checkpoints),
        digest_count,
        len(string_bytes),
        meta.uncompressed_size,
        meta.compressed_size,
        meta.blob_sha256,
        len(body),
        len(raw_body),
        len(windows),
        len(uoffs),
    )
    return header + body + bytes(windows)
