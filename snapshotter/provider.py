"""The remote layer provider: what turns a Prepare with remote labels into a lazy lowerdir.

For a layer digest it finds a clip index (the local index store first, else it streams the blob
from the registry once, building the index while every decompressed byte goes into the disk
cache), attaches the layer to the one FUSE mount with the registry as the source of missing
bytes, and returns the layer's directory in the mount. The snapshots layer then commits the
snapshot and answers containerd ALREADY_EXISTS.

Layers are resolved once per digest however many Prepares ask (single flight), and the
``image-layers`` label lets later layers of the same image start resolving while containerd
is still preparing earlier ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.bridge import Bridge
from snapshotter.cache import DiskCache
from snapshotter.config import Config
from snapshotter.errors import AlreadyExists, ClipError, InvalidArgument, Unavailable
from snapshotter.fs.layerfs import LayerFS, is_mounted
from snapshotter.index import IndexBuildOptions, IndexFormatError, LayerIndex, build_index
from snapshotter.readpath import ReadPolicy
from snapshotter.registry import RegistryClient, RegistryHostConfig
from snapshotter.registry.reference import SHA256_DIGEST
from snapshotter.service.status import LayerStatus, ProviderStatus
from snapshotter.snapshots.remote import RemoteLayer

if TYPE_CHECKING:
    from snapshotter.service.daemon import Daemon

log = logging.getLogger(__name__)


def layer_id(digest: str) -> str:
    """The layer's directory name under the mount: short, so 128 lowerdirs fit in a page."""
    return digest.removeprefix("sha256:")[:16]


def _check_digest(digest: str) -> str:
    if not SHA256_DIGEST.match(digest):
        raise InvalidArgument(f"layer digest {digest!r} is not a sha256 digest")
    return digest


class IndexStore:
    """``<root>/indexes/<hex>``: one index file per layer digest.

    Files are written to a temporary name and renamed, so a crash never leaves a partial index
    under a digest's name; an operator may seed the store by copying index files in.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, digest: str) -> Path:
        return self.directory / digest.removeprefix("sha256:")

    def get(self, digest: str) -> LayerIndex | None:
        """The stored index of ``digest``; an unreadable or foreign file is ignored (logged)."""
        path = self.path(digest)
        if not path.exists():
            return None
        try:
            index = LayerIndex.open(path)
        except (IndexFormatError, OSError) as exc:
            log.warning("ignoring index %s: %s", path, exc)
            return None
        if index.blob_digest != digest:
            log.warning("ignoring index %s: built from %s", path, index.blob_digest)
            return None
        return index

    def temporary(self, digest: str) -> Path:
        return self.directory / f".tmp-{digest.removeprefix('sha256:')}-{os.getpid()}"

    def commit(self, temporary: Path, digest: str) -> LayerIndex:
        path = self.path(digest)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return LayerIndex.open(path)


class _StreamReader(io.RawIOBase):
    """A blocking file object over an async byte iterator running on another thread's loop.

    The index builder runs in a worker thread and reads the blob as a plain stream; each read
    pulls the next chunk from the registry's async iterator on the daemon's asyncio loop, which
    also gives natural back-pressure (nothing is buffered beyond one chunk).
    """

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._chunks = chunks
        self._loop = loop
        self._pending = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._eof:
            future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            chunk = future.result()
            if chunk is None:
                self._eof = True
            else:
                self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    async def _next(self) -> bytes | None:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None


class RemoteLayerProvider:
    """LayerProvider (for the snapshots layer) and BackgroundService (for the daemon)."""

    name = "remote-layers"

    def __init__(self, config: Config) -> None:
        self.config = config
        root = Path(config.daemon.root)
        self.mountpoint = root / "mnt"
        self.indexes = IndexStore(root / "indexes")
        self.cache = DiskCache(root)
        self.registry = RegistryClient(
            {
                host: RegistryHostConfig(plain_http=reg.plain_http, mirrors=list(reg.mirrors))
                for host, reg in config.registry.items()
            }
        )
        self.fs: LayerFS | None = None
        self._resolving: dict[str, asyncio.Task[LayerIndex]] = {}
        self._users: dict[str, int] = {}
        self._refs: dict[str, str] = {}  # digest -> image ref it is read from (for status)

    # BackgroundService --------------------------------------------------------------------

    async def start(self, daemon: Daemon | None = None) -> None:
        self.indexes.directory.mkdir(parents=True, exist_ok=True)
        bridge = Bridge(asyncio.get_running_loop())
        policy = ReadPolicy(timeout=self.config.fuse.read_timeout_seconds)
        self.fs = LayerFS(self.cache, bridge, policy)
        await asyncio.to_thread(self.fs.start, self.mountpoint)

    async def stop(self) -> None:
        for task in self._resolving.values():
            task.cancel()
        for task in self._resolving.values():
            with contextlib.suppress(BaseException):
                await task
        self._resolving.clear()
        if self.fs is not None:
            await asyncio.to_thread(self.fs.stop)
            self.fs = None
        await self.registry.close()
        self.cache.close()

    # LayerProvider ------------------------------------------------------------------------

    async def prepare(self, layer: RemoteLayer) -> str:
        digest = _check_digest(layer.digest)
        for later in layer.layers:
            if later != digest and SHA256_DIGEST.match(later):
                self._resolve(later, layer.image_ref)
        index = await self._resolve(digest, layer.image_ref)
        if not self.cache.is_complete(digest, index.uncompressed_size):
            await self._check_reachable(layer)
        return self._attach(layer, index)

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        digest = _check_digest(layer.digest)
        index = self.indexes.get(digest)
        if index is None:
            index = await self._resolve(digest, layer.image_ref)
        return self._attach(layer, index)

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        users = self._users.get(layer.digest, 0) - 1
        if users > 0:
            self._users[layer.digest] = users
            return
        self._users.pop(layer.digest, None)
        self._refs.pop(layer.digest, None)
        if self.fs is not None:
            with contextlib.suppress(ClipError):
                self.fs.detach(layer_id(layer.digest))

    # status (read-only) -------------------------------------------------------------------

    def status(self) -> ProviderStatus:
        """What `clip status` reports: the FUSE mount and every attached layer's cache fill."""
        fs = self.fs
        attached = sorted(fs.ops.by_name.items()) if fs is not None else []
        layers = []
        for name, entry in attached:
            layer, cache = entry.layer, entry.layer.cache
            layers.append(
                LayerStatus(
                    digest=layer.digest,
                    layer_id=name,
                    image_ref=self._refs.get(layer.digest, ""),
                    cached_bytes=min(cache.present_blocks() * cache.block_size, layer.size),
                    uncompressed_size=layer.size,
                    complete=cache.size == layer.size and cache.complete(),
                )
            )
        return ProviderStatus(
            fuse_mounted=fs is not None and fs.running and is_mounted(self.mountpoint),
            mountpoint=str(self.mountpoint),
            cache_dir=str(self.cache.directory),
            layers=layers,
        )

    # internals ----------------------------------------------------------------------------

    def _attach(self, layer: RemoteLayer, index: LayerIndex) -> str:
        if self.fs is None:
            raise Unavailable(f"layer {layer.digest}: the FUSE mount is not running")
        name = layer_id(layer.digest)
        ref, digest = layer.image_ref, layer.digest

        async def source(coff: int, length: int) -> bytes:
            return await self.registry.read_range(ref, digest, coff, length)

        try:
            path = self.fs.attach(name, index, source)
        except AlreadyExists:
            path = self.fs.path(name)
        self._users[digest] = self._users.get(digest, 0) + 1
        self._refs[digest] = ref
        return str(path)

    def _resolve(self, digest: str, image_ref: str) -> asyncio.Task[LayerIndex]:
        """The (shared) task that finds or builds the index of ``digest``."""
        task = self._resolving.get(digest)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.create_task(self._find_or_build(digest, image_ref))
            task.add_done_callback(_consume_exception)
            self._resolving[digest] = task
        return task

    async def _find_or_build(self, digest: str, image_ref: str) -> LayerIndex:
        index = self.indexes.get(digest)
        if index is not None:
            return index
        return await self._build(digest, image_ref)

    async def _build(self, digest: str, image_ref: str) -> LayerIndex:
        """Stream the blob once: build its index and fill the disk cache in the same pass."""
        log.info("building index", extra={"fields": {"layer": digest, "image": image_ref}})
        loop = asyncio.get_running_loop()
        cache = self.cache.layer(digest)
        writer = cache.writer()
        temporary = self.indexes.temporary(digest)
        chunks = self.registry.open_blob(image_ref, digest)
        reader = io.BufferedReader(_StreamReader(chunks, loop), buffer_size=1 << 20)
        try:
            result = await asyncio.to_thread(
                build_index, reader, temporary, IndexBuildOptions(), writer.write
            )
            writer.finish(result.uncompressed_size)
            return self.indexes.commit(temporary, digest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            self.cache.remove(digest)
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _check_reachable(self, layer: RemoteLayer) -> None:
        """A layer not fully on disk needs its registry: fail the Prepare now if it is gone."""
        try:
            present = await self.registry.blob_exists(layer.image_ref, layer.digest)
        except ClipError as exc:
            raise Unavailable(
                f"layer {layer.digest} of {layer.image_ref} is not fully cached and its "
                f"registry is unreachable: {exc}"
            ) from None
        if not present:
            raise Unavailable(
                f"layer {layer.digest} is not fully cached and {layer.image_ref} no longer has it"
            )


def _consume_exception(task: asyncio.Task[LayerIndex]) -> None:
    """Early-started layers may fail unobserved; their error is re-raised to the Prepare."""
    if not task.cancelled():
        task.exception()
