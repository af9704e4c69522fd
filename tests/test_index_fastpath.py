"""The builder's fast paths give the same index as its general paths.

The tar scanner reads plain ustar/GNU headers in place and hashes in-piece files in one call;
anything else (a PAX record, a header split across pieces) takes the general state machine.
These tests force the general path and compare, and check the reader's name-only accessors
against full entry decoding.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import random
import tarfile
from pathlib import Path
from types import MappingProxyType

import pytest
from index_helpers import gnu_tar, make_special_tree

from snapshotter.index import IndexBuildOptions, IndexReader, LayerIndex, build_index
from snapshotter.index.model import Entry, EntryType, make_entry
from snapshotter.index.tarscan import Member, TarScanner

OPTS = IndexBuildOptions(chunk_size=4096)


def _layer() -> bytes:
    """A layer with files of many sizes (0, below/at/above a 512 block and a 4 KiB chunk),
    directories, symlinks, hardlinks, devices and non-ASCII names, in GNU format."""
    rnd = random.Random(11)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(120):
            info = tarfile.TarInfo(f"d{i % 4}/ü{i}/f{i}.bin")
            size = rnd.choice([0, 1, 511, 512, 513, 4095, 4096, 4097, 12288, 30000])
            info.size = size
            info.mode = rnd.choice([0o644, 0o4755, 0o1777])
            info.uid, info.gid, info.mtime = i, 2 * i, 1_700_000_000 + i
            tf.addfile(info, io.BytesIO(rnd.randbytes(size)))
        link = tarfile.TarInfo("d0/link")
        link.type, link.linkname = tarfile.SYMTYPE, "ü0/f0.bin"
        tf.addfile(link)
        hard = tarfile.TarInfo("d1/hard")
        hard.type, hard.linkname = tarfile.LNKTYPE, "d1/ü1/f1.bin"
        tf.addfile(hard)
        dev = tarfile.TarInfo("dev/null")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(dev)
    return buf.getvalue()


def _members(raw: bytes, sizes: list[int]) -> list[Member]:
    out: list[Member] = []
    scanner = TarScanner(OPTS, out.append)
    pos = 0
    for size in sizes:
        scanner.feed(raw[pos : pos + size])
        pos += size
    scanner.feed(raw[pos:])
    scanner.finish()
    return out


def test_any_slicing_gives_the_same_members() -> None:
    """Pieces of 1 byte, odd sizes or the whole stream: fast and general paths agree."""
    raw = _layer()
    whole = _members(raw, [])
    rnd = random.Random(3)
    for sizes in ([1] * 3000, [rnd.randrange(1, 3000) for _ in range(400)], [511, 513] * 300):
        assert _members(raw, sizes) == whole
    assert len(whole) == 123
    assert sum(len(m.digests) for m in whole) > 123 * 32  # multi-chunk files were split


def test_pax_global_header_forces_the_general_path_with_the_same_result() -> None:
    """A PAX global header without effect sends every member through the general path; the
    index then differs only by the header's bytes in the file offsets."""
    raw = _layer()
    pre = io.BytesIO()
    with tarfile.open(fileobj=pre, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "general path"}) as tf:
        tf.addfile(tarfile.TarInfo("zz-marker"))
    prefix = pre.getvalue()
    prefix = prefix[: prefix.index(b"zz-marker")]  # just the global header record
    assert prefix[156:157] == b"g" and len(prefix) % 512 == 0
    fast = _members(raw, [])
    general = _members(prefix + raw, [])
    shift = len(prefix)
    assert [(m.path, m.type, m.mode, m.uid, m.gid, m.size, m.mtime_ns, m.linkname, m.devmajor,
             m.devminor, m.uoff + shift, m.digests) for m in fast] == [
        (m.path, m.type, m.mode, m.uid, m.gid, m.size, m.mtime_ns, m.linkname, m.devmajor,
         m.devminor, m.uoff, m.digests) for m in general]


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_names_child_and_lookup_agree_with_entries(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    make_special_tree(src)
    raw = gnu_tar(src, tmp_path / "layer.tar", fmt)
    out = tmp_path / "layer.idx"
    build_index(io.BytesIO(raw), out, OPTS)
    index = LayerIndex.open(out)
    for ordinal in range(len(index)):
        e = index.entry(ordinal)
        assert index.lookup(e.path) == ordinal
        if e.type is EntryType.DIR:
            kids = index.children(ordinal)
            assert index.names(ordinal) == [index.entry(k).name for k in kids]
            for k, name in zip(kids, index.names(ordinal), strict=True):
                assert index.child(ordinal, name) == k
            assert index.child(ordinal, "\uffffnot-there") is None
        else:
            assert index.names(ordinal) == []
    with pytest.raises(IndexError):
        index.names(len(index))
    with IndexReader(index, tmp_path / "layer.tar") as reader:
        big = index.lookup("big.bin")
        assert big is not None
        assert reader.read(big, 0, 1 << 20) == (src / "big.bin").read_bytes()


def test_make_entry_builds_the_same_frozen_entry() -> None:
    """The reader's fast constructor gives an Entry indistinguishable from ``Entry(...)``."""
    values = (7, "a/b", "b", 3, EntryType.SYMLINK, 0o755, 1, 2, 0, 10**18 + 5, "../x", -1, 1,
              0, 0, MappingProxyType({"user.k": b"v"}), 0)
    fast, slow = make_entry(*values), Entry(*values)
    assert fast == slow and repr(fast) == repr(slow)
    assert [getattr(fast, f.name) for f in dataclasses.fields(Entry)] == list(values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.mode = 0  # type: ignore[misc]


class _FailingBlob(io.RawIOBase):
    """A blob stream whose read fails after ``good`` bytes, like a dropped HTTP body."""

    def __init__(self, data: bytes, good: int) -> None:
        self.data, self.pos, self.good = data, 0, good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.good:
            raise OSError(104, "Connection reset by peer")
        size = len(self.data) if size < 0 else size
        out = self.data[self.pos : min(self.pos + size, self.good)]
        self.pos += len(out)
        return out


def test_a_failing_blob_read_fails_the_build_cleanly(tmp_path: Path) -> None:
    """An error raised by the blob's read in the reading thread reaches the caller as is, and
    no index file is left behind."""
    blob = gzip.compress(_layer() * 8, 6, mtime=0)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError) as failed:
        build_index(_FailingBlob(blob, len(blob) // 2), out / "i.idx")  # type: ignore[arg-type]
    assert failed.value.errno == 104
    assert os.listdir(out) == []
