"""The tiered read path against a real redis-server, without FUSE: the trio read path reaches
the RedisContentCache on an asyncio loop through the Bridge, exactly as in the daemon.

Covers: a second node's empty disk filled from the ContentCache with zero source bytes; a
corrupt value rejected (counted) and the source's bytes served and written back; a frozen
Redis skipped within the bound; background fetch completing a layer (start profile first, rate
limited, pausing for foreground reads).
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import trio
import trio.testing

from integration.harness.redis import RedisClusterServers, RedisServer
from snapshotter.bridge import AsyncioThread, Bridge
from snapshotter.cache import BLOCK_SIZE, DiskCache, MemoryTier
from snapshotter.config import BackgroundFetchConfig
from snapshotter.contentcache import ContentCache, block_key, open_content_cache
from snapshotter.index import LayerIndex
from snapshotter.readpath import FileSource, Layer, ReadPath, ReadPolicy
from snapshotter.remote.background import BackgroundFetch
from snapshotter.remote.profile import StartProfile
from tests.fs_layers import M, index_layer, pattern, write_layer

MiB = 1 << 20
BIG = 10 * MiB
T = TypeVar("T")


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LayerIndex, bytes]:
    d = tmp_path_factory.mktemp("cclayer")
    blob = write_layer(d / "blob.tgz", [
        M("small", data=b"hello"),
        M("odd", data=pattern(777_777, 3)),  # pushes the big file off block alignment
        M("big", data=pattern(BIG, 4)),
        M("tail", data=pattern(300_000, 5)),
    ])
    index = index_layer(blob, d / "index", checkpoint_spacing=512 * 1024)
    return blob, index, gzip.decompress(blob.read_bytes())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


class Node:
    """One node's read side: its own disk cache, the shared Redis, a counting source."""

    def __init__(
        self, root: Path, aio: AsyncioThread, url: str, blob: Path, cluster: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.aio = aio
        self.bridge = Bridge(aio.loop)
        self.content: ContentCache = self.on_loop(self._open(url, cluster, timeout))
        self.source = FileSource(blob)
        self.disk = DiskCache(root)
        policy = ReadPolicy(timeout=10, attempts=2)
        self.readpath = ReadPath(self.bridge, MemoryTier(), policy, self.content)

    @staticmethod
    async def _open(url: str, cluster: bool, timeout: float | None) -> ContentCache:
        """``timeout``: per-operation bound (default: the product's); a test about what is
        shared, not about bounds, raises it so a loaded machine cannot open the breaker."""
        options: dict[str, object] = {"url": url, "cooldown_seconds": 1.0, "cluster": cluster}
        if timeout is not None:
            options["timeout_seconds"] = options["connect_timeout_seconds"] = timeout
        return open_content_cache(options)

    def on_loop(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.aio.loop).result(30)  # type: ignore[arg-type]

    def layer(self, index: LayerIndex) -> Layer:
        return Layer("l", index, self.source, self.disk.layer(index.blob_digest))

    def run(self, body: Callable[[ReadPath], Awaitable[None]]) -> None:
        async def main() -> None:
            self.bridge.bind_trio()
            async with trio.open_nursery() as nursery:
                self.readpath.bind(nursery)
                await body(self.readpath)
                nursery.cancel_scope.cancel()

        trio.run(main)

    def close(self) -> None:
        self.on_loop(self.content.close())
        self.disk.close()


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer,
          layer_files: tuple[Path, LayerIndex, bytes]) -> Iterator[Callable[[str], Node]]:
    aio = AsyncioThread()
    made: list[Node] = []

    def make(name: str) -> Node:
        node = Node(tmp_path / name, aio, redis_server.url(), layer_files[0])
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.close()
        aio.close()


def test_second_node_reads_from_a_redis_cluster(
    tmp_path: Path, layer_files: tuple[Path, LayerIndex, bytes]
) -> None:
    blob, index, stream = layer_files
    aio = AsyncioThread()
    cluster = RedisClusterServers()
    cluster.start()
    made: list[Node] = []
    try:
        for name in ("a", "b"):
            made.append(Node(tmp_path / name, aio, cluster.url(), blob, cluster=True,
                             timeout=10.0))
        a, b = made
        a.run(_read_all(a.layer(index), stream))
        assert a.on_loop(a.content.flush(10))
        b.run(_read_all(b.layer(index), stream))
        assert a.content.stats.puts_dropped_open == 0  # nothing a's breaker dropped
        assert b.source.bytes_read == 0 and b.readpath.stats.content_hits > 0
    finally:
        for node in made:
            node.close()
        aio.close()
        cluster.close()


def _read_all(layer: Layer, stream: bytes) -> Callable[[ReadPath], Awaitable[None]]:
    async def body(rp: ReadPath) -> None:
        for uoff in range(0, len(stream), 300_000):
            n = min(300_000, len(stream) - uoff)
            assert await rp.read(layer, uoff, n) == stream[uoff : uoff + n]

    return body


def test_second_node_reads_from_the_content_cache_only(
    nodes: Callable[[str], Node], layer_files: tuple[Path, LayerIndex, bytes]
) -> None:
    _, index, stream = layer_files
    a = nodes("a")
    a.run(_read_all(a.layer(index), stream))
    assert a.source.bytes_read > 0
    assert a.on_loop(a.content.flush(10))

    b = nodes("b")
    layer = b.layer(index)
    b.run(_read_all(layer, stream))
    assert b.source.bytes_read == 0
    assert b.readpath.stats.content_hits > 0 and b.readpath.stats.verify_failures == 0
    assert layer.cache.complete()


def test_a_corrupt_value_is_rejected_and_replaced(
    nodes: Callable[[str], Node], layer_files: tuple[Path, LayerIndex, bytes],
    redis_server: RedisServer,
) -> None:
    _, index, stream = layer_files
    a = nodes("a")
    a.run(_read_all(a.layer(index), stream))
    assert a.on_loop(a.content.flush(10))
    big = index.entry(index.lookup("big") or 0)
    block = (big.uoff + 3 * MiB) // BLOCK_SIZE
    key = block_key(index.blob_digest, block)
    client = redis.Redis(port=redis_server.port)
    good = client.get(key)
    assert good is not None and len(good) == BLOCK_SIZE
    client.set(key, good[:100] + b"X" + good[101:])

    b = nodes("b")
    layer = b.layer(index)

    async def body(rp: ReadPath) -> None:
        uoff = block * BLOCK_SIZE + 4096
        assert await rp.read(layer, uoff, 8192) == stream[uoff : uoff + 8192]

    b.run(body)
    assert b.readpath.stats.verify_failures == 1
    assert b.source.bytes_read > 0
    assert b.on_loop(b.content.flush(10))
    assert client.get(key) == good  # the registry's bytes were written back


def test_a_frozen_redis_is_skipped_within_the_bound(
    nodes: Callable[[str], Node], layer_files: tuple[Path, LayerIndex, bytes],
    redis_server: RedisServer,
) -> None:
    _, index, stream = layer_files
    b = nodes("b")
    layer = b.layer(index)
    redis_server.pause()
    try:
        b.run(_read_all(layer, stream))
        health = b.content.health()
    finally:
        redis_server.resume()
    assert b.source.bytes_read > 0
    # a handful of bounded timeouts open the breaker, then Redis is not even asked
    assert health.state == "open" and health.stats.timeouts >= 1 and health.stats.skipped > 0


def test_background_fetch_completes_a_layer_profile_first(
    nodes: Callable[[str], Node], layer_files: tuple[Path, LayerIndex, bytes],
) -> None:
    _, index, stream = layer_files
    node = nodes("bg")
    layer = node.layer(index)
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=8 * MiB, concurrency=1)
    nblocks = -(-len(stream) // BLOCK_SIZE)
    profile = [nblocks - 1, 2]  # the recording container read the last block first
    order: list[int] = []
    original = node.readpath.fetch_blocks

    async def spy(lay: Layer, blocks: list[int]) -> int:
        order.extend(blocks)
        return await original(lay, blocks)

    node.readpath.fetch_blocks = spy  # type: ignore[method-assign]

    async def body(rp: ReadPath) -> None:
        await BackgroundFetch(rp, options).run(layer, StartProfile(profile))

    node.run(body)
    assert layer.cache.complete()
    assert order[:2] == profile  # in the order the profile was recorded in
    assert node.source.bytes_read > 0


def test_background_fetch_waits_while_foreground_reads_wait(
    nodes: Callable[[str], Node], layer_files: tuple[Path, LayerIndex, bytes],
) -> None:
    _, index, _ = layer_files
    node = nodes("pause")
    layer = node.layer(index)
    options = BackgroundFetchConfig(enabled=True, bytes_per_second=64 * MiB, concurrency=2)

    async def body(rp: ReadPath) -> None:
        async with trio.open_nursery() as nursery:
            with rp.foreground_wait():  # as while a FUSE read waits for its fetch
                nursery.start_soon(BackgroundFetch(rp, options).run, layer, None)
                await trio.testing.wait_all_tasks_blocked()
                assert node.source.calls == 0 and layer.cache.present_blocks() == 0

    node.run(body)
    assert layer.cache.complete()
