"""The read path without FUSE: correctness against the real stream, single flight, bounds."""

from __future__ import annotations

import gzip
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard
from fs_layers import M, index_layer, pattern, write_layer

from snapshotter.cache import DiskCache, MemoryTier
from snapshotter.index import LayerIndex
from snapshotter.readpath import FileSource, Layer, ReadFailed, ReadPath, ReadPolicy, VerifyError

LayerFiles = tuple[Path, LayerIndex, bytes]
BIG = 12 << 20
MiB = 1 << 20


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> LayerFiles:
    d = tmp_path_factory.mktemp("layer")
    blob = write_layer(d / "blob.tgz", [
        M("a/small", data=b"hello"),
        M("a/big", data=pattern(BIG, 7)),
        M("a/tail", data=pattern(300_000, 8)),
    ])
    index = index_layer(blob, d / "index", **CHECKPOINTS)
    return blob, index, gzip.decompress(blob.read_bytes())


#: Small checkpoint spacing so that a 1 MiB read needs a small part of the blob.
CHECKPOINTS: dict[str, int] = {"checkpoint_spacing": 512 * 1024}


def run_with(
    tmp_path: Path,
    index: LayerIndex,
    source: Callable[[int, int], Awaitable[bytes]],
    body: Callable[[ReadPath, Layer], Awaitable[None]],
    policy: ReadPolicy | None = None,
    clock: trio.testing.MockClock | None = None,
) -> ReadPath:
    """Run `body` in trio; with a MockClock, note that an autojumping one must not run while a
    flight's worker thread does (the jump would time the flight out)."""
    rp = ReadPath(None, MemoryTier(), policy or ReadPolicy(timeout=5, attempts=2))
    cache = DiskCache(tmp_path).layer(index.blob_digest)
    layer = Layer("l1", index, source, cache)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            await body(rp, layer)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return rp


def test_reads_equal_stream_and_fill_cache(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    source = FileSource(blob)
    ranges = [(0, 100), (5 * MiB - 10, 20), (BIG // 2, MiB), (len(stream) - 5000, 10_000),
              (3 * MiB, 3 * MiB + 17), (5 * MiB - 10, 20)]

    async def body(rp: ReadPath, layer: Layer) -> None:
        for uoff, n in ranges:
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]
        before = source.bytes_read
        for uoff, n in ranges:  # everything is cached now
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]
        assert source.bytes_read == before

    rp = run_with(tmp_path, index, source, body)
    assert rp.stats.disk_hits >= len(ranges)
    assert rp.stats.compressed_bytes == source.bytes_read


def test_concurrent_misses_share_one_fetch(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    inner = FileSource(blob)
    release = trio.Event()

    async def slow(coff: int, n: int) -> bytes:
        await release.wait()
        return await inner(coff, n)

    results: list[bytes] = []

    async def body(rp: ReadPath, layer: Layer) -> None:
        async def one(k: int) -> None:
            results.append(await rp.read(layer, 6 * MiB + k * 4096, 4096))

        async with trio.open_nursery() as n:
            for k in range(10):
                n.start_soon(one, k)
            await trio.testing.wait_all_tasks_blocked()  # all ten are waiting
            release.set()

    rp = run_with(tmp_path, index, slow, body)
    assert inner.calls == 1
    assert rp.stats.flights == 1 and rp.stats.shared_waits == 9
    assert sorted(results) == sorted(stream[6 * MiB + k * 4096 : 6 * MiB + (k + 1) * 4096]
                                     for k in range(10))


def test_failing_source_gives_error_within_bound(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    good = FileSource(blob)
    calls = 0
    broken = False

    async def flaky(coff: int, n: int) -> bytes:
        nonlocal calls
        calls += 1
        if broken:
            raise ConnectionError("registry unreachable")
        return await good(coff, n)

    async def body(rp: ReadPath, layer: Layer) -> None:
        nonlocal broken, calls
        assert await rp.read(layer, 0, 1000) == stream[:1000]
        broken = True
        calls = 0
        # the source retries transient errors itself: the read path asks it once
        with pytest.raises(ReadFailed, match=r"unavailable: .*unreachable"):
            await rp.read(layer, BIG, 1000)
        assert calls == 1
        # cached spans stay readable
        assert await rp.read(layer, 10, 500) == stream[10:510]

    run_with(tmp_path, index, flaky, body, ReadPolicy(timeout=5, attempts=3))


def test_hanging_source_times_out(tmp_path: Path, layer_files: LayerFiles) -> None:
    _, index, _ = layer_files

    async def hang(coff: int, n: int) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def body(rp: ReadPath, layer: Layer) -> None:
        start = trio.current_time()
        with pytest.raises(ReadFailed, match=r"within 0\.5s"):
            await rp.read(layer, 0, 10)
        assert trio.current_time() - start == pytest.approx(0.5)  # virtual time

    run_with(tmp_path, index, hang, body, ReadPolicy(timeout=0.5),
             trio.testing.MockClock(autojump_threshold=0))


def test_miss_does_not_block_other_reads(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    good = FileSource(blob)
    release = trio.Event()

    async def gated(coff: int, n: int) -> bytes:
        if good.calls > 0:  # the first fetch passes, later ones wait for the release
            await release.wait()
        return await good(coff, n)

    async def body(rp: ReadPath, layer: Layer) -> None:
        assert await rp.read(layer, 0, 100) == stream[:100]  # block 0 cached (coff 0)
        done = trio.Event()

        async def blocked() -> None:
            assert await rp.read(layer, BIG, 100) == stream[BIG : BIG + 100]
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            assert await rp.read(layer, 50, 100) == stream[50:150]  # served while the miss waits
            release.set()

    run_with(tmp_path, index, gated, body)


def test_corrupt_source_is_rejected_and_not_cached(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, _ = layer_files
    data = bytearray(blob.read_bytes())

    async def corrupt(coff: int, n: int) -> bytes:
        chunk = bytearray(data[coff : coff + n])
        for i in range(100, len(chunk), 997):
            chunk[i] ^= 0x55
        return bytes(chunk)

    tail = index.entry(index.lookup("a/tail") or 0)  # one whole-file digest: verified

    async def body(rp: ReadPath, layer: Layer) -> None:
        with pytest.raises(ReadFailed):
            await rp.read(layer, tail.uoff, tail.size)
        assert not any(layer.cache.has(b) for b in layer.cache.block_range(tail.uoff, tail.size))

    run_with(tmp_path, index, corrupt, body, ReadPolicy(timeout=5, attempts=1))


def test_sequential_read_fetches_each_compressed_byte_about_once(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    source = FileSource(blob)
    step = 128 * 1024

    async def body(rp: ReadPath, layer: Layer) -> None:
        for uoff in range(0, len(stream), step):
            assert await rp.read(layer, uoff, step) == stream[uoff : uoff + step]

    rp = run_with(tmp_path, index, source, body)
    blob_size = blob.stat().st_size
    print(f"sequential: {source.bytes_read} compressed bytes for a {blob_size} byte blob, "
          f"{rp.stats.flights} flights, {rp.stats.inflated_bytes} inflated")
    assert source.bytes_read <= blob_size * 1.1
    assert rp.stats.inflated_bytes <= len(stream) * 1.1


def test_failed_blocks_fail_fast_then_recover(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    good = FileSource(blob)
    down = True

    async def source(coff: int, n: int) -> bytes:
        if down:
            await trio.sleep(0.3)
            raise ConnectionError("registry down")
        return await good(coff, n)

    clock = trio.testing.MockClock(autojump_threshold=0)

    async def body(rp: ReadPath, layer: Layer) -> None:
        nonlocal down
        with pytest.raises(ReadFailed, match="registry down"):
            await rp.read(layer, 0, 10)
        start = trio.current_time()
        with pytest.raises(ReadFailed, match="registry down"):
            await rp.read(layer, 0, 10)
        assert trio.current_time() == start  # failed at once, without asking the source
        down = False
        clock.jump(0.5)  # past failure_ttl
        clock.autojump_threshold = math.inf  # the fetch now runs a worker thread
        assert await rp.read(layer, 0, 10) == stream[:10]

    run_with(tmp_path, index, source, body,
             ReadPolicy(timeout=5, attempts=1, failure_ttl=0.4), clock)


def test_verify_checks_whole_chunks(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    layer = Layer("v", index, FileSource(blob), DiskCache(tmp_path).layer(index.blob_digest))
    big = index.lookup("a/big")
    assert big is not None
    chunks = index.chunk_digests(big)
    cu, clen, _ = chunks[2]
    start, end = cu - 100, cu + clen + 100
    assert layer.verify(start, stream[start:end]) == 1
    bad = bytearray(stream[start:end])
    bad[200] ^= 1
    with pytest.raises(VerifyError, match="corrupt"):
        layer.verify(start, bytes(bad))
    # a chunk only partly inside the range is not judged
    assert layer.verify(cu + 1, stream[cu + 1 : cu + clen]) == 0


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_other_compressions(tmp_path: Path, compression: str) -> None:
    raw_blob = write_layer(tmp_path / "l.tgz", [M("x", data=pattern(5 * MiB + 3, 4))])
    stream = gzip.decompress(raw_blob.read_bytes())
    blob = tmp_path / f"l.{compression}"
    if compression == "zstd":
        # several frames, as a seekable zstd writer would produce
        cctx = zstandard.ZstdCompressor(level=3)
        blob.write_bytes(b"".join(cctx.compress(stream[i : i + MiB])
                                  for i in range(0, len(stream), MiB)))
    else:
        blob.write_bytes(stream)
    index = index_layer(blob, tmp_path / "l.idx")
    assert index.compression == compression
    source = FileSource(blob)

    async def body(rp: ReadPath, layer: Layer) -> None:
        for uoff, n in [(3 * MiB + 7, 1000), (0, 600), (len(stream) - 10, 10), (MiB - 5, MiB)]:
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]
        for uoff in range(0, len(stream), 128 * 1024):
            assert await rp.read(layer, uoff, 128 * 1024) == stream[uoff : uoff + 128 * 1024]

    run_with(tmp_path, index, source, body)
    print(f"{compression}: {source.bytes_read} bytes read of {blob.stat().st_size}")
