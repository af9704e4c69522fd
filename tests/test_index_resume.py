"""Resume points (snapshotter.index.resume): inflating from a point recorded by an earlier
inflation gives exactly the bytes of the stream and of ``tar -x``; points are a property of
the stream (deterministic whatever the read started from); multi-member gzip, bit offsets,
the stream end, bad input and the bounded per-layer point set."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.index import (
    Checkpoint,
    IndexBuildOptions,
    LayerFormatError,
    LayerIndex,
    build_index,
    resume,
)
from snapshotter.index import format as fmt
from snapshotter.index.resume import (
    InflateResult,
    ResumePoint,
    ResumePoints,
    compressed_range_from,
    inflate_from,
)
from tests.index_helpers import gnu_tar

PY = Path("/usr/lib/python3.11")
DIRS = ["email", "json", "asyncio", "http", "logging", "unittest", "xml"]
EVERY = 64 << 10
OPTS = IndexBuildOptions(checkpoint_spacing=512 << 10, large_file_size=256 << 10)


class Layer:
    def __init__(self, raw: bytes, blob: bytes, opts: IndexBuildOptions = OPTS) -> None:
        out = io.BytesIO()
        build_index(io.BytesIO(blob), out, opts)
        self.raw = raw
        self.blob = blob
        self.index = LayerIndex.from_bytes(out.getvalue())

    def read(self, start: Checkpoint | ResumePoint, uoff: int, length: int,
             every: int | None = EVERY) -> InflateResult:
        c0, c1 = compressed_range_from(self.index, start, uoff, length)
        return inflate_from(self.index, start, self.blob[c0:c1], uoff, length,
                            record_every=every)


@pytest.fixture(scope="module")
def tree_layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layer, Path]:
    """A real tree (parts of the Python stdlib, ~5 MB of text) tarred by GNU tar; its
    ``tar -x`` output for comparisons."""
    work = tmp_path_factory.mktemp("resume")
    raw = gnu_tar(PY, work / "layer.tar", "posix", *DIRS)
    out = work / "x"
    out.mkdir()
    subprocess.run(["tar", "-C", str(out), "-xf", str(work / "layer.tar")], check=True)
    return Layer(raw, gzip.compress(raw, 6, mtime=0)), out


def _points_from_checkpoints(layer: Layer) -> list[ResumePoint]:
    idx = layer.index
    points: list[ResumePoint] = []
    for n in range(idx.checkpoint_count):
        cp = idx.checkpoint(n)
        end = idx.checkpoint(n + 1).uoff if n + 1 < idx.checkpoint_count else len(layer.raw)
        res = layer.read(cp, cp.uoff, end - cp.uoff)
        assert res.data == layer.raw[cp.uoff:end]
        points += res.points
    return points


def test_every_point_resumes_to_the_stream_bytes(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    points = _points_from_checkpoints(layer)
    # at most one per EVERY bytes, plus the boundary past each interval's end
    assert len(points) <= len(layer.raw) // EVERY + 2 * layer.index.checkpoint_count
    assert len(points) >= len(layer.raw) // EVERY // 2
    assert {p.bits for p in points} != {0}  # mid-byte block starts are exercised
    rnd = random.Random(7)
    for p in points:
        uoff = min(p.uoff + rnd.randrange(0, 200_000), len(layer.raw))
        length = min(rnd.randrange(0, 150_000), len(layer.raw) - uoff)
        res = layer.read(p, uoff, length)
        assert res.data == layer.raw[uoff:uoff + length]
        assert all(p.uoff < q.uoff for q in res.points)


def test_file_bytes_match_tar_x(tree_layer: tuple[Layer, Path]) -> None:
    """A file read from the nearest recorded point equals what ``tar -x`` wrote."""
    layer, extracted = tree_layer
    idx = layer.index
    points = ResumePoints(idx, max_points=10_000)
    points.add(_points_from_checkpoints(layer))
    files = [i for i in range(len(idx)) if idx.entry(i).size > 0 and idx.entry(i).linkname == ""]
    for ordinal in random.Random(3).sample(files, 60):
        e = idx.entry(ordinal)
        start = points.best_start(e.uoff)
        assert start.uoff <= e.uoff
        assert (extracted / e.path).read_bytes() == layer.read(start, e.uoff, e.size).data


def test_points_are_deterministic(tree_layer: tuple[Layer, Path]) -> None:
    """A point is the first block boundary at/after a multiple of record_every: reads from a
    checkpoint and from an earlier point record the same points, byte for byte."""
    layer, _ = tree_layer
    idx = layer.index
    cp = idx.checkpoint(0)
    end = idx.checkpoint(1).uoff if idx.checkpoint_count > 1 else len(layer.raw)
    first = layer.read(cp, cp.uoff, end - cp.uoff).points
    assert first == layer.read(cp, cp.uoff, end - cp.uoff).points
    middle = first[len(first) // 2]
    later = layer.read(middle, middle.uoff, end - middle.uoff).points
    assert [p for p in first if p.uoff > middle.uoff] == list(later)
    grid = [p.uoff // EVERY for p in first[:-1]]
    assert grid == sorted(set(grid))


def test_one_bound_per_native_call_gives_the_same_points(
    tree_layer: tuple[Layer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C block loop returns early when its bounds array is full; the run then calls it
    again, and the bytes and points are the same as with room for many bounds per call."""
    layer, _ = tree_layer
    idx = layer.index
    cp = idx.checkpoint(0)
    end = idx.checkpoint(1).uoff if idx.checkpoint_count > 1 else len(layer.raw)
    many = layer.read(cp, cp.uoff, end - cp.uoff)
    monkeypatch.setattr(resume, "BOUNDS_PER_CALL", 1)
    one = layer.read(cp, cp.uoff, end - cp.uoff)
    assert one.data == many.data == layer.raw[cp.uoff:end]
    assert one.points == many.points and len(many.points) > 2


def test_resume_costs_only_the_bytes_after_the_point(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    idx = layer.index
    points = ResumePoints(idx)
    uoff = idx.checkpoint(1).uoff - 10_000 if idx.checkpoint_count > 1 else len(layer.raw) // 2
    cp = idx.checkpoint_before(uoff)
    assert uoff - cp.uoff > 1 << 20
    points.add(layer.read(cp, cp.uoff + 1000, 4096).points)
    assert points.best_start(cp.uoff + 1000) == cp  # nothing recorded before it
    # the first read recorded the block boundary past its end: a later read starts there
    start = points.best_start(uoff)
    assert isinstance(start, ResumePoint) and cp.uoff + 5096 <= start.uoff < cp.uoff + 300_000
    res = layer.read(start, uoff, 4096)
    assert res.data == layer.raw[uoff:uoff + 4096]
    points.add(res.points)
    # ...and a read just after that one starts at most ~EVERY before it, not at the checkpoint
    nxt = uoff + 4096
    start = points.best_start(nxt)
    assert isinstance(start, ResumePoint) and nxt - EVERY - 200_000 < start.uoff <= nxt
    before = idx.compressed_range(nxt, 4096)
    after = compressed_range_from(idx, start, nxt, 4096)
    assert after[1] == before[1]
    assert after[1] - after[0] < (before[1] - before[0]) // 4
    assert layer.read(start, nxt, 4096).data == layer.raw[nxt:nxt + 4096]


def test_without_recording(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    cp = layer.index.checkpoint(0)
    res = layer.read(cp, 5000, 300_000, every=None)
    assert res.points == () and res.data == layer.raw[5000:305_000]
    assert layer.read(cp, 5000, 0).data == b""


def _multi_member_layer(n: int) -> Layer:
    rnd = random.Random(n)
    words = [bytes(rnd.choices(b"abcdefghij ", k=7)) for _ in range(500)]
    raw = b"".join(rnd.choice(words) for _ in range(200_000))
    cuts = [rnd.randrange(len(raw)) for _ in range(n)]
    return _as_tar_layer(raw, cuts)


def _as_tar_layer(payload: bytes, cuts: list[int]) -> Layer:
    """One file in a tar, gzipped as several members cut at ``cuts`` (payload offsets)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("data.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    cuts = sorted({0, len(raw), *(c + 512 for c in cuts if c + 512 < len(raw))})
    blob = b"".join(gzip.compress(raw[a:b], 6, mtime=0) for a, b in itertools.pairwise(cuts))
    return Layer(raw, blob, IndexBuildOptions(checkpoint_spacing=256 << 10,
                                              large_file_size=1 << 30))


def test_multi_member_gzip() -> None:
    layer = _multi_member_layer(4)
    points = _points_from_checkpoints(layer)
    assert len(points) > 10
    rnd = random.Random(1)
    for p in points:
        uoff = p.uoff + rnd.randrange(0, 100_000)
        length = min(rnd.randrange(1, 400_000), len(layer.raw) - uoff)
        if length > 0:
            assert layer.read(p, uoff, length).data == layer.raw[uoff:uoff + length]


def _every_mark_restarts(layer: Layer) -> int:
    """Inflate 100 KB from every block boundary the index records, its window taken from the
    stream (as another node publishes it): each gives the stream's bytes."""
    idx, raw = layer.index, layer.raw
    marks = sorted({idx.boundary_before(int(u)) for u in idx._mark_uoffs} - {None},
                   key=lambda m: m.uoff if m else 0)
    for mark in marks:
        assert mark is not None and idx.is_boundary(mark)
        if mark.uoff >= len(raw):
            continue
        point = ResumePoint(idx.blob_digest, mark.coff, mark.bits, mark.uoff,
                            raw[max(0, mark.uoff - resume.WINDOW) : mark.uoff])
        length = min(100_000, len(raw) - mark.uoff)
        assert layer.read(point, mark.uoff, length).data == raw[mark.uoff : mark.uoff + length]
    return len(marks)


def test_every_index_mark_is_a_restart_place(tree_layer: tuple[Layer, Path]) -> None:
    """Version 2 indexes record each block boundary's bit offset: with the 32 KiB before it,
    inflation restarts at any of them (what published restart points rely on)."""
    layer, _ = tree_layer
    idx = layer.index
    assert _every_mark_restarts(layer) > 2 * idx.checkpoint_count
    assert _every_mark_restarts(_multi_member_layer(3)) > 10
    inside = idx.boundary_before(len(layer.raw) // 2)
    assert inside is not None and inside.uoff <= len(layer.raw) // 2
    assert idx.boundary_before(0) is None or idx.boundary_before(0).uoff == 0
    # a place that is not a recorded boundary, or with other bits, is refused
    assert not idx.is_boundary(Checkpoint(-1, inside.coff, (inside.bits + 1) % 8, inside.uoff))
    assert not idx.is_boundary(Checkpoint(-1, inside.coff, inside.bits, inside.uoff + 1))


def test_version_1_index_still_reads_without_restart_marks(
        tree_layer: tuple[Layer, Path]) -> None:
    """An index written before marks had bits (version 1: no bits section) reads as before;
    its marks bound ranges but name no restart places."""
    layer, _ = tree_layer
    v1 = _as_version_1(layer.index)
    assert v1.lookup("email/__init__.py") == layer.index.lookup("email/__init__.py")
    assert v1.compressed_range(1000, 5000) == layer.index.compressed_range(1000, 5000)
    assert v1.boundary_before(len(layer.raw) // 2) is None
    assert not v1.is_boundary(layer.index.boundary_before(len(layer.raw) // 2))


def _as_version_1(index: LayerIndex) -> LayerIndex:
    """The same index in the version 1 layout (the mark bits section cut out)."""
    data = index.to_bytes()
    fields = list(fmt.HEADER.unpack_from(data, 0))
    body_len, nm = fields[13], fields[16]
    body = zstandard.ZstdDecompressor().decompress(data[fmt.HEADER_SIZE:][:body_len])
    bits_end = len(body) - fields[9] - fields[8] * fmt.DIGEST_SIZE  # strings, digests last
    body = body[: bits_end - nm] + body[bits_end:]
    packed = zstandard.ZstdCompressor().compress(body)
    fields[1], fields[13], fields[14] = 1, len(packed), len(body)
    windows = data[fmt.HEADER_SIZE + body_len :]
    return LayerIndex.from_bytes(fmt.HEADER.pack(*fields) + packed + windows)


def test_stream_end(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    size = len(layer.raw)
    cp = layer.index.checkpoint_before(size - 100)
    res = layer.read(cp, size - 100, 100)
    assert res.data == layer.raw[-100:]
    assert all(p.uoff < size for p in res.points)


def test_bad_input(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    idx = layer.index
    cp = idx.checkpoint(0)
    point = layer.read(cp, 0, 200_000).points[0]
    with pytest.raises(ValueError, match="is after"):
        inflate_from(idx, point, b"", point.uoff - 1, 10)
    other = ResumePoint("sha256:" + "0" * 64, point.coff, point.bits, point.uoff, point.window)
    with pytest.raises(ValueError, match="used with layer"):
        compressed_range_from(idx, other, point.uoff, 10)
    with pytest.raises(ValueError, match="added to"):
        ResumePoints(idx).add([other])
    c0, c1 = compressed_range_from(idx, point, point.uoff, 100_000)
    with pytest.raises(LayerFormatError, match="ends before"):
        inflate_from(idx, point, b"", point.uoff, 10)
    with pytest.raises(LayerFormatError, match="ends before"):
        inflate_from(idx, point, layer.blob[c0:c0 + (c1 - c0) // 2], point.uoff, 100_000)
    garbage = bytearray(layer.blob[c0:c1])
    garbage[10:2000] = bytes(range(256)) * 7 + bytes(198)
    with pytest.raises(LayerFormatError):
        inflate_from(idx, point, bytes(garbage), point.uoff, 100_000)
    with pytest.raises(IndexError):
        compressed_range_from(idx, cp, len(layer.raw), 1)
    with pytest.raises(ValueError, match="record_every"):
        inflate_from(idx, cp, layer.blob, 0, 10, record_every=0)


def test_zstd_and_plain_layers_take_checkpoints(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    raw = layer.raw
    for blob in (zstandard.ZstdCompressor().compress(raw), raw):
        other = Layer(raw, blob)
        idx = other.index
        cp = idx.checkpoint_before(123_456)
        res = other.read(cp, 123_456, 70_000)
        assert res.data == raw[123_456:193_456] and res.points == ()
    point = layer.read(layer.index.checkpoint(0), 0, 200_000).points[0]
    zidx = Layer(raw, zstandard.ZstdCompressor().compress(raw)).index
    fake = ResumePoint(zidx.blob_digest, point.coff, point.bits, point.uoff, point.window)
    with pytest.raises(ValueError, match="only for gzip"):
        inflate_from(zidx, fake, b"", point.uoff, 10)


def test_point_set_is_bounded(tree_layer: tuple[Layer, Path]) -> None:
    layer, _ = tree_layer
    idx = layer.index
    points = _points_from_checkpoints(layer)
    kept = ResumePoints(idx, max_points=5)
    kept.add(points)
    assert len(kept) == 5
    # the five most recently added survive; earlier ones fall back to checkpoints / later ones
    newest = points[-5:]
    assert kept.best_start(newest[0].uoff) == newest[0]
    old = points[1]
    best = kept.best_start(old.uoff)
    assert best.uoff <= old.uoff and best != old
    kept.add(points[-5:])  # re-adding is a no-op
    assert len(kept) == 5
    with pytest.raises(ValueError):
        ResumePoints(idx, max_points=0)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_ranges_from_recorded_points(
    tree_layer: tuple[Layer, Path], data: st.DataObject
) -> None:
    layer, _ = tree_layer
    size = len(layer.raw)
    every = data.draw(st.sampled_from([4096, 32 << 10, 256 << 10]))
    a = data.draw(st.integers(0, size - 1))
    n = data.draw(st.integers(0, min(600_000, size - a)))
    cp = layer.index.checkpoint_before(a)
    res = layer.read(cp, a, n, every)
    assert res.data == layer.raw[a:a + n]
    if res.points:
        p = data.draw(st.sampled_from(res.points))
        b = data.draw(st.integers(p.uoff, min(size, p.uoff + 300_000)))
        m = data.draw(st.integers(0, min(200_000, size - b)))
        assert layer.read(p, b, m, every).data == layer.raw[b:b + m]
