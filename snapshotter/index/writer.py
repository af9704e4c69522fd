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


class _Strings:
    def __init__(self) -> None:
        self.buf = bytearray()

    def add(self, data: bytes) -> tuple[int, int]:
        off = len(self.buf)
        self.buf += data
        return off, len(data)


def _nlink(node: Node) -> int:
    if node.type is EntryType.DIR:
        return 2 + sum(1 for c in node.children.values() if c.type is EntryType.DIR)
    inode = node.link if node.link is not None else node
    return 1 + len(inode.links)


def serialise(
    nodes: list[Node],
    checkpoints: list[RawCheckpoint],
    marks: tuple[list[int], list[int]],
    meta: Meta,
) -> bytes:
    strings = _Strings()
    entries = bytearray()
    xattrs = bytearray()
    digests = bytearray()
    xattr_count = digest_count = 0
    child_runs: dict[int, int] = {}
    for node in nodes:  # breadth-first: a directory's children are a contiguous run
        if node.children:
            child_runs[node.ordinal] = min(c.ordinal for c in node.children.values())
    for node in nodes:
        m = node.member
        path_off, path_len = strings.add(node.path)
        x_first = xattr_count
        xa = m.xattrs if m is not None else {}
        for key in sorted(xa):
            k_off, k_len = strings.add(key.encode("utf-8", "surrogateescape"))
            v_off, v_len = strings.add(xa[key])
            xattrs += fmt.XATTR.pack(k_off, k_len, v_off, v_len)
            xattr_count += 1
        linkname = b""
        if m is not None and node.type in (EntryType.SYMLINK, EntryType.HARDLINK):
            linkname = m.linkname.encode("utf-8", "surrogateescape")
        link_off, link_len = strings.add(linkname)
        c_first = digest_count
        is_file = node.type is EntryType.FILE and m is not None
        if is_file and m is not None:
            for d in m.digests:
                digests += d
            digest_count += len(m.digests)
        entries += fmt.ENTRY.pack(
            path_off,
            path_len,
            len(node.name),
            node.parent.ordinal if node.parent is not None else 0,
            int(node.type),
            (m.mode if m else 0o755) & 0o7777,
            m.uid if m else 0,
            m.gid if m else 0,
            m.size if is_file and m else 0,
            m.mtime_ns if m else 0,
            m.uoff if is_file and m else 0,
            link_off,
            link_len,
            node.link.ordinal if node.link is not None else -1,
            _nlink(node),
            m.devmajor if m else 0,
            m.devminor if m else 0,
            x_first,
            xattr_count - x_first,
            child_runs.get(node.ordinal, 0),
            len(node.children),
            c_first,
        )
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
        (entries, xattrs, cps, mark_uoffs, mark_cends, digests, strings.buf)
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
        len(strings.buf),
        meta.uncompressed_size,
        meta.compressed_size,
        meta.blob_sha256,
        len(body),
        len(raw_body),
        len(windows),
        len(uoffs),
    )
    return header + body + bytes(windows)
