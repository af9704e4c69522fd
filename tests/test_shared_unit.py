"""Pure parts of the shared read path: chunk cover and verification, start profiles, runs,
the index artifact's naming and parsing."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from pathlib import Path

import pytest
from fs_layers import M, index_layer, pattern, write_layer

from snapshotter.cache import DiskCache
from snapshotter.errors import InvalidArgument
from snapshotter.index import LayerIndex
from snapshotter.readpath import FileSource, Layer, VerifyError
from snapshotter.registry.reference import parse_reference
from snapshotter.remote.artifact import ARTIFACT_TYPE, INDEX_MEDIA_TYPE, artifact_tag
from snapshotter.remote.artifact import _parse as parse_artifact
from snapshotter.remote.profile import (
    PROFILE_MEDIA_TYPE,
    StartProfile,
    decode_profile,
    encode_profile,
    in_first_read_order,
    profile_digest,
    runs,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayerIndex, bytes, Path]:
    d = tmp_path_factory.mktemp("cover")
    blob = write_layer(d / "b.tgz", [
        M("odd", data=pattern(333_333, 1)),
        M("big", data=pattern(5 * MiB + 123, 2)),
        M("small", data=b"tiny"),
    ])
    return index_layer(blob, d / "idx"), gzip.decompress(blob.read_bytes()), d


def make(layer: tuple[LayerIndex, bytes, Path]) -> Layer:
    index, _, d = layer
    return Layer("t", index, FileSource(d / "b.tgz"), DiskCache(d).layer(index.blob_digest))


def test_chunk_cover_widens_to_whole_chunks(layer: tuple[LayerIndex, bytes, Path]) -> None:
    index, stream, _ = layer
    lay = make(layer)
    big = index.entry(index.lookup("big") or 0)
    lo, hi = lay.chunk_cover(2 * MiB, 3 * MiB)
    # the big file's chunks start at its own offset, not at block boundaries
    assert (lo - big.uoff) % MiB == 0 and (hi - big.uoff) % MiB == 0
    assert lo <= 2 * MiB and hi >= 3 * MiB and hi - lo <= 3 * MiB
    assert lay.verify_cover(lo, stream[lo:hi], 2 * MiB, 3 * MiB) >= 1
    # the file's tail chunk ends at the file end
    end = big.uoff + big.size
    assert lay.chunk_cover(end - 10, end)[1] == end


def test_verify_cover_checks_whole_bytes_and_pieces_alike(
    layer: tuple[LayerIndex, bytes, Path],
) -> None:
    """The ContentCache's blocks are verified as they came (chunks straddle them), exactly as
    joined bytes are: same chunks checked, corruption and missing coverage refused."""
    _, stream, _ = layer
    lay = make(layer)
    lo, hi = lay.chunk_cover(2 * MiB, 3 * MiB)
    cuts = [lo, lo + 1, lo + 300_000, 2 * MiB + 7, hi]  # odd sizes, one piece of one byte
    pieces = [stream[a:b] for a, b in itertools.pairwise(cuts)]
    assert lay.verify_cover(lo, pieces, 2 * MiB, 3 * MiB) == lay.verify_cover(
        lo, stream[lo:hi], 2 * MiB, 3 * MiB) >= 1
    flipped = bytearray(stream[lo:hi])
    flipped[len(flipped) // 2] ^= 1
    bad_piece = bytearray(pieces[2])
    bad_piece[-1] ^= 1
    for corrupt in (bytes(flipped), [*pieces[:2], bytes(bad_piece), *pieces[3:]]):
        with pytest.raises(VerifyError, match="corrupt"):
            lay.verify_cover(lo, corrupt, 2 * MiB, 3 * MiB)
    for dstart, short in ((2 * MiB, stream[2 * MiB : 3 * MiB]), (lo, pieces[:-1])):
        with pytest.raises(VerifyError, match="not covered"):
            lay.verify_cover(dstart, short, 2 * MiB, 3 * MiB)


def test_profiles_round_trip_and_reject_foreign() -> None:
    d = "sha256:" + "ab" * 32
    # block 1 first read 0.25 s after the recording started, at 1000 s since the epoch
    data = encode_profile(d, MiB, {5: 0.0, 1: 0.25, 3: 1.5}, started=1000.0)
    assert decode_profile(data, d, MiB) == StartProfile([5, 1, 3], [1000.0, 1000.25, 1001.5])
    assert decode_profile(data, "sha256:" + "cd" * 32, MiB) is None
    # a profile of larger blocks (published before blocks were 256 KiB) in this size's blocks
    assert decode_profile(data, d, MiB // 4) == StartProfile(
        [20, 21, 22, 23, 4, 5, 6, 7, 12, 13, 14, 15], [1000.0] * 4 + [1000.25] * 4 + [1001.5] * 4)
    assert decode_profile(data, d, 2 * MiB) is None  # coarser than recorded: cannot be split
    assert decode_profile(data, d, 3 << 18) is None  # not a divisor of the recorded size
    assert decode_profile(b"not json", d, MiB) is None

    def doc(**fields: object) -> bytes:
        return json.dumps({"layer": d, "block_size": MiB, **fields}).encode()

    # recorded before times were kept: the order only (repeats dropped)
    assert decode_profile(doc(blocks=[5, 1, 5, 3]), d, MiB) == StartProfile([5, 1, 3], None)
    for bad in ({"blocks": [-1]}, {"blocks": "5"}, {"blocks": [5, 1], "started": 9, "ms": [0]},
                {"blocks": [5, 1], "started": 9, "ms": [0, -3]},
                {"blocks": [5, 1], "started": 9, "ms": [0, 2.5]},
                {"blocks": [5, 1], "started": 9, "ms": {"5": 0}},
                {"blocks": [5, 1], "ms": [0, 1]}, {"blocks": [5, 1], "started": 9},
                {"blocks": [5, 1], "started": True, "ms": [0, 1]}):
        assert decode_profile(doc(**bad), d, MiB) is None, bad
    assert profile_digest(d).startswith("sha256:") and profile_digest(d) != d


def test_a_recorded_profile_keeps_the_order_and_time_blocks_were_first_read(
    layer: tuple[LayerIndex, bytes, Path],
) -> None:
    lay = make(layer)
    now = [100.0]
    lay.clock = lambda: now[0]
    lay.note(range(1))  # not recording: nothing kept
    lay.record_profile(10)
    for at, blocks in ((100.5, range(7, 9)), (101.0, range(2, 3)), (102.25, range(8, 10))):
        now[0] = at
        lay.note(blocks)
    now[0] = 110.0
    lay.note(range(20, 21))  # the recording is over
    assert lay.profile == {7: 0.5, 8: 0.5, 2: 1.0, 9: 2.25}
    assert list(lay.profile) == [7, 8, 2, 9]
    d = lay.digest
    assert decode_profile(encode_profile(d, MiB, lay.profile, 50.0), d, MiB) == StartProfile(
        [7, 8, 2, 9], [50.5, 50.5, 51.0, 52.25])


def test_runs_group_consecutive_blocks() -> None:
    assert runs([9, 1, 2, 3, 4, 5, 7]) == [[1, 2, 3, 4], [5], [7], [9]]
    assert runs([]) == []


def test_profile_runs_are_ordered_by_when_their_blocks_were_first_read() -> None:
    blocks = [9, 40, 41, 1, 2, 3, 4, 5, 7]  # the container read block 9 first, then 40...
    work = runs(blocks)  # [[1, 2, 3, 4], [5], [7], [9], [40, 41]]
    work[1:3] = [[5, 6, 7]]  # merge_runs joined two runs with the block between
    untimed = StartProfile(blocks)  # recorded before times were kept: the order decides
    assert in_first_read_order(work, untimed, untimed=7.0) == [
        (7.0, [9]), (7.0, [40, 41]), (7.0, [1, 2, 3, 4]), (7.0, [5, 6, 7])]
    timed = StartProfile(blocks, [0.1, 0.2, 0.2, 0.7, 0.7, 0.7, 0.8, 0.9, 1.2])
    assert in_first_read_order(work, timed, untimed=7.0) == [
        (0.1, [9]), (0.2, [40, 41]), (0.7, [1, 2, 3, 4]), (0.9, [5, 6, 7])]
    assert in_first_read_order([], timed, untimed=7.0) == []


def test_artifact_tag_and_parse() -> None:
    manifest = "sha256:" + "12" * 32
    assert artifact_tag(manifest) == "sha256-" + "12" * 32 + ".clip"
    with pytest.raises(InvalidArgument):
        artifact_tag("nohex")
    layer_digest = "sha256:" + "34" * 32

    def desc(media_type: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "size": len(data),
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                "annotations": {"io.clip.layer.digest": layer_digest}}

    doc = {"schemaVersion": 2, "artifactType": ARTIFACT_TYPE,
           "layers": [desc(INDEX_MEDIA_TYPE, b"i"), desc(PROFILE_MEDIA_TYPE, b"p")]}
    artifact = parse_artifact(parse_reference("h:1/r:t"), json.dumps(doc).encode())
    entry = artifact.layers[layer_digest]
    assert entry.index.size == 1 and entry.profile is not None
    with pytest.raises(InvalidArgument):
        parse_artifact(parse_reference("h:1/r:t"), json.dumps({"artifactType": "x"}).encode())

