"""The EROFS writer's memory bound (issue #15: peak RSS of ``clip serve``).

A build may hold the image and a few bytes per entry, never a Python object per entry for the
whole build: before the bound was set, this test's build peaked at ~920-960 bytes per entry
(every record unpacked into a tuple, a tuple per dirent, a dict of mtimes, chunks joined into
copies of the image); since, ~180-220. The budget sits between the two, with room for allocator and
Python-version differences; tracemalloc counts bytes, so no timing is involved.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from fs_layers import M, index_layer, write_layer

from snapshotter.erofs import write_image
from snapshotter.index import LayerIndex

ENTRIES = 20_000
#: Peak bytes traced per entry of the layer while ``write_image`` runs.
BUDGET_PER_ENTRY = 450


def _members(entries: int) -> list[M]:
    """Directories of 1,000 entries; every entry with its own mtime (the worst case for any
    per-mtime table), some with data, some symlinks."""
    out: list[M] = []
    d = 0
    while len(out) < entries:
        top = f"data/d{d:03d}"
        out.append(M(top, kind=b"5", mode=0o755))
        for i in range(min(999, entries - len(out))):
            mtime = 1_700_000_000 + len(out)
            if i % 10 == 9:
                out.append(M(f"{top}/link{i:04d}", kind=b"2", linkname=f"file{i - 1:04d}",
                             mtime=mtime))
            else:
                out.append(M(f"{top}/file{i:04d}", data=b"x" * (i % 3), mtime=mtime))
        d += 1
    return out


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> LayerIndex:
    tmp = tmp_path_factory.mktemp("erofs-memory")
    blob = write_layer(tmp / "layer.tgz", _members(ENTRIES), level=1)
    return index_layer(blob, tmp / "layer.idx")


@pytest.mark.parametrize("compact_mtime", [False, True])
def test_build_peak_is_bounded_per_entry(index: LayerIndex, tmp_path: Path,
                                         compact_mtime: bool) -> None:
    assert len(index) > ENTRIES  # the root and data/ come on top
    tracemalloc.start()
    try:
        info = write_image(index, tmp_path / "layer.erofs", compact_mtime=compact_mtime)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.inodes == len(index)
    assert info.size == (tmp_path / "layer.erofs").stat().st_size
    assert peak <= BUDGET_PER_ENTRY * len(index), (
        f"build peaked at {peak} bytes, {peak / len(index):.0f} per entry")
