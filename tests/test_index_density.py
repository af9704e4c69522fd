"""Adaptive checkpoint density (snapshotter/index/density.py): text layers get checkpoints as
densely as the 1% index budget allows, random bytes and metadata-heavy layers do not, builds
stay deterministic and every byte still reads back exactly."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import statistics
import tarfile
from pathlib import Path

import pytest
import zstandard

from snapshotter.errors import InvalidArgument
from snapshotter.index import (
    BuildResult,
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
    inflate_range,
)
from snapshotter.index.density import Kept, prune
from tests.index_helpers import gnu_tar

PY = Path("/usr/lib/python3.11")
DEFAULT = IndexBuildOptions()
OFF = IndexBuildOptions(window_share=0)  # the fixed spacing rules only


def _build(blob: bytes, opts: IndexBuildOptions = DEFAULT) -> tuple[
        LayerIndex, BuildResult, bytes]:
    out = io.BytesIO()
    res = build_index(io.BytesIO(blob), out, opts)
    return LayerIndex.from_bytes(out.getvalue()), res, out.getvalue()


def _read_costs(index: LayerIndex, reads: int = 300) -> list[int]:
    """Compressed bytes per random 4 KiB read of a file (what bench/index_bench.py reports)."""
    rnd = random.Random(5)
    files = [i for i in range(len(index))
             if index.entry(i).type is EntryType.FILE and index.entry(i).size >= 4096]
    costs = []
    for _ in range(reads):
        e = index.entry(rnd.choice(files))
        c0, c1 = index.compressed_range(e.uoff + rnd.randrange(e.size - 4095), 4096)
        costs.append(c1 - c0)
    return costs


@pytest.fixture(scope="module")
def text_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A real text-heavy tree (the Python stdlib, ~50 MB) tarred by GNU tar and gzipped."""
    raw = gnu_tar(PY, tmp_path_factory.mktemp("density") / "py.tar", "gnu")
    assert len(raw) > 30 << 20
    return raw, gzip.compress(raw, 6, mtime=0)


def test_text_layer_gets_denser_checkpoints_within_budget(text_layer: tuple[bytes, bytes]) -> None:
    raw, blob = text_layer
    dense, res, data = _build(blob)
    fixed, _, _ = _build(blob, OFF)
    assert dense.checkpoint_count >= 2 * fixed.checkpoint_count
    assert res.index_size <= 0.01 * res.uncompressed_size
    before, after = _read_costs(fixed), _read_costs(dense)
    assert statistics.mean(after) < 0.6 * statistics.mean(before)
    assert max(after) <= max(before)
    # deterministic: the same blob gives the same bytes
    assert _build(blob)[2] == data
    # and every byte still reads back: random ranges, and whole checkpoint intervals
    rnd = random.Random(2)
    reader = IndexReader(dense, lambda off, n: blob[off:off + n])
    for _ in range(40):
        a = rnd.randrange(len(raw))
        n = min(rnd.randrange(1, 3 << 20), len(raw) - a)
        c0, c1 = dense.compressed_range(a, n)
        assert inflate_range(dense, c0, blob[c0:c1], a, n) == raw[a:a + n]
        assert reader.read_stream(a, n) == raw[a:a + n]


def test_dense_checkpoints_respect_the_minimum_spacing(text_layer: tuple[bytes, bytes]) -> None:
    _, blob = text_layer
    opts = IndexBuildOptions(large_file_size=1 << 40)  # no large-file checkpoints
    index, _, _ = _build(blob, opts)
    cps = [index.checkpoint(i) for i in range(index.checkpoint_count)]
    gaps = [b.coff - a.coff for a, b in itertools.pairwise(cps)]
    assert len(gaps) > 10
    assert min(gaps) >= opts.min_checkpoint_spacing
    assert max(gaps) < opts.checkpoint_spacing + (64 << 10)


def test_random_bytes_gain_nothing() -> None:
    """An incompressible window costs 32 KiB: never within 0.8% of a <= 2 MiB interval."""
    buf = io.BytesIO()
    rnd = random.Random(9)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(12):
            payload = rnd.randbytes(1 << 20)
            info = tarfile.TarInfo(f"r{i}.bin")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    blob = gzip.compress(buf.getvalue(), 6, mtime=0)
    dense, _, _ = _build(blob)
    fixed, _, _ = _build(blob, OFF)
    assert dense.checkpoint_count == fixed.checkpoint_count


def test_metadata_heavy_layer_stays_on_the_fixed_rules() -> None:
    """Many small files: their records and digests already exceed the 1% budget, so the
    running estimate adds no windows."""
    buf = io.BytesIO()
    rnd = random.Random(4)
    words = [bytes(rnd.choices(b"abcdefgh", k=6)) for _ in range(300)]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(6000):
            payload = b" ".join(rnd.choices(words, k=60))
            info = tarfile.TarInfo(f"d{i % 50}/f{i}.txt")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    blob = gzip.compress(buf.getvalue(), 6, mtime=0)
    dense, _, _ = _build(blob, IndexBuildOptions(checkpoint_spacing=1 << 30))
    fixed, _, _ = _build(blob, IndexBuildOptions(checkpoint_spacing=1 << 30, window_share=0))
    assert dense.checkpoint_count == fixed.checkpoint_count == 1
    # the same text without the metadata does get dense checkpoints
    text = b"".join(b" ".join(rnd.choices(words, k=60)) for _ in range(6000 * 8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("one.txt")
        info.size = len(text)
        tf.addfile(info, io.BytesIO(text))
    one, _, _ = _build(gzip.compress(buf.getvalue(), 6, mtime=0),
                       IndexBuildOptions(checkpoint_spacing=1 << 30, large_file_size=1 << 40))
    assert one.checkpoint_count > 3


def test_zstd_and_plain_are_unaffected(text_layer: tuple[bytes, bytes]) -> None:
    """Their checkpoints are frame starts (zstd) or none at all (plain): same index bytes."""
    raw, _ = text_layer
    for blob in (zstandard.ZstdCompressor().compress(raw), raw):
        assert _build(blob)[2] == _build(blob, OFF)[2]


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_checkpoint_spacing", 0), ("window_share", -0.1), ("window_share", 1.5),
     ("index_share", 2.0)],
)
def test_options_are_validated(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=field):
        IndexBuildOptions(**{field: value})  # type: ignore[arg-type]


def test_options_default_on() -> None:
    opts = IndexBuildOptions()
    assert opts.min_checkpoint_spacing == 256 << 10
    assert (opts.window_share, opts.index_share) == (0.008, 0.01)


TINY = 4500


def test_late_metadata_prunes_dense_checkpoints(text_layer: tuple[bytes, bytes]) -> None:
    """Text first (dense checkpoints look affordable), then thousands of tiny files (their
    records and digests arrive too late for the running estimate): the builder drops dense
    checkpoints until the index fits 1%, never widening an interval past the fixed spacing."""
    raw, _ = text_layer
    buf = io.BytesIO()
    rnd = random.Random(8)
    with (tarfile.open(fileobj=io.BytesIO(raw)) as src,
          tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf):
        for member in src.getmembers():
            tf.addfile(member, src.extractfile(member) if member.isfile() else None)
        for i in range(TINY):
            payload = rnd.randbytes(rnd.randrange(1, 40))
            info = tarfile.TarInfo(f"tiny/{i % 100}/{i}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    layer = buf.getvalue()
    blob = gzip.compress(layer, 6, mtime=0)
    dense, res, data = _build(blob)
    fixed, fixed_res, _ = _build(blob, OFF)
    assert fixed_res.index_size < 0.01 * res.uncompressed_size  # room for some, not all
    assert res.index_size <= 0.01 * res.uncompressed_size
    text_only = _build(text_layer[1])[0].checkpoint_count
    assert fixed.checkpoint_count < dense.checkpoint_count < text_only
    cps = [dense.checkpoint(i) for i in range(dense.checkpoint_count)]
    assert max(b.coff - a.coff for a, b in itertools.pairwise(cps)) < (2 << 20) + (64 << 10)
    assert _build(blob)[2] == data
    a = cps[len(cps) // 2].uoff - 1000
    c0, c1 = dense.compressed_range(a, 70_000)
    assert inflate_range(dense, c0, blob[c0:c1], a, 70_000) == layer[a:a + 70_000]


def test_prune_order_and_limits() -> None:
    """Smallest merged interval first; fixed checkpoints stay; no interval beyond the max."""
    mb = 1 << 20
    kept = [Kept(0, 0, False, 0), Kept(mb // 2, 2 * mb, True, 100),
            Kept(mb, 4 * mb, True, 100), Kept(mb + mb // 4, 5 * mb, True, 100),
            Kept(2 * mb, 8 * mb, False, 0), Kept(3 * mb, 12 * mb, True, 100),
            Kept(4 * mb, 16 * mb, False, 0)]  # the stream end
    # merged intervals: #1 0..1 MiB, #2 0.5..1.25 MiB, #3 1..2 MiB, #5 2..4 MiB
    assert prune(kept, 100, 2 * mb, 1 << 40) == {2}
    # then #1 (0..1.25) and #3 (0.5..2 before #1 went, 0..2 after); #5 only if 2 MiB is allowed
    assert prune(kept, 200, 2 * mb, 1 << 40) == {1, 2}
    assert prune(kept, 10_000, 2 * mb, 1 << 40) == {1, 2, 3, 5}
    assert prune(kept, 10_000, 3 * mb // 2, 1 << 40) == {1, 2}
    # the uncompressed limit too: #2 merges 2..5 MiB, #1 0..5, #3 2..8 or 0..8, #5 8..16
    assert prune(kept, 10_000, 2 * mb, 5 * mb) == {1, 2}
    assert prune(kept, 0, 2 * mb, 1 << 40) == set()
