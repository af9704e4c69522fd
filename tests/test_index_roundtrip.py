"""Basic round trip: build an index from a gzip/zstd/plain tar made by Python's tarfile and read
every file back through it."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from snapshotter.index import (
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
    inflate_range,
)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    import random

    rnd = random.Random(7)
    out = {}
    for i in range(40):
        n = rnd.choice([0, 1, 511, 512, 513, 5000, 70000, 300000])
        words = [rnd.choice([b"alpha", b"beta", b"gamma", bytes([rnd.randrange(256)])])
                 for _ in range(n // 4 + 1)]
        out[f"d{i % 5}/sub/f{i}.txt"] = b"".join(words)[:n]
    return out


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_roundtrip_every_file(tmp_path: Path, compression: str) -> None:
    files = _files()
    raw = _tar(files)
    if compression == "gzip":
        blob = gzip.compress(raw, 6)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(raw)
    else:
        blob = raw
    (tmp_path / "blob").write_bytes(blob)
    opts = IndexBuildOptions(checkpoint_spacing=32 << 10, large_file_size=100_000,
                             chunk_size=64 << 10)
    seen = bytearray()

    def on_data(uoff: int, view: memoryview) -> None:
        assert uoff == len(seen)
        seen.extend(view)

    with open(tmp_path / "blob", "rb") as f:
        res = build_index(f, tmp_path / "idx", opts, on_data=on_data)
    assert bytes(seen) == raw
    assert res.uncompressed_size == len(raw)
    assert res.compressed_size == len(blob)
    idx = LayerIndex.open(tmp_path / "idx")
    assert idx.compression == compression
    assert idx.digest == res.index_digest
    reader = IndexReader(idx, tmp_path / "blob")
    for name, data in files.items():
        o = idx.lookup(name)
        assert o is not None
        e = idx.entry(o)
        assert e.type is EntryType.FILE and e.size == len(data) and e.path == name
        assert reader.read(o, 0, e.size) == data
        if e.size > 10:
            c0, c1 = idx.compressed_range(e.uoff + 3, 7)
            assert inflate_range(idx, c0, blob[c0:c1], e.uoff + 3, 7) == data[3:10]
    if compression == "gzip":
        assert res.checkpoints >= 4


def test_checkpoint_at_large_file_start_and_zstd_frames(tmp_path: Path) -> None:
    import itertools
    import os

    files = {f"small/{i}": os.urandom(3000) for i in range(200)}
    files["zbig.bin"] = os.urandom(3 << 20)
    raw = _tar(files)
    # spacing so large that only the first block and large-file starts get checkpoints
    opts = IndexBuildOptions(checkpoint_spacing=1 << 30, max_span=1 << 30,
                             large_file_size=1 << 20)
    out = io.BytesIO()
    build_index(io.BytesIO(gzip.compress(raw, 6)), out, opts)
    idx = LayerIndex.from_bytes(out.getvalue())
    big = idx.entry(idx.lookup("zbig.bin") or 0)
    cp = idx.checkpoint_before(big.uoff)
    assert idx.checkpoint_count == 2
    assert big.uoff - 200_000 < cp.uoff <= big.uoff  # the block end just before the file
    c0, c1 = idx.compressed_range(big.uoff, 4096)
    assert c1 - c0 < 300_000
    # zstd: every frame start is a checkpoint
    z = zstandard.ZstdCompressor()
    cuts = [0, 100_000, 400_000, len(raw)]
    frames = b"".join(z.compress(raw[a:b]) for a, b in itertools.pairwise(cuts))
    out = io.BytesIO()
    build_index(io.BytesIO(frames), out)
    zidx = LayerIndex.from_bytes(out.getvalue())
    assert [zidx.checkpoint(i).uoff for i in range(zidx.checkpoint_count)] == cuts[:-1]
    c0, c1 = zidx.compressed_range(150_000, 10)
    assert (c0, c1) == (zidx.checkpoint(1).coff, zidx.checkpoint(2).coff)
