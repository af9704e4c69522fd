"""A layer owns its work: detach cancels and drains flights, worker threads and background
fetch before the cache file closes; background fetch is throttled, yields to foreground reads
and stops at the disk cache's limit; a full filesystem (a real, tiny tmpfs) evicts unused
layers and otherwise leaves layers lazily served. Virtual time (trio's MockClock) throughout."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from fs_layers import M, index_layer, pattern, write_layer

from snapshotter.cache import DiskBudget, DiskCache, MemoryTier
from snapshotter.config import BackgroundFetchConfig
from snapshotter.index import LayerIndex
from snapshotter.readpath import FileSource, Layer, ReadFailed, ReadPath, ReadPolicy
from snapshotter.remote.background import BackgroundFetch
from snapshotter.remote.profile import StartProfile

MiB = 1 << 20
LayerFiles = tuple[Path, LayerIndex, bytes]
#: Far beyond any virtual time a test reaches: flights never time out by clock jumps.
POLICY = ReadPolicy(timeout=1e6, attempts=1)


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> LayerFiles:
    d = tmp_path_factory.mktemp("own")
    blob = write_layer(d / "blob.tgz", [M("big", data=pattern(10 * MiB, 3)), M("s", data=b"x")])
    index = index_layer(blob, d / "index", checkpoint_spacing=512 * 1024)
    return blob, index, gzip.decompress(blob.read_bytes())


def run(body: Callable[[ReadPath, trio.Nursery], Awaitable[None]], clock: str = "fast",
        readpath: ReadPath | None = None) -> ReadPath:
    """Run `body` with a read path under a MockClock: "jump" skips idle time (no worker
    threads may run then: a jump would time their flights out), "fast" runs virtual time at
    1000x real time (threads fine), "still" never moves it."""
    rp = readpath or ReadPath(None, MemoryTier(0), POLICY)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            await body(rp, nursery)
            nursery.cancel_scope.cancel()

    mock = {
        "jump": trio.testing.MockClock(autojump_threshold=0),
        "fast": trio.testing.MockClock(rate=1000),
        "still": trio.testing.MockClock(),
    }[clock]
    trio.run(main, clock=mock)
    return rp


def test_close_layer_cancels_a_hanging_flight_and_nothing_writes_after(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, _ = layer_files
    entered = trio.Event()
    served = FileSource(blob)

    async def slow(coff: int, n: int) -> bytes:
        entered.set()
        await trio.sleep(3600)  # a registry that answers an hour later
        return await served(coff, n)

    disk = DiskCache(tmp_path)
    layer = Layer("l", index, slow, disk.layer(index.blob_digest))
    errors: list[Exception] = []

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        async def reader() -> None:
            try:
                await rp.read(layer, 0, 4096)
            except ReadFailed as exc:
                errors.append(exc)

        nursery.start_soon(reader)
        await entered.wait()
        assert layer.tasks.running == 1
        await rp.close_layer(layer)
        assert layer.tasks.running == 0
        disk.release(layer.digest)  # the owner closes the cache file only now
        await trio.sleep(7200)  # long after the source would have answered
        with pytest.raises(ReadFailed, match="detached"):
            await rp.read(layer, 0, 10)

    run(body, clock="jump")
    assert [str(e) for e in errors] and "cancelled" in str(errors[0])
    assert served.calls == 0 and layer.cache.closed
    assert DiskCache(tmp_path).layer(index.blob_digest).present_blocks() == 0


def test_close_layer_waits_for_its_worker_thread(tmp_path: Path, layer_files: LayerFiles) -> None:
    """A flight's inflate/store thread is never abandoned: close returns after it ends."""
    blob, index, stream = layer_files
    layer = Layer("l", index, FileSource(blob), DiskCache(tmp_path).layer(index.blob_digest))
    storing, proceed = threading.Event(), threading.Event()
    original = layer.cache.store
    order: list[str] = []

    def gated_store(uoff: int, data: bytes | memoryview) -> int:
        storing.set()
        proceed.wait()
        stored = original(uoff, data)
        order.append("stored")
        return stored

    layer.cache.store = gated_store  # type: ignore[method-assign]

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        async def read() -> None:
            assert await rp.read(layer, 0, 100) == stream[:100]

        nursery.start_soon(read)
        await trio.to_thread.run_sync(storing.wait)
        closed = trio.Event()

        async def close() -> None:
            await rp.close_layer(layer)
            order.append("closed")
            closed.set()

        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed.is_set()
        proceed.set()
        await closed.wait()

    run(body, clock="still")
    assert order == ["stored", "closed"]


def test_background_fetch_is_throttled_and_completes(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    layer = Layer("l", index, FileSource(blob), DiskCache(tmp_path).layer(index.blob_digest))
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=2 * MiB, concurrency=2)
    done: list[Layer] = []
    finished_at: list[float] = []

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        fetch = BackgroundFetch(rp, options, on_complete=done.append)
        await fetch.run(layer, StartProfile([layer.nblocks() - 1]))
        finished_at.append(trio.current_time())

    run(body)
    assert layer.cache.complete() and done == [layer]
    # the profile block is free, the other ~9 MiB are paid for at 2 MiB/s of virtual time
    assert finished_at[0] >= (len(stream) - 2 * MiB) / (2 * MiB)


def test_a_detached_layer_gives_up_its_prefetch_slots(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    """One slot: layer a's first run hangs at the registry, its second and layer b's runs wait
    behind it. Detaching a cancels its runs and hands the slot on: b's profile is fetched and
    the slot is free again."""
    _, index, _ = layer_files
    other = write_layer(tmp_path / "b.tgz", [M("big", data=pattern(6 * MiB, 9))])
    b_index = index_layer(other, tmp_path / "b.index", checkpoint_spacing=512 * 1024)
    entered, never = trio.Event(), trio.Event()

    async def hanging(coff: int, n: int) -> bytes:
        entered.set()
        await never.wait()
        raise AssertionError("unreachable")

    disk = DiskCache(tmp_path / "cache")
    a = Layer("a", index, hanging, disk.layer(index.blob_digest))
    b = Layer("b", b_index, FileSource(other), disk.layer(b_index.blob_digest))
    a_profile = StartProfile([0, a.nblocks() - 1], [100.0, 101.0])
    b_profile = StartProfile([0, 8, b.nblocks() - 1], [100.5, 102.0, 103.0])
    done = trio.Event()

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        fetch = BackgroundFetch(rp, BackgroundFetchConfig(enabled=False, concurrency=1))

        async def fetch_b() -> None:
            await fetch.run(b, b_profile)
            done.set()

        rp.spawn(a, fetch.run, a, a_profile)
        await entered.wait()
        nursery.start_soon(fetch_b)
        await trio.testing.wait_all_tasks_blocked()
        assert not any(b.cache.has(x) for x in b_profile.blocks)  # queued behind a's run
        await rp.close_layer(a)
        await done.wait()
        assert all(b.cache.has(x) for x in b_profile.blocks)
        assert fetch.slots.queue(0.0).granted.is_set()  # nothing kept the slot

    run(body)
    assert a.cache.present_blocks() == 0


def test_background_fetch_yields_to_waiting_foreground_reads(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, _ = layer_files
    source = FileSource(blob)
    layer = Layer("l", index, source, DiskCache(tmp_path).layer(index.blob_digest))
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=1 << 40, concurrency=2)

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        async with trio.open_nursery() as inner:
            with rp.foreground_wait():
                inner.start_soon(BackgroundFetch(rp, options).run, layer, None)
                await trio.testing.wait_all_tasks_blocked()
                assert source.calls == 0  # parked on the read path's event, not polling

    run(body)
    assert layer.cache.complete()


def test_background_fetch_stops_at_the_limit_and_reads_still_work(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    budget = DiskBudget(tmp_path / "cache", 9 * MiB)
    disk = DiskCache(tmp_path, budget=budget)
    layer = Layer("l", index, FileSource(blob), disk.layer(index.blob_digest))
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=1 << 40, concurrency=1)

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        await BackgroundFetch(rp, options, budget).run(layer, None)  # 8 MiB runs: one fits
        assert layer.cache.present_blocks() * layer.cache.block_size == 8 * MiB
        span = stream[8 * MiB :]
        assert await rp.read(layer, 8 * MiB, len(span)) == span  # served, not stored

    rp = run(body)
    assert layer.cache.present_blocks() * layer.cache.block_size == 8 * MiB
    assert not layer.cache.complete()
    assert rp.stats.uncached_bytes >= 2 * MiB and budget.used <= 9 * MiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs: writes past it fail with ENOSPC."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_enospc_evicts_an_unused_layer_then_serves_lazily(
    tiny_fs: Path, tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    budget = DiskBudget(tiny_fs, 0)  # no configured limit: only the filesystem bounds it
    disk = DiskCache(tmp_path, directory=tiny_fs, budget=budget)
    old = "sha256:" + "ab" * 32
    writer = disk.layer(old).writer()
    writer.write(0, os.urandom(5 * MiB))
    writer.finish()
    disk.release(old)  # unused now: evictable
    layer = Layer("l", index, FileSource(blob), disk.layer(index.blob_digest))

    async def body(rp: ReadPath, nursery: trio.Nursery) -> None:
        for uoff in range(0, len(stream), MiB):
            assert await rp.read(layer, uoff, MiB) == stream[uoff : uoff + MiB]

    rp = run(body)
    assert not (tiny_fs / old.removeprefix("sha256:")).exists()
    assert [e.digest for e in budget.evicted] == [old]
    assert layer.cache.present_blocks() > 0
    # the 10 MiB layer cannot fit in 8 MiB: the rest was served without being stored
    assert rp.stats.uncached_bytes > 0 and not layer.cache.complete()
    disk.close()


def test_a_streaming_build_evicts_on_enospc_and_goes_on(tiny_fs: Path, tmp_path: Path) -> None:
    budget = DiskBudget(tiny_fs, 0)
    disk = DiskCache(tmp_path, directory=tiny_fs, budget=budget)
    old, new = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
    writer = disk.layer(old).writer()
    writer.write(0, os.urandom(5 * MiB))
    writer.finish()
    disk.release(old)
    writer = disk.layer(new).writer()
    for uoff in range(0, 6 * MiB, 256 * 1024):  # past the 8 MiB tmpfs with `old` on it
        writer.write(uoff, os.urandom(256 * 1024))
    writer.finish()
    assert writer.stopped is None and disk.layer(new).complete()
    assert [e.digest for e in budget.evicted] == [old]
    disk.close()
