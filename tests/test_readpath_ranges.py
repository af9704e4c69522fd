"""Fetch planning against what is there (issue #12): no two compressed requests of a layer
overlap, whether reads are concurrent, adjacent, random, a start profile or a background pass;
a full background pass requests each compressed byte of the blob once; the pass is paced by its
token bucket (virtual time) and pauses for foreground reads. Synchronised with events,
`wait_all_tasks_blocked` and trio's MockClock; no sleeps."""

from __future__ import annotations

import gzip
import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from fs_layers import M, index_layer, pattern, write_layer

from snapshotter.cache import BLOCK_SIZE, DiskCache, MemoryTier
from snapshotter.config import BackgroundFetchConfig
from snapshotter.fs.layerfs import held_parts
from snapshotter.index import LayerIndex
from snapshotter.readpath import FileSource, Layer, ReadPath, ReadPolicy, Source
from snapshotter.readpath.ranges import LayerRanges
from snapshotter.remote.background import BackgroundFetch, PrefetchSlots, merge_runs
from snapshotter.remote.profile import StartProfile

MiB = 1 << 20
LayerFiles = tuple[Path, LayerIndex, bytes]
POLICY = ReadPolicy(timeout=1e6)
UNLIMITED = BackgroundFetchConfig(enabled=True, bytes_per_second=1 << 40, concurrency=2,
                                  quiet_seconds=0)


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> LayerFiles:
    d = tmp_path_factory.mktemp("ranges")
    blob = write_layer(d / "blob.tgz", [
        M("big", data=pattern(20 * MiB, 5)),
        *(M(f"small/{i}", data=pattern(70_000 + i * 997, i)) for i in range(40)),
    ])
    index = index_layer(blob, d / "index", checkpoint_spacing=512 * 1024)
    return blob, index, gzip.decompress(blob.read_bytes())


@pytest.fixture(scope="module")
def sparse_index(tmp_path_factory: pytest.TempPathFactory, layer_files: LayerFiles) -> LayerIndex:
    """The same layer indexed with checkpoints 4 MiB of compressed data apart."""
    return index_layer(layer_files[0], tmp_path_factory.mktemp("sparse") / "index",
                       checkpoint_spacing=4 << 20)


class Recorder:
    """A source that serves a blob file, records every request and can be held shut."""

    def __init__(self, blob: Path) -> None:
        self.file = FileSource(blob)
        self.requests: list[tuple[int, int]] = []
        self.gate: trio.Event | None = None

    async def __call__(self, coff: int, length: int) -> bytes:
        self.requests.append((coff, coff + length))
        if self.gate is not None:
            await self.gate.wait()
        return await self.file(coff, length)

    @property
    def served(self) -> int:
        return sum(e - s for s, e in self.requests)

    def overlaps(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        spans = sorted(self.requests)
        return [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


def run(
    tmp_path: Path, index: LayerIndex, source: Recorder,
    body: Callable[[ReadPath, Layer], Awaitable[None]],
    clock: trio.abc.Clock | None = None,
) -> tuple[ReadPath, Layer]:
    rp = ReadPath(None, MemoryTier(0), POLICY)
    layer = Layer("l", index, source, DiskCache(tmp_path).layer(index.blob_digest))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            await body(rp, layer)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return rp, layer


async def get(ranges: LayerRanges, coff: int, cend: int, source: Source) -> bytes:
    async with ranges.fetching(coff, cend, source) as data:
        return data


def blob_span(index: LayerIndex) -> int:
    """Compressed bytes a full fetch needs: from the first checkpoint (after the gzip header)
    to the blob's end."""
    return int(index.compressed_size) - int(index.checkpoint(0).coff)


# --- LayerRanges alone ------------------------------------------------------------------------


def test_concurrent_overlapping_gets_request_each_byte_once() -> None:
    blob = bytes(range(256)) * 64
    requests: list[tuple[int, int]] = []
    gate = trio.Event()

    async def source(coff: int, n: int) -> bytes:
        requests.append((coff, coff + n))
        await gate.wait()
        return blob[coff : coff + n]

    async def main() -> None:
        ranges = LayerRanges(limit=4096)
        got: dict[tuple[int, int], bytes] = {}

        async def one(a: int, b: int) -> None:
            got[(a, b)] = await get(ranges, a, b, source)

        async with trio.open_nursery() as n:
            for a, b in [(100, 5000), (3000, 9000), (0, 200), (8000, 12000)]:
                n.start_soon(one, a, b)
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert all(v == blob[a:b] for (a, b), v in got.items())
        assert sorted(requests) == [(0, 100), (100, 5000), (5000, 9000), (9000, 12000)]
        assert ranges.stats.requested == 12000 and ranges.stats.reused == 100 + 2000 + 1000

        ranges.hold(9000, blob[9000:12000])
        assert await get(ranges, 10000, 11000, source) == blob[10000:11000]
        assert len(requests) == 4  # held bytes answered it
        ranges.hold(0, blob[0:3000])  # over the 4096-byte limit together: the oldest goes
        assert ranges.held_bytes == 3000
        ranges.discard(100, 200)
        assert ranges.held_bytes == 0

        # over the limit, pieces no longer needed go before the least recently used
        ranges.hold(0, blob[0:1500], needed=lambda: True)
        ranges.hold(2000, blob[2000:3500], needed=lambda: False)
        ranges.hold(5000, blob[5000:6500])
        assert ranges.held_bytes == 3000
        assert await get(ranges, 0, 1500, source) == blob[0:1500]
        assert await get(ranges, 5000, 6500, source) == blob[5000:6500]
        assert len(requests) == 4
        # a piece held at one offset for two neighbours stays while either needs it
        ranges.clear()
        tail_needed = True
        ranges.hold(0, blob[0:1000], needed=lambda: tail_needed)
        ranges.hold(0, blob[0:500], needed=lambda: False)
        assert ranges.held_bytes == 1000
        tail_needed = False
        ranges.hold(2000, blob[2000:2100])
        assert ranges.held_bytes == 100

    trio.run(main)


def test_a_failed_request_others_waited_for_is_requested_again_once() -> None:
    blob = bytes(range(250)) * 4
    calls: list[tuple[int, int]] = []
    first = trio.Event()
    down = False

    async def source(coff: int, n: int) -> bytes:
        calls.append((coff, n))
        if (coff, n) == (0, 500):
            await first.wait()
            raise ConnectionError("reset")
        if down:
            raise ConnectionError("down")
        return blob[coff : coff + n]

    async def main() -> None:
        nonlocal down
        ranges = LayerRanges()
        errors: list[Exception] = []
        result: list[bytes] = []

        async def owner() -> None:
            with pytest.raises(ConnectionError) as caught:
                await get(ranges, 0, 500, source)
            errors.append(caught.value)

        async def waiter() -> None:
            result.append(await get(ranges, 100, 400, source))

        async with trio.open_nursery() as n:
            n.start_soon(owner)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [(0, 500)]  # the waiter waits for the owner's request
            first.set()
        assert [str(e) for e in errors] == ["reset"]
        assert result == [blob[100:400]] and calls[1:] == [(100, 300)]
        down = True
        calls.clear()
        with pytest.raises(ConnectionError, match="down"):  # the source's own error
            await get(ranges, 0, 10, source)
        assert calls == [(0, 10)]

    trio.run(main)


# --- through the read path --------------------------------------------------------------------


def test_full_background_pass_requests_the_blob_once(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    source = Recorder(blob)

    async def body(rp: ReadPath, layer: Layer) -> None:
        await BackgroundFetch(rp, UNLIMITED).run(layer, None)
        assert layer.cache.complete()
        assert await rp.read(layer, 0, len(stream)) == stream

    rp, layer = run(tmp_path, index, source, body)
    assert source.overlaps() == []
    assert source.served == blob_span(index) == rp.stats.compressed_bytes
    # one request per run of max_run (8 MiB) of the uncompressed stream
    assert len(source.requests) == -(-len(stream) // POLICY.max_run)
    assert layer.ranges.held_bytes <= layer.ranges.limit


def test_foreground_reads_during_the_pass_never_overlap_it(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    source = Recorder(blob)
    rnd = random.Random(3)
    reads = [(rnd.randrange(len(stream) - 5000), rnd.choice([100, 4096, 300_000]))
             for _ in range(12)]

    async def body(rp: ReadPath, layer: Layer) -> None:
        async def reader(uoff: int, n: int) -> None:
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]

        source.gate = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(BackgroundFetch(rp, UNLIMITED).run, layer, None)
            await trio.testing.wait_all_tasks_blocked()  # the pass's first run is in flight
            for uoff, length in reads:
                n.start_soon(reader, uoff, length)
            await trio.testing.wait_all_tasks_blocked()
            source.gate.set()
        assert layer.cache.complete()

    run(tmp_path, index, source, body)
    assert source.overlaps() == []
    # Each foreground read restarted inflation at a checkpoint/resume point; the pass later
    # continues around it. Held heads and tails make that exact here.
    assert source.served == blob_span(index)


def test_concurrent_random_reads_never_overlap(tmp_path: Path, layer_files: LayerFiles) -> None:
    blob, index, stream = layer_files
    source = Recorder(blob)
    rnd = random.Random(7)
    reads = [(rnd.randrange(len(stream) - 4096), 4096) for _ in range(40)]

    async def body(rp: ReadPath, layer: Layer) -> None:
        async def reader(uoff: int, n: int) -> None:
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]

        for batch in (reads[:20], reads[20:]):
            source.gate = trio.Event()
            async with trio.open_nursery() as n:
                for uoff, length in batch:
                    n.start_soon(reader, uoff, length)
                await trio.testing.wait_all_tasks_blocked()
                source.gate.set()

    run(tmp_path, index, source, body)
    assert source.overlaps() == []
    assert source.served <= blob_span(index)


def test_profile_runs_are_merged_and_never_overlap(
    tmp_path: Path, layer_files: LayerFiles, sparse_index: LayerIndex
) -> None:
    blob, _, _ = layer_files
    index = sparse_index  # restart places lie blocks before a run: neighbours overlap
    source = Recorder(blob)
    # neighbouring runs (gaps of one MiB) and runs far apart, in the cache's blocks
    k = MiB // BLOCK_SIZE
    work = [list(range(first * k, (last + 1) * k))
            for first, last in ((0, 1), (3, 4), (6, 6), (12, 13), (18, 19))]
    profile = [b for blocks in work for b in blocks]

    async def body(rp: ReadPath, layer: Layer) -> None:
        warmed: list[list[int]] = []

        def on_profile_run(of: Layer, blocks: list[int]) -> None:
            assert of is layer and all(layer.cache.has(b) for b in blocks)  # fetched first
            warmed.append(blocks)

        fetch = BackgroundFetch(rp, BackgroundFetchConfig(enabled=False, concurrency=4),
                                on_profile_run=on_profile_run)
        merged = merge_runs(layer, work, 8 * k)
        assert merged[0] == list(range(7 * k))  # one request instead of three overlapping
        assert len(merged) < 5
        source.gate = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(fetch.run, layer, StartProfile(profile))
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.requests) == len(merged)  # all in flight at once
            assert warmed == []
            assert layer.prefetching_profile  # the blob server leaves warming to the runs
            source.gate.set()
        assert not layer.prefetching_profile
        assert all(layer.cache.has(b) for b in profile)
        assert sorted(warmed) == sorted(merged)  # each run handed on once it was on disk

    run(tmp_path, index, source, body)
    assert source.overlaps() == []


def test_prefetch_slots_go_to_the_waiter_due_first() -> None:
    slots = PrefetchSlots(1)
    granted: list[float] = []
    scopes: dict[float, trio.CancelScope] = {}

    async def waiter(due: float) -> None:
        with trio.CancelScope() as scope:
            scopes[due] = scope
            async with slots.held(slots.queue(due)):
                granted.append(due)

    async def main() -> None:
        async with trio.open_nursery() as n, slots.held(slots.queue(0.0)):
            for due in (5.0, 1.0, 3.0, 2.0, 0.5):
                n.start_soon(waiter, due)
            await trio.testing.wait_all_tasks_blocked()
            scopes[2.0].cancel()  # cancelled while waiting: leaves the queue
            await trio.testing.wait_all_tasks_blocked()
            scopes[0.5].cancel()  # cancelled as the slot is handed to it: passes it on
        assert granted == [1.0, 3.0, 5.0]
        with trio.fail_after(1):  # virtual time: the slot is free again, taken at once
            async with slots.held(slots.queue(9.0)):
                granted.append(9.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert granted == [1.0, 3.0, 5.0, 9.0]


def test_profile_runs_of_all_layers_go_in_the_order_they_were_first_read(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    """One container start read layer a's blocks at 0.0, 0.2 and 0.3 s and layer b's at 0.1 and
    0.9 s: with one slot, the runs go in that order across the layers (first come, first served
    would give b's second run the slot before a's later ones)."""
    _, index, _ = layer_files
    k = MiB // BLOCK_SIZE
    fetched: list[tuple[str, float]] = []

    class Spy(ReadPath):
        async def fetch_blocks(self, layer: Layer, blocks: list[int]) -> int:
            fetched.append((layer.name, read_at[layer.name][blocks[0] // (4 * k)]))
            await trio.lowlevel.checkpoint()
            return 0

    read_at = {"a": [0.0, 0.2, 0.3], "b": [0.1, 0.9]}
    rp = Spy(None, MemoryTier(0), POLICY)
    fetch = BackgroundFetch(rp, BackgroundFetchConfig(enabled=False, concurrency=1))

    async def main() -> None:
        slots = fetch.slots  # held by the test until every run has queued
        async with trio.open_nursery() as n, slots.held(slots.queue(0.0)):
            for name, times in read_at.items():
                layer = Layer(name, index, Recorder(layer_files[0]),
                              DiskCache(tmp_path / name).layer(index.blob_digest))
                blocks = [4 * k * i for i in range(len(times))]  # runs far apart
                n.start_soon(fetch.run, layer, StartProfile(blocks, [100 + t for t in times]))
            await trio.testing.wait_all_tasks_blocked()

    trio.run(main)
    assert fetched == [("a", 0.0), ("b", 0.1), ("a", 0.2), ("a", 0.3), ("b", 0.9)]


def test_adjacent_sequential_flights_continue_where_the_last_ended(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, _ = layer_files
    source = Recorder(blob)

    async def body(rp: ReadPath, layer: Layer) -> None:
        for b in range(6):  # one block at a time, each its own flight
            await rp.fetch_blocks(layer, [b])

    run(tmp_path, index, source, body)
    assert source.overlaps() == []
    # each request starts exactly where the previous one ended
    assert all(b[0] == a[1] for a, b in itertools.pairwise(source.requests))


# --- pacing and pausing -----------------------------------------------------------------------


def test_token_bucket_paces_runs_at_bytes_per_second() -> None:
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=4 * MiB)
    fetch = BackgroundFetch(ReadPath(None, MemoryTier(0), POLICY), options)
    times: list[float] = []

    async def main() -> None:
        for nbytes in (8 * MiB, 8 * MiB, 2 * MiB):
            await fetch._throttle(nbytes)
            times.append(trio.current_time())
        await trio.sleep(100)  # idle time is not banked beyond the present
        start = trio.current_time()
        await fetch._throttle(4 * MiB)
        times.append(trio.current_time() - start)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert times == [2.0, 4.0, 4.5, 1.0]


class PauseWatch(ReadPath):
    """A read path that signals each time background work asks whether it may go on."""

    def __init__(self) -> None:
        super().__init__(None, MemoryTier(0), POLICY)
        self.asked = trio.Event()

    async def until_no_waiters(self) -> None:
        self.asked.set()
        await super().until_no_waiters()


def test_pass_pauses_while_a_foreground_read_waits(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    blob, index, stream = layer_files
    file = FileSource(blob)
    far = len(stream) - 1000
    near_gate, far_gate = trio.Event(), trio.Event()
    requests: list[int] = []

    async def source(coff: int, n: int) -> bytes:
        requests.append(coff)
        # the pass's first run waits for near_gate, the foreground read's request for far_gate
        await (far_gate if len(requests) == 2 else near_gate).wait()
        return await file(coff, n)

    rp = PauseWatch()
    layer = Layer("l", index, source, DiskCache(tmp_path).layer(index.blob_digest))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            async with trio.open_nursery() as n:
                n.start_soon(BackgroundFetch(rp, UNLIMITED).run, layer, None)
                await trio.testing.wait_all_tasks_blocked()
                assert len(requests) == 1  # the pass's first run

                async def reader() -> None:
                    assert await rp.read(layer, far, 1000) == stream[far:]

                n.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                assert len(requests) == 2 and rp.waiting == 1
                rp.asked = trio.Event()
                near_gate.set()
                await rp.asked.wait()  # the first run is done; the pass asks to go on...
                await trio.testing.wait_all_tasks_blocked()
                assert len(requests) == 2  # ...and waits while the read waits
                far_gate.set()
            assert layer.cache.complete()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_pass_waits_for_a_quiet_spell_after_foreground_reads(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    """The sequential pass starts only once no foreground read arrived for `quiet_seconds`;
    a read served from disk counts too (a container's start). Virtual time."""
    blob, index, stream = layer_files
    source = Recorder(blob)
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=1 << 40, quiet_seconds=2.0)
    clock = trio.testing.MockClock()

    async def body(rp: ReadPath, layer: Layer) -> None:
        assert await rp.read(layer, 0, 1000) == stream[:1000]  # t=0, fetched
        first = len(source.requests)
        async with trio.open_nursery() as n:
            n.start_soon(BackgroundFetch(rp, options).run, layer, None)
            clock.jump(1.5)
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.requests) == first
            assert await rp.read(layer, 0, 10) == stream[:10]  # t=1.5, from disk
            clock.jump(1.9)  # t=3.4: 2 s after the first read, not after the second
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.requests) == first
            clock.jump(0.2)  # t=3.6: a quiet spell of 2.1 s
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.requests) > first  # the pass's first run
            n.cancel_scope.cancel()

    run(tmp_path, index, source, body, clock)
    assert source.overlaps() == []


def test_bytes_that_do_not_inflate_are_requested_again_once(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    """The one retry the read path keeps: bytes the source delivered but that do not inflate
    or verify (the registry client cannot see that) are dropped, held ones too, and fetched
    again; a source error is not retried here (the registry client has retried it)."""
    blob, index, stream = layer_files
    source = Recorder(blob)
    corrupt_next = True

    async def flaky(coff: int, n: int) -> bytes:
        nonlocal corrupt_next
        data = await source(coff, n)
        if corrupt_next:
            corrupt_next = False
            return bytes(b ^ 0x55 for b in data[:4096]) + data[4096:]
        return data

    rp = ReadPath(None, MemoryTier(0), ReadPolicy(timeout=1e6, attempts=2))
    layer = Layer("l", index, flaky, DiskCache(tmp_path).layer(index.blob_digest))
    uoff = 3 * MiB + 5

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            assert await rp.read(layer, uoff, 1000) == stream[uoff : uoff + 1000]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(source.requests) == 2 and source.requests[0] == source.requests[1]
    assert rp.stats.source_errors == 0


def test_warming_is_limited_to_held_blocks_and_off_while_a_profile_is_recorded(
    tmp_path: Path, layer_files: LayerFiles
) -> None:
    """What the blob server may warm of a lazy layer (`held_parts`): the blocks on disk, never
    one a READ would have to fetch; nothing while the layer records its start profile (the
    profile is what the container reads, not what warming adds)."""
    blob, index, stream = layer_files
    layer = Layer("l", index, FileSource(blob), DiskCache(tmp_path).layer(index.blob_digest))
    bs = layer.cache.block_size
    layer.cache.store(2 * bs, stream[2 * bs : 4 * bs])
    layer.cache.store(5 * bs, stream[5 * bs : 6 * bs])
    assert held_parts(layer, bs, 7 * bs) == [(2 * bs, 4 * bs), (5 * bs, 6 * bs)]
    assert held_parts(layer, 2 * bs + 10, 5 * bs + 20) == [(2 * bs + 10, 4 * bs),
                                                             (5 * bs, 5 * bs + 20)]
    assert held_parts(layer, 0, 2 * bs) == []
    layer.record_profile(3600)
    assert held_parts(layer, bs, 7 * bs) == []


def test_a_complete_layer_gets_no_background_run(tmp_path: Path, layer_files: LayerFiles) -> None:
    """A layer complete on disk (a node that ran the image before) is mounted over its cache
    file: its background run fetches nothing and hands no profile run on for warming."""
    blob, index, stream = layer_files
    source = Recorder(blob)
    bs = BLOCK_SIZE

    async def body(rp: ReadPath, layer: Layer) -> None:
        layer.cache.store(0, stream)
        assert layer.cache.complete()
        warmed: list[list[int]] = []
        fetch = BackgroundFetch(rp, UNLIMITED,
                                on_profile_run=lambda _layer, blocks: warmed.append(blocks))
        await fetch.run(layer, StartProfile(list(range(len(stream) // bs))))
        assert warmed == []

    run(tmp_path, index, source, body)
    assert source.requests == []
