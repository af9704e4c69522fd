"""Disk and memory tiers: presence bookkeeping, persistence, crash safety, sequential prefill."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapshotter.cache import DiskCache, LayerCache, MemoryTier
from snapshotter.cache.disk import _HEADER
from snapshotter.errors import InvalidArgument

DIGEST = "sha256:" + "ab" * 32
BS = 4096


def stream(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def open_cache(tmp_path: Path) -> DiskCache:
    return DiskCache(tmp_path, block_size=BS)


def test_store_marks_only_complete_blocks(tmp_path: Path) -> None:
    cache = open_cache(tmp_path).layer(DIGEST)
    cache.set_size(10 * BS + 100)
    data = stream(10 * BS + 100)
    # [BS/2, 3.5 BS) holds exactly blocks 1 and 2 completely
    assert cache.store(BS // 2, data[BS // 2 : 3 * BS + BS // 2]) == 2
    assert [cache.has(b) for b in range(4)] == [False, True, True, False]
    assert cache.has_range(BS, 2 * BS)
    assert not cache.has_range(BS, 2 * BS + 1)
    assert cache.read(BS + 10, 50) == data[BS + 10 : BS + 60]
    # the last block is partial and complete when it reaches the stream end
    assert cache.store(10 * BS, data[10 * BS :]) == 1
    assert cache.has(10)
    assert not cache.complete()
    cache.store(0, data)
    assert cache.complete()
    assert cache.read(0, len(data)) == data


def test_record_survives_reopen_only_after_flush(tmp_path: Path) -> None:
    disk = open_cache(tmp_path)
    cache = disk.layer(DIGEST)
    cache.set_size(4 * BS)
    data = stream(4 * BS)
    cache.store(0, data[: 2 * BS])
    # simulate a crash: never flushed, so a fresh process must not trust those blocks
    fresh = LayerCache(cache.directory, DIGEST, BS)
    assert not fresh.has(0)
    cache.flush()
    fresh = LayerCache(cache.directory, DIGEST, BS)
    assert fresh.has(0) and fresh.has(1) and not fresh.has(2)
    assert fresh.size == 4 * BS
    assert fresh.read(0, 2 * BS) == data[: 2 * BS]


def test_damaged_record_means_empty(tmp_path: Path) -> None:
    cache = open_cache(tmp_path).layer(DIGEST)
    cache.set_size(2 * BS)
    cache.store(0, stream(2 * BS))
    cache.flush()
    record = cache.directory / "present"
    raw = bytearray(record.read_bytes())
    raw[_HEADER.size] ^= 0xFF  # flip bitmap bits: the CRC no longer matches
    record.write_bytes(bytes(raw))
    assert not LayerCache(cache.directory, DIGEST, BS).has(0)
    record.write_bytes(b"garbage")
    assert not LayerCache(cache.directory, DIGEST, BS).has(0)
    # a record written with another block size is not reused
    cache.flush()
    assert not LayerCache(cache.directory, DIGEST, 2 * BS).has(0)


def test_record_of_larger_blocks_is_read_as_smaller_ones(tmp_path: Path) -> None:
    """A cache written with 1 MiB blocks (before blocks were 256 KiB) keeps its bytes."""
    data = stream(9 * BS + 100)
    coarse = LayerCache(tmp_path / "layer", DIGEST, 4 * BS)
    coarse.set_size(len(data))
    coarse.store(4 * BS, data[4 * BS :])  # coarse blocks 1 and 2 (the last, partial)
    coarse.flush()
    coarse.close()
    fine = LayerCache(tmp_path / "layer", DIGEST, BS)
    assert [b for b in range(12) if fine.has(b)] == [4, 5, 6, 7, 8, 9]
    assert fine.present_blocks() == 6  # none past the stream's end
    assert fine.size == len(data) and fine.read(4 * BS, 6 * BS) == data[4 * BS : 10 * BS]
    assert not fine.complete()
    fine.store(0, data[: 4 * BS])
    assert fine.complete()
    fine.close()


def test_sequential_prefill(tmp_path: Path) -> None:
    disk = open_cache(tmp_path)
    cache = disk.layer(DIGEST)
    data = stream(7 * BS + 123)
    writer = cache.writer()
    for off in range(0, len(data), 1000):
        writer.write(off, memoryview(data)[off : off + 1000])
        assert cache.has_range(0, (off + 1000) // BS * BS) or off + 1000 < BS
    assert not cache.complete()  # size unknown until finish
    writer.finish()
    assert cache.complete()
    assert disk.is_complete(DIGEST, len(data))
    assert not disk.is_complete(DIGEST, len(data) + 1)
    reopened = LayerCache(cache.directory, DIGEST, BS)
    assert reopened.complete()
    assert reopened.read(0, len(data)) == data


def test_prefill_rejects_gaps_and_wrong_size(tmp_path: Path) -> None:
    cache = open_cache(tmp_path).layer(DIGEST)
    writer = cache.writer()
    writer.write(0, b"x" * 10)
    with pytest.raises(InvalidArgument, match="out of order"):
        writer.write(20, b"y")
    with pytest.raises(InvalidArgument, match="expected 11"):
        writer.finish(11)


def test_size_change_drops_stale_bytes(tmp_path: Path) -> None:
    cache = open_cache(tmp_path).layer(DIGEST)
    cache.set_size(2 * BS)
    cache.store(0, stream(2 * BS))
    cache.set_size(3 * BS)
    assert not cache.has(0)


def test_digest_validation_and_remove(tmp_path: Path) -> None:
    disk = open_cache(tmp_path)
    for bad in ("sha256:xyz", "md5:" + "a" * 32, "sha256:../../etc"):
        with pytest.raises(InvalidArgument, match="not a sha256"):
            disk.layer(bad)
    cache = disk.layer(DIGEST)
    assert disk.layer(DIGEST) is cache
    cache.set_size(BS)
    cache.store(0, stream(BS))
    cache.flush()
    disk.remove(DIGEST)
    assert not (tmp_path / "cache" / DIGEST[7:]).exists()
    assert not disk.layer(DIGEST).has(0)
    disk.close()
    assert os.listdir(tmp_path / "cache") == [DIGEST[7:]]


def test_memory_tier_is_bounded_lru() -> None:
    mem = MemoryTier(capacity=3 * 100)
    for b in range(3):
        mem.put("d", b, bytes(100))
    assert mem.get("d", 0) is not None  # 0 is now most recent
    mem.put("d", 3, bytes(100))
    assert mem.get("d", 1) is None
    assert mem.get("d", 0) is not None and mem.get("d", 3) is not None
    assert mem.used == 300
    mem.put("d", 9, bytes(1000))  # larger than the whole tier: not kept
    assert mem.get("d", 9) is None
    mem.drop_layer("d")
    assert mem.used == 0


def test_peek_reads_presence_without_opening_a_released_layer(tmp_path: Path) -> None:
    """Status and sharing look at released layers without locking them against eviction."""
    disk = open_cache(tmp_path)
    data = stream(3 * BS + 10)
    writer = disk.layer(DIGEST).writer()
    writer.write(0, data)
    writer.finish()
    assert disk.peek(DIGEST) == (len(data), [0, 1, 2, 3])  # open: its live record
    disk.release(DIGEST)
    assert disk.peek(DIGEST) == (len(data), [0, 1, 2, 3])  # released: the record on disk
    assert disk.peek_complete(DIGEST, len(data)) and not disk.peek_complete(DIGEST, BS)
    assert [e.digest for e in disk.evict(0, keep=())] == [DIGEST]  # nothing held it open
    assert disk.peek(DIGEST) == (None, [])
