"""The remote-layer lifecycle of RemoteLayerProvider against a real FUSE mount and disk cache,
with a fake registry whose blob streams and range reads the tests gate with events: prepare,
concurrent prepares, cancelled prepares, a cancelled shared build, release during a fetch,
re-prepare, restore, eviction, inflate bounds and a full index filesystem."""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import io
import itertools
import logging
import os
import subprocess
import tarfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fs_layers import pattern

from snapshotter.cache import DiskCache
from snapshotter.config import (
    BackgroundFetchConfig,
    Config,
    DaemonConfig,
    DiskCacheConfig,
    LayersConfig,
)
from snapshotter.errors import FailedPrecondition, NotFound, ResourceExhausted
from snapshotter.index import LayerIndex, build_index
from snapshotter.remote import RemoteLayerProvider
from snapshotter.snapshots.remote import RemoteLayer

IMAGE = "registry.test/app:1"
MiB = 1 << 20


class FakeRegistry:
    """Blobs by digest; `blob_gate`/`range_gate` hold streams and range reads until set."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.opened = 0
        self.ranges = 0
        #: Every range read (start, end), in order.
        self.spans: list[tuple[int, int]] = []
        self.streaming = asyncio.Event()
        self.range_started = asyncio.Event()
        self.blob_gate = asyncio.Event()
        self.range_gate = asyncio.Event()
        self.blob_gate.set()
        self.range_gate.set()

    async def resolve(self, ref: str) -> Any:
        raise NotFound(f"{ref}: no manifest in the fake registry")

    async def open_blob(self, ref: str, digest: str, **_: Any) -> AsyncIterator[bytes]:
        self.opened += 1
        self.streaming.set()
        await self.blob_gate.wait()
        data = self.blobs[digest]
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    def deadline(self, seconds: float | None = None) -> float:
        return asyncio.get_running_loop().time() + (seconds or 12.0)

    async def read_range(
        self, ref: str, digest: str, coff: int, length: int, *, deadline: float | None = None
    ) -> bytes:
        self.ranges += 1
        self.spans.append((coff, coff + length))
        self.range_started.set()
        await self.range_gate.wait()
        return self.blobs[digest][coff : coff + length]

    async def blob_exists(self, ref: str, digest: str, *, deadline: float | None = None) -> bool:
        return digest in self.blobs

    async def close(self) -> None:
        return None


def make_blob(files: dict[str, bytes], level: int = 1) -> tuple[str, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(raw.getvalue(), compresslevel=level, mtime=0)
    return "sha256:" + hashlib.sha256(blob).hexdigest(), blob


@pytest.fixture(scope="module")
def blobs() -> dict[str, tuple[str, bytes, bytes]]:
    """name -> (digest, blob, content of its file `f`)."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        content = pattern(3 * MiB, seed)
        digest, blob = make_blob({"f": content})
        out[name] = (digest, blob, content)
    return out


def config(root: Path, **sections: Any) -> Config:
    sections.setdefault("background_fetch", BackgroundFetchConfig(enabled=False))
    return Config(daemon=DaemonConfig(root=str(root), address=str(root / "clip.sock")), **sections)


def layer(digest: str, key: str = "k") -> RemoteLayer:
    return RemoteLayer(key, "", "sha256:" + "c" * 64, IMAGE, digest)


Scenario = Callable[[RemoteLayerProvider, FakeRegistry], Awaitable[None]]


def run(root: Path, blobs: dict[str, bytes], body: Scenario, **sections: Any) -> None:
    async def main() -> None:
        fake = FakeRegistry(blobs)
        provider = RemoteLayerProvider(config(root, **sections), registry=fake)  # type: ignore[arg-type]
        await provider.start()
        try:
            await body(provider, fake)
        finally:
            await provider.stop()

    asyncio.run(main())


async def read(path: str) -> bytes:
    return await asyncio.to_thread((Path(path) / "f").read_bytes)


def test_concurrent_prepares_share_one_build(tmp_path: Path, blobs: Any) -> None:
    digest, blob, content = blobs["a"]

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        first, second = await asyncio.gather(
            provider.prepare(layer(digest)), provider.prepare(layer(digest, "k2"))
        )
        assert first == second == str(provider.mountpoint / provider.layer_name(digest))
        assert fake.opened == 1 and await read(first) == content
        assert fake.ranges == 0  # the build filled the disk cache
        index = provider.index_of(digest)
        assert index is not None and index.blob_digest == digest
        assert provider.is_complete(digest)
        assert provider.cache_file(digest).stat().st_size == index.uncompressed_size
        assert [entry.digest for entry in provider.status().layers] == [digest]

    run(tmp_path / "root", {digest: blob}, body)


def test_cancelled_prepare_does_not_break_later_prepares(tmp_path: Path, blobs: Any) -> None:
    digest, blob, content = blobs["a"]

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        fake.blob_gate.clear()
        gone = asyncio.create_task(provider.prepare(layer(digest)))
        await fake.streaming.wait()
        gone.cancel()  # containerd's client went away
        with pytest.raises(asyncio.CancelledError):
            await gone
        fake.blob_gate.set()
        path = await provider.prepare(layer(digest))
        assert await read(path) == content
        assert fake.opened == 1  # the shared build went on

    run(tmp_path / "root", {digest: blob}, body)


def test_a_cancelled_shared_build_is_retried_not_reported(tmp_path: Path, blobs: Any) -> None:
    digest, blob, content = blobs["a"]

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        fake.blob_gate.clear()
        waiting = asyncio.create_task(provider.prepare(layer(digest)))
        await fake.streaming.wait()
        fake.streaming.clear()
        provider.resolver.start(digest, IMAGE, "").cancel()
        await fake.streaming.wait()  # the waiter started a new resolution
        fake.blob_gate.set()
        assert await read(await waiting) == content
        assert fake.opened == 2

    run(tmp_path / "root", {digest: blob}, body)


def seed_index(root: Path, digest: str, blob: bytes) -> None:
    indexes = root / "indexes"
    indexes.mkdir(parents=True, exist_ok=True)
    build_index(io.BytesIO(blob), indexes / digest.removeprefix("sha256:"))


def test_release_during_a_fetch_cancels_it_before_the_cache_closes(
    tmp_path: Path, blobs: Any
) -> None:
    digest, blob, _ = blobs["a"]
    root = tmp_path / "root"
    seed_index(root, digest, blob)
    outcome: list[BaseException | bytes] = []

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        fake.range_gate.clear()  # the registry hangs
        path = await provider.prepare(layer(digest))

        async def reader() -> None:
            try:
                outcome.append(await read(path))
            except OSError as exc:
                outcome.append(exc)

        reading = asyncio.create_task(reader())
        await fake.range_started.wait()
        await provider.release(layer(digest), path)
        assert not provider.status().layers
        await reading
        fake.range_gate.set()  # the registry answers now: nobody may write it anywhere

    run(root, {digest: blob}, body)
    [failed] = outcome
    assert isinstance(failed, OSError) and failed.errno in (errno.EIO, errno.ESTALE)
    cache = DiskCache(root).layer(digest)
    assert cache.present_blocks() == 0
    cache.close()


def test_reprepare_after_release_and_restore_after_restart(tmp_path: Path, blobs: Any) -> None:
    digest, blob, content = blobs["a"]
    root = tmp_path / "root"

    async def first(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        path = await provider.prepare(layer(digest))
        await provider.release(layer(digest), path)
        again = await provider.prepare(layer(digest))
        assert again == path and await read(again) == content
        assert fake.opened == 1  # the index and the bytes stayed on the node

    async def restarted(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        path = await provider.restore(layer(digest), "")
        assert await read(path) == content
        assert fake.opened == 0 and fake.ranges == 0

    run(root, {digest: blob}, first)
    run(root, {digest: blob}, restarted)


def test_released_layers_are_evicted_for_new_ones(tmp_path: Path, blobs: Any) -> None:
    (da, ba, _), (db, bb, cb) = blobs["a"], blobs["b"]
    root = tmp_path / "root"

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        path = await provider.prepare(layer(da))
        assert provider.is_complete(da)
        await provider.release(layer(da), path)
        assert await read(await provider.prepare(layer(db))) == cb
        assert not provider.cache_file(da).exists()
        assert provider.is_complete(db)

    run(root, {da: ba, db: bb}, body, disk_cache=DiskCacheConfig(limit_bytes=5 * MiB))


def test_a_layer_in_use_is_never_evicted(tmp_path: Path, blobs: Any) -> None:
    (da, ba, ca), (db, bb, cb) = blobs["a"], blobs["b"]

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        pa = await provider.prepare(layer(da))
        pb = await provider.prepare(layer(db))  # no room to cache it: served lazily
        assert provider.is_complete(da) and not provider.is_complete(db)
        assert await read(pa) == ca and await read(pb) == cb

    run(tmp_path / "root", {da: ba, db: bb}, body,
        disk_cache=DiskCacheConfig(limit_bytes=5 * MiB))


@pytest.mark.parametrize("bound", ["size", "ratio"])
def test_hostile_sizes_are_refused_while_streaming(
    tmp_path: Path, bound: str, caplog: pytest.LogCaptureFixture
) -> None:
    if bound == "size":
        digest, blob = make_blob({"f": pattern(3 * MiB, 5)})
        layers = LayersConfig(max_layer_bytes=2 * MiB)
        why = "max_layer_bytes"
    else:
        digest, blob = make_blob({"zeros": bytes(80 * MiB)}, level=6)  # ~1000x
        layers = LayersConfig()
        why = "max_compression_ratio"

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        with pytest.raises(FailedPrecondition) as refused:
            await provider.prepare(layer(digest))
        message = str(refused.value)
        assert digest in message and IMAGE in message and why in message
        assert "\n" not in message
        assert not provider.cache_file(digest).parent.exists()
        assert provider.index_of(digest) is None

    with caplog.at_level(logging.WARNING, logger="snapshotter.remote.provider"):
        run(tmp_path / "root", {digest: blob}, body, layers=layers)
    assert any(digest in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.fixture
def full_indexes(tmp_path: Path) -> Iterator[Path]:
    """`<root>/indexes` on a real, full 64 KiB tmpfs."""
    indexes = tmp_path / "root" / "indexes"
    indexes.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(indexes)], check=True)
    try:
        fd = os.open(indexes / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, bytes(4096))
        finally:
            os.close(fd)
        yield indexes
    finally:
        subprocess.run(["umount", str(indexes)], check=True)


def test_no_room_for_the_index_is_resource_exhausted(
    tmp_path: Path, blobs: Any, full_indexes: Path
) -> None:
    digest, blob, _ = blobs["a"]

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        with pytest.raises(ResourceExhausted) as full:
            await provider.prepare(layer(digest))
        assert digest in str(full.value) and IMAGE in str(full.value)
        assert ResourceExhausted.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not provider.cache_file(digest).parent.exists()

    run(tmp_path / "root", {digest: blob}, body)


def test_background_fetch_completes_a_lazily_attached_layer(tmp_path: Path, blobs: Any) -> None:
    digest, blob, content = blobs["a"]
    root = tmp_path / "root"
    seed_index(root, digest, blob)  # indexed elsewhere: nothing of it on this node yet

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        assert provider.background is not None
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        provider.background.on_complete = lambda _: loop.call_soon_threadsafe(done.set)
        path = await provider.prepare(layer(digest))
        await done.wait()  # the trio task the prepare started filled the whole layer
        assert provider.is_complete(digest) and fake.ranges > 0
        ranges = fake.ranges
        assert await read(path) == content
        assert fake.ranges == ranges  # served from disk
        await provider.release(layer(digest), path)

    run(root, {digest: blob}, body, background_fetch=BackgroundFetchConfig(enabled=True))


def test_background_fetch_with_reads_requests_each_compressed_byte_once(tmp_path: Path) -> None:
    """Through the provider, the bridge and the FUSE mount: a whole-file read while the
    background pass runs; no two range reads overlap, and together they are the blob (from
    the first checkpoint, after the gzip header, to its end)."""
    content = pattern(24 * MiB, 9)
    digest, blob = make_blob({"f": content})
    root = tmp_path / "root"
    seed_index(root, digest, blob)
    index = LayerIndex.open(root / "indexes" / digest.removeprefix("sha256:"))

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        assert provider.background is not None
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        provider.background.on_complete = lambda _: loop.call_soon_threadsafe(done.set)
        path = await provider.prepare(layer(digest))
        assert await read(path) == content
        await done.wait()
        await provider.release(layer(digest), path)
        spans = sorted(fake.spans)
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), spans
        assert sum(e - s for s, e in spans) == len(blob) - index.checkpoint(0).coff

    run(root, {digest: blob}, body, background_fetch=BackgroundFetchConfig(enabled=True))


def test_release_cancels_a_running_background_fetch(tmp_path: Path, blobs: Any) -> None:
    digest, blob, _ = blobs["a"]
    root = tmp_path / "root"
    seed_index(root, digest, blob)

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        fake.range_gate.clear()
        path = await provider.prepare(layer(digest))
        await fake.range_started.wait()  # the background fetch waits on the registry
        await provider.release(layer(digest), path)  # returns: the fetch was cancelled
        fake.range_gate.set()

    run(root, {digest: blob}, body, background_fetch=BackgroundFetchConfig(enabled=True))
    cache = DiskCache(root).layer(digest)
    assert cache.present_blocks() == 0
    cache.close()


def test_a_prepare_cancelled_while_attaching_leaves_no_user_behind(
    tmp_path: Path, blobs: Any
) -> None:
    digest, blob, _ = blobs["a"]
    root = tmp_path / "root"
    seed_index(root, digest, blob)

    async def body(provider: RemoteLayerProvider, fake: FakeRegistry) -> None:
        assert provider.fs is not None
        attaching, proceed = threading.Event(), threading.Event()
        original = provider.fs.attach

        def gated(*args: Any) -> Path:
            attaching.set()
            proceed.wait()
            return original(*args)

        provider.fs.attach = gated  # type: ignore[method-assign]
        gone = asyncio.create_task(provider.prepare(layer(digest)))
        await asyncio.to_thread(attaching.wait)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        proceed.set()
        provider.fs.attach = original  # type: ignore[method-assign]
        path = await provider.prepare(layer(digest))  # waits for the attach lock
        assert (await asyncio.to_thread(os.listdir, path)) == ["f"]
        await provider.release(layer(digest), path)  # the one real user goes...
        while provider.status().layers:  # ...and the cancelled one is undone (its own task)
            await asyncio.sleep(0)
        assert not provider.fs.ops.by_name

    run(root, {digest: blob}, body)
