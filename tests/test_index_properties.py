"""Property tests: random trees in random tar flavours and compressions; every file and every
random byte range reads back exactly, through both the convenience reader and the
compressed_range + inflate_range pair the read path uses."""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.index import (
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
    inflate_range,
)

NAMES = st.text(alphabet="abcé_.-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".wh")
)
CONTENT = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(0, 40_000)),
)


@st.composite
def trees(draw: st.DrawFn) -> dict[str, bytes | str | None]:
    """path -> bytes (file), str (symlink target) or None (directory)."""
    out: dict[str, bytes | str | None] = {}
    for _ in range(draw(st.integers(1, 25))):
        parts = draw(st.lists(NAMES, min_size=1, max_size=4))
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if out.get(prefix) is not None:
                break
            out[prefix] = None
        else:
            path = "/".join(parts)
            if path not in out:
                kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink"]))
                out[path] = (draw(CONTENT) if kind == "file"
                             else draw(NAMES) if kind == "symlink" else None)
    return out


def _tar(tree: dict[str, bytes | str | None], flavour: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=flavour) as tf:
        for path, value in tree.items():
            info = tarfile.TarInfo(path)
            info.mtime = 1_700_000_000
            if value is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif isinstance(value, str):
                info.type = tarfile.SYMTYPE
                info.linkname = value
                tf.addfile(info)
            else:
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def _compress(raw: bytes, how: str, cut: int) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, 6, mtime=0)
    if how == "gzip-members":
        return gzip.compress(raw[:cut], 1, mtime=0) + gzip.compress(raw[cut:], 9, mtime=0)
    if how == "gzip-stored":  # level 0: stored blocks
        c = zlib.compressobj(0, zlib.DEFLATED, 31)
        return c.compress(raw) + c.flush()
    if how == "zstd-frames":
        z = zstandard.ZstdCompressor()
        return z.compress(raw[:cut]) + z.compress(b"") + z.compress(raw[cut:])
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


OPTS = IndexBuildOptions(checkpoint_spacing=2048, max_span=16 << 10, large_file_size=20_000,
                         chunk_size=4096)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=trees(),
    flavour=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    how=st.sampled_from(["gzip", "gzip-members", "gzip-stored", "zstd", "zstd-frames", "none"]),
    data=st.data(),
)
def test_random_trees_and_ranges(
    tree: dict[str, bytes | str | None], flavour: int, how: str, data: st.DataObject
) -> None:
    raw = _tar(tree, flavour)
    blob = _compress(raw, how, data.draw(st.integers(0, len(raw))))
    out = io.BytesIO()
    res = build_index(io.BytesIO(blob), out, OPTS)
    assert res.uncompressed_size == len(raw)
    index = LayerIndex.from_bytes(out.getvalue())
    again = io.BytesIO()
    build_index(io.BytesIO(blob), again, OPTS)
    assert again.getvalue() == out.getvalue()  # deterministic
    reader = IndexReader(index, lambda off, n: blob[off : off + n])
    assert len(index) == len(tree) + 1
    for path, value in tree.items():
        ordinal = index.lookup(path)
        assert ordinal is not None, path
        e = index.entry(ordinal)
        if value is None:
            assert e.type is EntryType.DIR
        elif isinstance(value, str):
            assert (e.type, e.linkname) == (EntryType.SYMLINK, value)
        else:
            assert e.type is EntryType.FILE and e.size == len(value)
            assert reader.read(ordinal, 0, e.size) == value
            assert sum(n for _u, n, _d in index.chunk_digests(ordinal)) == len(value)
    for _ in range(5):
        uoff = data.draw(st.integers(0, len(raw)))
        length = data.draw(st.integers(0, min(len(raw) - uoff, 70_000)))
        c0, c1 = index.compressed_range(uoff, length)
        got = inflate_range(index, c0, blob[c0:c1], uoff, length)
        assert got == raw[uoff : uoff + length]
        assert reader.read_stream(uoff, length) == raw[uoff : uoff + length]
    names = [index.entry(i).name.encode() for i in index.children(0)]
    assert names == sorted(names)
