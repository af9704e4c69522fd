"""Reads through the real mount: laziness, cache reuse across mounts, prefill, EIO bounds."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import os
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fs_layers import M, index_layer, mounted, pattern, pread, write_layer

from snapshotter.bridge import AsyncioThread, Bridge
from snapshotter.cache import DiskCache, LayerCache
from snapshotter.fs.layerfs import LayerFS
from snapshotter.fs.mounts import is_mounted
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index
from snapshotter.readpath import FileSource, ReadPolicy

MiB = 1 << 20
BIG = 64 * MiB
SPACING = 1 * MiB  # compressed bytes between checkpoints
BigLayer = tuple[Path, LayerIndex, bytes]


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory: pytest.TempPathFactory) -> BigLayer:
    d = tmp_path_factory.mktemp("big")
    data = pattern(BIG, 3)
    blob = write_layer(d / "big.tgz", [
        M("etc", tarfile.DIRTYPE),
        M("etc/hostname", data=b"clip\n"),
        M("opt", tarfile.DIRTYPE),
        M("opt/big.bin", data=data),
        M("opt/after", data=b"after the big file"),
    ], level=1)
    return blob, index_layer(blob, d / "big.idx", checkpoint_spacing=SPACING), data


class Harness:
    def __init__(self, root: Path, policy: ReadPolicy) -> None:
        self.aio = AsyncioThread()
        self.fs = LayerFS(DiskCache(root), Bridge(self.aio.loop), policy)
        self.mnt = root / "mnt"

    def close(self) -> None:
        try:
            self.fs.stop()
        finally:
            self.aio.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "root", ReadPolicy(timeout=2.0, attempts=2))
    with mounted(h.mnt):
        try:
            h.fs.start(h.mnt)
            yield h
        finally:
            h.close()
    assert not is_mounted(h.mnt)


def test_small_read_in_big_layer_is_lazy(harness: Harness, big_layer: BigLayer) -> None:
    blob, index, data = big_layer
    source = FileSource(blob)
    d = harness.fs.attach("big", index, source)
    assert (d / "etc/hostname").read_bytes() == b"clip\n"
    first = source.bytes_read
    mid = BIG // 2
    assert pread(d / "opt/big.bin", mid, MiB) == data[mid : mid + MiB]
    # 1 MiB of stream (it touches two blocks: two flights) plus at most a checkpoint interval
    # before each flight and the compressed tail of the last block
    assert source.bytes_read - first <= MiB + 3 * SPACING
    blob_size = blob.stat().st_size
    print(f"compressed bytes read: {source.bytes_read} of {blob_size} "
          f"({100 * source.bytes_read / blob_size:.1f}%)")
    assert source.bytes_read < blob_size // 10
    before = source.bytes_read
    assert pread(d / "opt/big.bin", mid + 4096, 8192) == data[mid + 4096 : mid + 12288]
    assert source.bytes_read == before


def test_whole_file_and_cache_reuse_after_remount(tmp_path: Path, big_layer: BigLayer) -> None:
    blob, index, data = big_layer
    root = tmp_path / "root"
    policy = ReadPolicy(timeout=5.0, attempts=1)
    h = Harness(root, policy)
    with mounted(h.mnt):
        try:
            h.fs.start(h.mnt)
            d = h.fs.attach("big", index, FileSource(blob))
            with open(d / "opt/big.bin", "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        finally:
            h.close()
    assert DiskCache(root).layer(index.blob_digest).has_range(0, BIG)

    async def unreachable(coff: int, n: int) -> bytes:
        raise ConnectionError("registry down")

    h = Harness(root, policy)
    with mounted(h.mnt):
        try:
            h.fs.start(h.mnt)
            d = h.fs.attach("big", index, unreachable)
            assert pread(d / "opt/big.bin", BIG - 100, 100) == data[-100:]
        finally:
            h.close()


def test_prefilled_layer_needs_no_source(harness: Harness, tmp_path: Path) -> None:
    members = [M("a", data=pattern(3 * MiB + 5, 9)), M("b", data=b"b")]
    blob = write_layer(tmp_path / "l.tgz", members)
    cache = harness.fs.cache.layer("sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest())
    writer = cache.writer()
    with open(blob, "rb") as f:
        build_index(f, tmp_path / "l.idx", IndexBuildOptions(), on_data=writer.write)
    writer.finish()
    index = LayerIndex.open(tmp_path / "l.idx")
    assert harness.fs.cache.is_complete(index.blob_digest, index.uncompressed_size)

    async def unreachable(coff: int, n: int) -> bytes:
        raise ConnectionError("registry down")

    d = harness.fs.attach("pre", index, unreachable)
    assert (d / "a").read_bytes() == pattern(3 * MiB + 5, 9)
    assert (d / "b").read_bytes() == b"b"
    assert len(gzip.decompress(blob.read_bytes())) == index.uncompressed_size


def test_unreachable_source_gives_eio_in_bound(harness: Harness, big_layer: BigLayer) -> None:
    blob, index, data = big_layer
    good = FileSource(blob)
    mode = {"state": "ok"}

    async def source(coff: int, n: int) -> bytes:
        if mode["state"] == "fail":
            raise ConnectionError("registry down")
        if mode["state"] == "hang":
            await asyncio.sleep(3600)
        return await good(coff, n)

    d = harness.fs.attach("flaky", index, source)
    assert pread(d / "opt/big.bin", 0, 4096) == data[:4096]
    for state in ("fail", "hang"):
        mode["state"] = state
        off = {"fail": BIG // 3, "hang": 2 * BIG // 3}[state]
        # (that a hang ends at the read timeout is checked in virtual time by
        # test_readpath_core.test_hanging_source_times_out)
        with pytest.raises(OSError) as err:
            pread(d / "opt/big.bin", off, 4096)
        assert err.value.errno == errno.EIO
        # cached spans and metadata still served
        assert pread(d / "opt/big.bin", 100, 4096) == data[100:4196]
        assert sorted(os.listdir(d / "opt")) == ["after", "big.bin"]


def test_hung_miss_does_not_block_other_requests(harness: Harness, big_layer: BigLayer) -> None:
    blob, index, data = big_layer
    good = FileSource(blob)
    release = asyncio.Event()
    waiting = threading.Event()
    gate = {"armed": False}

    async def source(coff: int, n: int) -> bytes:
        if gate["armed"]:
            waiting.set()
            await release.wait()
        return await good(coff, n)

    d = harness.fs.attach("slow", index, source)
    assert (d / "etc/hostname").read_bytes() == b"clip\n"
    gate["armed"] = True
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(pread, d / "opt/big.bin", BIG - MiB, 4096)
        assert waiting.wait(30)
        assert not fut.done()
        # while that read waits on the source, other requests are answered (were they not,
        # this would deadlock: the source is released only afterwards)
        assert sorted(os.listdir(d)) == ["etc", "opt"]
        assert (d / "etc/hostname").read_bytes() == b"clip\n"
        harness.aio.loop.call_soon_threadsafe(release.set)
        assert fut.result(5) == data[BIG - MiB : BIG - MiB + 4096]


def test_fetched_blocks_become_durable_without_stop(harness: Harness, big_layer: BigLayer) -> None:
    blob, index, data = big_layer
    d = harness.fs.attach("durable", index, FileSource(blob))
    off = BIG - 3 * MiB
    assert pread(d / "opt/big.bin", off, 4096) == data[off : off + 4096]
    live = harness.fs.cache.layer(index.blob_digest)
    block = (index.entry(index.lookup("opt/big.bin") or 0).uoff + off) // live.block_size
    assert live.has(block)
    flushed = threading.Event()
    original = live.flush

    def flush() -> None:
        original()
        flushed.set()

    live.flush = flush  # type: ignore[method-assign]
    assert flushed.wait(30), "no periodic flush"  # the next periodic flush (or a later one)
    # what a restarted daemon would read from disk (a SIGKILL skips every clean-up)
    probe = LayerCache(live.directory, index.blob_digest)
    found = probe.has(block)
    probe.close()
    assert found, "the fetched block was not made durable by the periodic flush"
