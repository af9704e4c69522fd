"""Restart points published with a start profile (snapshotter.remote.profile): the recording
node picks the block boundary before each far-away profile run with its window from disk;
the document carries them; another node's read path starts those runs' fetches there, with
the stream's bytes and fewer compressed bytes, and drops the points when one proves bad."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import zstandard
from fs_layers import M, index_layer, write_layer

from snapshotter.cache import DiskCache, MemoryTier
from snapshotter.index import LayerIndex
from snapshotter.index.resume import WINDOW, RestartPoint, ResumePoint
from snapshotter.readpath import FileSource, Layer, ReadPath, ReadPolicy
from snapshotter.remote.profile import (
    MIN_GAIN,
    decode_profile,
    encode_profile,
    restart_points,
    runs,
)

BS = 256 << 10
DIGEST = "sha256:" + "ab" * 32


def _text(n: int, seed: int) -> bytes:
    """Compressible bytes full of back-references (words from a small vocabulary), so a wrong
    window shows in the output, with random runs so compressed offsets spread."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randrange(3, 9)) for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rnd.choices(words, k=2000)) + rnd.randbytes(8 << 10)
    return bytes(out[:n])


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LayerIndex, bytes]:
    d = tmp_path_factory.mktemp("points")
    blob = write_layer(d / "blob.tgz", [M("big", data=_text(12 << 20, 1)),
                                        M("small", data=b"x" * 1000)])
    # the fixed spacing only (no density rule): checkpoints far apart, as in a binary layer
    index = index_layer(blob, d / "index", window_share=0)
    return blob, index, gzip.decompress(blob.read_bytes())


def _from(stream: bytes) -> Callable[[int, int], bytes | None]:
    """The window source of a node with every byte of the stream on disk."""
    return lambda uoff, length: stream[uoff : uoff + length]


PROFILE = [30, 31, 12, 13, 14, 40, 41]  # first-read order: three runs


def test_points_are_the_boundaries_before_far_runs(
        layer_files: tuple[Path, LayerIndex, bytes]) -> None:
    _blob, index, stream = layer_files
    points = restart_points(index, PROFILE, BS, _from(stream))
    assert points, "the layer's checkpoints are 2 MiB apart: far runs get a point"
    reach = 0  # compressed end of the runs before: a node fetches those bytes anyway
    for run in runs(PROFILE, 1 << 30):
        start, end = run[0] * BS, min((run[-1] + 1) * BS, len(stream))
        mark = index.boundary_before(start)
        assert mark is not None
        gain = mark.coff - max(index.checkpoint_before(start).coff, reach)
        assert any(p.uoff == mark.uoff for p in points) == (gain >= MIN_GAIN)
        reach = max(reach, index.compressed_range(start, end - start)[1])
    for p in points:
        assert index.is_boundary(p.place)
        assert p.window() == stream[max(0, p.uoff - WINDOW) : p.uoff]
    # a node without the bytes before a boundary publishes no point there
    assert restart_points(index, PROFILE, BS, lambda uoff, length: None) == []


def test_profile_document_carries_points(layer_files: tuple[Path, LayerIndex, bytes]) -> None:
    _blob, index, stream = layer_files
    points = restart_points(index, PROFILE, BS, _from(stream))
    first = {b: 0.01 * i for i, b in enumerate(PROFILE)}
    data = encode_profile(DIGEST, BS, first, 1000.0, points)
    decoded = decode_profile(data, DIGEST, BS)
    assert decoded is not None and decoded.blocks == PROFILE
    assert decoded.points == tuple(points)
    assert decode_profile(encode_profile(DIGEST, BS, first, 1000.0), DIGEST, BS).points == ()


@pytest.mark.parametrize("bad", [
    [[1, 2, 3]],                      # too short
    [[1, 2, 9, "AAAA"]],              # bits out of range
    [[1, 2, 3, "not base64!"]],
    [[-1, 2, 3, "AAAA"]],
    "points",
])
def test_malformed_points_leave_the_blocks(bad: object) -> None:
    doc = json.loads(encode_profile(DIGEST, BS, {5: 0.0, 6: 0.1}, 1000.0))
    doc["points"] = bad
    decoded = decode_profile(json.dumps(doc).encode(), DIGEST, BS)
    assert decoded is not None and decoded.blocks == [5, 6] and decoded.points == ()


def _run(tmp_path: Path, index: LayerIndex, source: FileSource,
         points: list[RestartPoint], blocks: list[list[int]]) -> tuple[ReadPath, Layer]:
    rp = ReadPath(None, MemoryTier(), ReadPolicy(timeout=30, attempts=2))
    layer = Layer("l1", index, source, DiskCache(tmp_path).layer(index.blob_digest))
    assert layer.resume.publish(points) == len(points)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            for run in blocks:
                await rp.fetch_blocks(layer, run)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return rp, layer


def _stored(layer: Layer, stream: bytes, blocks: list[list[int]]) -> None:
    for run in blocks:
        start, end = run[0] * BS, min((run[-1] + 1) * BS, len(stream))
        assert layer.cache.read(start, end - start) == stream[start:end]


def test_published_points_cut_the_bytes_a_profile_fetch_needs(
        tmp_path: Path, layer_files: tuple[Path, LayerIndex, bytes]) -> None:
    blob, index, stream = layer_files
    points = restart_points(index, PROFILE, BS, _from(stream))
    profile_runs = runs(PROFILE, 4)
    plain = FileSource(blob)
    _rp, layer = _run(tmp_path / "a", index, plain, [], profile_runs)
    _stored(layer, stream, profile_runs)
    with_points = FileSource(blob)
    rp, layer = _run(tmp_path / "b", index, with_points, points, profile_runs)
    _stored(layer, stream, profile_runs)
    assert rp.stats.verify_failures == 0 and layer.resume.published == len(points)
    saved = plain.bytes_read - with_points.bytes_read
    assert saved >= MIN_GAIN * len(points)


def test_a_bad_published_window_is_dropped_and_the_bytes_still_right(
        tmp_path: Path, layer_files: tuple[Path, LayerIndex, bytes]) -> None:
    """A point whose window is wrong (here: the stream bytes one KiB earlier) inflates into
    bytes that fail verification; the flight starts again at the checkpoint, the layer forgets
    the published points, and nothing bad is stored."""
    blob, index, stream = layer_files
    good = restart_points(index, PROFILE, BS, _from(stream))
    wrong = [RestartPoint(p.coff, p.bits, p.uoff, zstandard.ZstdCompressor().compress(
        stream[max(0, p.uoff - WINDOW - 1024) : p.uoff - 1024].rjust(min(WINDOW, p.uoff))))
        for p in good]
    # whole runs of 4 blocks: each flight holds whole 1 MiB verification chunks of `big`
    blocks = [list(range(b, b + 8)) for b in (12, 30)]
    rp, layer = _run(tmp_path, index, FileSource(blob), wrong, blocks)
    _stored(layer, stream, blocks)
    assert rp.stats.verify_failures >= 1
    assert layer.resume.published == 0


def test_points_that_are_not_boundaries_of_the_index_are_refused(
        tmp_path: Path, layer_files: tuple[Path, LayerIndex, bytes]) -> None:
    blob, index, stream = layer_files
    points = restart_points(index, PROFILE, BS, _from(stream))
    shifted = [RestartPoint(p.coff + 1, p.bits, p.uoff, p.packed) for p in points]
    layer = Layer("l1", index, FileSource(blob), DiskCache(tmp_path).layer(index.blob_digest))
    assert layer.resume.publish(shifted) == 0
    start = layer.resume.best_start(points[0].uoff)
    assert not (isinstance(start, ResumePoint) and start.published)
