"""Fidelity: what the index says equals what ``tar -x`` restores, for layers made by GNU tar
(gnu and posix formats) and by Python's tarfile, from generated trees with every entry type and
from copies of real system directories."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest
from index_helpers import (
    CAP,
    compare_with_extracted,
    compress,
    extract,
    gnu_tar,
    make_special_tree,
)

from snapshotter.index import (
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
)

SMALL = IndexBuildOptions(checkpoint_spacing=16 << 10, large_file_size=64 << 10,
                          chunk_size=32 << 10)


def _build(tmp: Path, raw: bytes, compression: str, opts: IndexBuildOptions = SMALL
           ) -> tuple[LayerIndex, Path]:
    blob = tmp / f"layer.{compression}"
    blob.write_bytes(compress(raw, compression))
    with open(blob, "rb") as f:
        build_index(f, tmp / "layer.idx", opts)
    return LayerIndex.open(tmp / "layer.idx"), blob


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_special_tree_matches_tar_x(tmp_path: Path, fmt: str, compression: str) -> None:
    src = tmp_path / "src"
    make_special_tree(src)
    raw = gnu_tar(src, tmp_path / "layer.tar", fmt)
    index, blob = _build(tmp_path, raw, compression)
    extract(tmp_path / "layer.tar", tmp_path / "out")
    files = compare_with_extracted(index, blob, tmp_path / "out", nanos=fmt == "posix")
    assert files >= 10
    ping = index.entry(index.lookup("bin/ping") or 0)
    if fmt == "posix":
        assert ping.xattrs["security.capability"] == CAP
    su = index.entry(index.lookup("./bin/su") or 0)
    assert su.mode == 0o4755
    assert index.entry(index.lookup("tmp") or 0).mode == 0o1777
    wh = index.lookup("whiteouts/.wh..wh..opq")
    assert wh is not None and index.entry(wh).type is EntryType.FILE
    null = index.entry(index.lookup("dev/null") or 0)
    assert (null.type, null.devmajor, null.devminor) == (EntryType.CHAR, 1, 3)
    big = index.entry(index.lookup("big.bin") or 0)
    assert big.nlink == 3
    assert len(index.chunk_digests(big.ordinal)) == -(-big.size // SMALL.chunk_size)


def test_real_tree_gnu_and_posix(tmp_path: Path) -> None:
    """A slice of this machine's Python standard library, both formats, gzip."""
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if not lib.is_dir():
        lib = Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}")
    for fmt in ("gnu", "posix"):
        work = tmp_path / fmt
        work.mkdir()
        raw = gnu_tar(lib, work / "layer.tar", fmt, "json", "email", "asyncio", "http")
        index, blob = _build(work, raw, "gzip", IndexBuildOptions(checkpoint_spacing=64 << 10))
        extract(work / "layer.tar", work / "out")
        assert compare_with_extracted(index, blob, work / "out", nanos=fmt == "posix") > 50


def test_python_tarfile_layer(tmp_path: Path) -> None:
    """Layers written by Python's tarfile (ustar, gnu and pax flavours) read the same."""
    src = tmp_path / "src"
    make_special_tree(src)
    for flavour in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=flavour) as tf:
            for p in sorted(src.rglob("*")):
                rel = str(p.relative_to(src))
                if flavour == tarfile.USTAR_FORMAT and len(rel) > 100:
                    continue
                if flavour == tarfile.USTAR_FORMAT and p.is_symlink() and len(
                        str(p.readlink())) > 100:
                    continue
                tf.add(p, rel, recursive=False)
        work = tmp_path / str(flavour)
        work.mkdir()
        index, blob = _build(work, buf.getvalue(), "gzip")
        (work / "layer.tar").write_bytes(buf.getvalue())
        extract(work / "layer.tar", work / "out")
        compare_with_extracted(index, blob, work / "out", nanos=flavour == tarfile.PAX_FORMAT)


def test_deterministic_and_multimember(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_special_tree(src)
    raw = gnu_tar(src, tmp_path / "layer.tar", "posix")
    # two gzip members (pigz / concatenated layers do this), then zero padding
    blob = compress(raw[:300_000], "gzip") + compress(raw[300_000:], "gzip") + bytes(100)
    (tmp_path / "blob").write_bytes(blob)
    digests = set()
    for _ in range(2):
        with open(tmp_path / "blob", "rb") as f:
            digests.add(build_index(f, tmp_path / "idx", SMALL).index_digest)
    assert len(digests) == 1
    index = LayerIndex.open(tmp_path / "idx")
    extract(tmp_path / "layer.tar", tmp_path / "out")
    compare_with_extracted(index, tmp_path / "blob", tmp_path / "out", nanos=True)
    # a read straddling the member boundary
    reader = IndexReader(index, tmp_path / "blob")
    assert reader.read_stream(299_000, 2_000) == raw[299_000:301_000]


def test_duplicates_later_wins_and_synthesised_parents(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
                link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(data) if data is not None else 0
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
        add("a/b/c.txt", b"first")
        add("a/b/link", kind=tarfile.LNKTYPE, link="a/b/c.txt")
        add("./a/b/c.txt", b"second version")
        add("x", b"file")
        add("x", kind=tarfile.DIRTYPE)
        add("x/y", b"in dir")
    index, blob = _build(tmp_path, buf.getvalue(), "gzip")
    reader = IndexReader(index, blob)
    a = index.lookup("a")
    assert a is not None and index.entry(a).type is EntryType.DIR
    assert index.entry(a).mode == 0o755 and index.entry(a).mtime_ns == 0
    c = index.lookup("a/b/c.txt")
    assert c is not None and reader.read(c, 0, 100) == b"second version"
    link = index.lookup("a/b/link")
    assert link is not None
    # the hardlink keeps the old inode alive: it is now the file carrying the first bytes
    assert index.entry(link).type is EntryType.FILE
    assert reader.read(link, 0, 100) == b"first"
    # ... and its digest, whenever the side worker hashed the data it adopted
    assert [d for _, _, d in index.chunk_digests(link)] == [hashlib.sha256(b"first").digest()]
    x = index.lookup("x")
    assert x is not None and index.entry(x).type is EntryType.DIR
    assert [index.entry(i).name for i in index.children(x)] == ["y"]
    assert index.child(0, "a") == a and index.child(0, "zz") is None
