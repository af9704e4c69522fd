"""The remote layer provider: what turns a Prepare with remote labels into a lazy lowerdir.

For a layer digest it finds a clip index — the node's index store, then the cluster's
ContentCache, then the index artifact attached to the image in its registry (`clip index
push`), and only then by streaming the blob from the registry once, building the index while
every decompressed byte goes into the disk cache. A node that built an index shares it: the
index (and later the layer's start profile) goes into the ContentCache, and since the whole
layer is then on disk, its blocks are uploaded there in the background (bounded, skipping
blocks already stored), so other nodes need no registry bytes at all for that layer.

It then attaches the layer to the one FUSE mount, with the registry as the last tier of the
read path, and starts the background fetch (start-profile blocks first, then the rest at low
priority). The snapshots layer commits the snapshot and answers containerd ALREADY_EXISTS.

Layers are resolved once per digest however many Prepares ask (single flight), and the
``image-layers`` label lets later layers of the same image start resolving while containerd
is still preparing earlier ones. Caches of layers no snapshot uses are evicted, least recently
used first, when the disk cache is over `[disk_cache] limit_bytes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.bridge import Bridge
from snapshotter.cache import DiskCache, MemoryTier
from snapshotter.config import Config
from snapshotter.contentcache import NoContentCache, open_content_cache
from snapshotter.errors import AlreadyExists, ClipError, InvalidArgument, Unavailable
from snapshotter.fs.layerfs import LayerFS, is_mounted
from snapshotter.index import LayerIndex
from snapshotter.prefetch import BackgroundFetcher, decode_profile, encode_profile, profile_digest
from snapshotter.publish import Artifact, build_from_registry, find_artifact, index_of_blob
from snapshotter.readpath import Layer, ReadPolicy
from snapshotter.registry import RegistryClient, hosts_from_config
from snapshotter.registry.auth import Keychain
from snapshotter.registry.reference import SHA256_DIGEST
from snapshotter.service.status import LayerStatus, ProviderStatus, tier_health
from snapshotter.snapshots.remote import CRI_PREFIX, RemoteLayer
from snapshotter.telemetry import TELEMETRY

if TYPE_CHECKING:
    from snapshotter.service.daemon import Daemon

log = logging.getLogger(__name__)

MANIFEST_LABEL = CRI_PREFIX + "manifest-digest"
#: Seconds between disk cache limit checks (also checked after every index build).
EVICT_PERIOD = 30.0


def layer_id(digest: str) -> str:
    """The layer's directory name under the mount: short, so 128 lowerdirs fit in a page."""
    return digest.removeprefix("sha256:")[:16]


def _check_digest(digest: str) -> str:
    if not SHA256_DIGEST.match(digest):
        raise InvalidArgument(f"layer digest {digest!r} is not a sha256 digest")
    return digest


class IndexStore:
    """``<root>/indexes/<hex>``: one index file per layer digest (and ``<hex>.profile``, the
    layer's start profile, when known).

    Files are written to a temporary name and renamed, so a crash never leaves a partial index
    under a digest's name; an operator may seed the store by copying index files in.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, digest: str) -> Path:
        return self.directory / digest.removeprefix("sha256:")

    def profile_path(self, digest: str) -> Path:
        return self.directory / (digest.removeprefix("sha256:") + ".profile")

    def get(self, digest: str) -> LayerIndex | None:
        """The stored index of ``digest``; an unreadable or foreign file is ignored (logged)."""
        path = self.path(digest)
        if not path.exists():
            return None
        return index_of_blob(lambda: LayerIndex.open(path), digest, f"stored index {path}")

    def temporary(self, digest: str) -> Path:
        return self.directory / f".tmp-{digest.removeprefix('sha256:')}-{os.getpid()}"

    def commit(self, temporary: Path, digest: str) -> LayerIndex:
        path = self.path(digest)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return LayerIndex.open(path)

    def put(self, digest: str, data: bytes) -> LayerIndex:
        """Store index bytes fetched from elsewhere (the caller checked them)."""
        temporary = self.temporary(digest)
        temporary.write_bytes(data)
        try:
            return self.commit(temporary, digest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def put_profile(self, digest: str, data: bytes) -> None:
        temporary = self.temporary(digest).with_suffix(".profile")
        temporary.write_bytes(data)
        os.replace(temporary, self.profile_path(digest))

    def profile(self, digest: str, block_size: int) -> list[int] | None:
        try:
            data = self.profile_path(digest).read_bytes()
        except OSError:
            return None
        return decode_profile(data, digest, block_size)


class RemoteLayerProvider:
    """LayerProvider (for the snapshots layer) and BackgroundService (for the daemon)."""

    name = "remote-layers"

    def __init__(self, config: Config, keychain: Keychain | None = None) -> None:
        """``keychain``: an image's own credentials, asked before the configured ones (the
        pull secrets `clip serve`'s CRI image service keeps, see snapshotter/cri/)."""
        self.config = config
        root = Path(config.daemon.root)
        self.mountpoint = root / "mnt"
        self.indexes = IndexStore(root / "indexes")
        self.cache = DiskCache(root, directory=config.cache_dir())
        self.content = open_content_cache(config.content_cache)
        self.registry = RegistryClient(hosts_from_config(config.registry), keychain=keychain)
        self.fs: LayerFS | None = None
        self.fetcher: BackgroundFetcher | None = None
        self._resolving: dict[str, asyncio.Task[LayerIndex]] = {}
        self._artifacts: dict[str, asyncio.Task[Artifact | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._users: dict[str, int] = {}
        self._refs: dict[str, str] = {}  # digest -> image ref it is read from (for status)

    # BackgroundService --------------------------------------------------------------------

    async def start(self, daemon: Daemon | None = None) -> None:
        self.indexes.directory.mkdir(parents=True, exist_ok=True)
        bridge = Bridge(asyncio.get_running_loop())
        policy = ReadPolicy(timeout=self.config.fuse.read_timeout_seconds)
        memory = MemoryTier(self.config.memory_cache.limit_bytes)
        self.fs = LayerFS(self.cache, bridge, policy, memory)
        self.fs.readpath.content = self.content
        self.fetcher = BackgroundFetcher(
            self.fs.readpath, bridge, self.config.background_fetch, self._fetched
        )
        await asyncio.to_thread(self.fs.start, self.mountpoint)
        self._spawn(self._check_content())
        self._spawn(self._evict_periodically())
        self._spawn(self._flush_hit_metrics())

    async def stop(self) -> None:
        for task in [*self._tasks, *self._resolving.values(), *self._artifacts.values()]:
            task.cancel()
        for task in [*self._tasks, *self._resolving.values(), *self._artifacts.values()]:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._resolving.clear()
        self._artifacts.clear()
        if self.fetcher is not None:
            await self.fetcher.close()
        if self.fs is not None:
            await asyncio.to_thread(self.fs.stop)
            self.fs = None
        await self.content.flush(timeout=2.0)
        await self.content.close()
        await self.registry.close()
        self.cache.close()

    # LayerProvider ------------------------------------------------------------------------

    async def prepare(self, layer: RemoteLayer) -> str:
        digest = _check_digest(layer.digest)
        with TELEMETRY.span("prepare", **{"clip.layer": digest, "clip.image": layer.image_ref}):
            manifest = layer.labels.get(MANIFEST_LABEL, "")
            for later in layer.layers:
                if later != digest and SHA256_DIGEST.match(later):
                    self._resolve(later, layer.image_ref, manifest)
            index = await self._resolve(digest, layer.image_ref, manifest)
            if not self.cache.is_complete(digest, index.uncompressed_size):
                await self._check_reachable(layer)
            return self._attach(layer, index)

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        digest = _check_digest(layer.digest)
        index = self.indexes.get(digest)
        if index is None:
            manifest = layer.labels.get(MANIFEST_LABEL, "")
            index = await self._resolve(digest, layer.image_ref, manifest)
        path = self._attach(layer, index)
        if self.cache.is_complete(digest, index.uncompressed_size):
            # a previous run may have stopped before (or while the cache was down) sharing it
            self._spawn(self._share_index(digest, upload_blocks=True))
        return path

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        users = self._users.get(layer.digest, 0) - 1
        if users > 0:
            self._users[layer.digest] = users
            return
        self._users.pop(layer.digest, None)
        self._refs.pop(layer.digest, None)
        if self.fetcher is not None:
            await self.fetcher.cancel(layer.digest)
        if self.fs is not None:
            with contextlib.suppress(ClipError):
                self.fs.detach(layer_id(layer.digest))
        with contextlib.suppress(InvalidArgument, OSError):
            self.cache.release(layer.digest)
        self._spawn(self.evict())

    async def sweep(self) -> list[str]:
        """Attachments exist only while snapshots use them: nothing is left to sweep."""
        return []

    # what the EROFS mounts need (snapshotter.erofs.layers.LayerStreams) ---------------------

    def index_of(self, digest: str) -> LayerIndex | None:
        return self.indexes.get(digest)

    def is_complete(self, digest: str) -> bool:
        index = self.indexes.get(digest)
        return index is not None and self.cache.is_complete(digest, index.uncompressed_size)

    def cache_file(self, digest: str) -> Path:
        return self.cache.layer(digest).directory / "data"

    def layer_name(self, digest: str) -> str:
        return layer_id(digest)

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
            content_cache=tier_health(self.content.health()),
        )

    # internals ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A background task the provider owns (cancelled at stop)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _attach(self, layer: RemoteLayer, index: LayerIndex) -> str:
        if self.fs is None:
            raise Unavailable(f"layer {layer.digest}: the FUSE mount is not running")
        name = layer_id(layer.digest)
        ref, digest = layer.image_ref, layer.digest
        registry = self.registry

        async def source(coff: int, length: int) -> bytes:
            try:
                data = await registry.read_range(ref, digest, coff, length)
            except ClipError:
                TELEMETRY.registry_request("range", "error")
                raise
            TELEMETRY.registry_request("range", 206, len(data))
            return data

        try:
            path = self.fs.attach(name, index, source)
            self._start_background(self.fs.ops.by_name[name].layer)
        except AlreadyExists:
            path = self.fs.path(name)
        self._users[digest] = self._users.get(digest, 0) + 1
        self._refs[digest] = ref
        return str(path)

    def _start_background(self, layer: Layer) -> None:
        """Prefetch the layer's start profile (when one is known) and fetch the rest; with no
        profile known, record one from this node's first reads."""
        layer.cache.touch()
        profile = self.indexes.profile(layer.digest, layer.cache.block_size)
        if profile is None:
            seconds = self.config.background_fetch.profile_seconds
            layer.record_profile(seconds)
            self._spawn(self._save_profile(layer, seconds))
        if self.fetcher is not None:
            self.fetcher.start(layer, profile or [])

    def _fetched(self, layer: Layer) -> None:
        """Background fetch completed a layer: fill whatever blocks the ContentCache lacks
        (puts of fetched blocks are dropped while it is down or its queue is full)."""
        self._spawn(self._share_index(layer.digest, upload_blocks=True))

    async def _save_profile(self, layer: Layer, seconds: float) -> None:
        await asyncio.sleep(seconds)
        blocks, layer.profile = layer.profile, None
        if not blocks:
            return
        data = encode_profile(layer.digest, layer.cache.block_size, blocks)
        await asyncio.to_thread(self.indexes.put_profile, layer.digest, data)
        await self.content.put_index(profile_digest(layer.digest), data)
        log.info("start profile recorded", extra={"fields": {
            "layer": layer.digest, "blocks": len(blocks)}})

    def _resolve(self, digest: str, image_ref: str, manifest: str) -> asyncio.Task[LayerIndex]:
        """The (shared) task that finds or builds the index of ``digest``."""
        task = self._resolving.get(digest)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.create_task(self._find_or_build(digest, image_ref, manifest))
            task.add_done_callback(_consume_exception)
            self._resolving[digest] = task
        return task

    async def _find_or_build(self, digest: str, image_ref: str, manifest: str) -> LayerIndex:
        """Local store, ContentCache, registry artifact, and only then a build."""
        with TELEMETRY.span("index.resolve", **{"clip.layer": digest}) as span:
            index = self.indexes.get(digest)
            source = "local"
            if index is None:
                index, source = await self._from_content(digest), "contentcache"
            if index is None:
                index, source = await self._from_artifact(digest, image_ref, manifest), "registry"
                if index is not None:
                    self._spawn(self._share_index(digest))
            if index is None:
                index, source = await self._build(digest, image_ref), "built"
            span.set_attribute("clip.source", source)
            log.info("index resolved", extra={"fields": {"layer": digest, "source": source}})
            return index

    async def _from_content(self, digest: str) -> LayerIndex | None:
        if isinstance(self.content, NoContentCache):
            return None
        data = await self.content.get_index(digest)
        if data is None:
            return None
        index = index_of_blob(lambda: LayerIndex.from_bytes(data), digest, "content cache index")
        if index is None:
            return None
        stored = await asyncio.to_thread(self.indexes.put, digest, data)
        profile = await self.content.get_index(profile_digest(digest))
        if profile is not None and decode_profile(profile, digest, self.cache.block_size):
            await asyncio.to_thread(self.indexes.put_profile, digest, profile)
        return stored

    async def _from_artifact(self, digest: str, ref: str, manifest: str) -> LayerIndex | None:
        if not ref:
            return None
        key = manifest or ref
        task = self._artifacts.get(key)
        if task is None:
            task = asyncio.create_task(self._find_artifact(ref, manifest))
            self._artifacts[key] = task
        artifact = await asyncio.shield(task)
        if artifact is None:
            return None
        try:
            index = await artifact.index(self.registry, digest)
            if index is None:
                return None
            stored = await asyncio.to_thread(self.indexes.put, digest, index.to_bytes())
            profile = await artifact.profile(self.registry, digest)
        except ClipError as exc:
            log.warning("index artifact of %s: %s", digest, exc)
            return None
        if profile is not None and decode_profile(profile, digest, self.cache.block_size):
            await asyncio.to_thread(self.indexes.put_profile, digest, profile)
        return stored

    async def _find_artifact(self, ref: str, manifest: str) -> Artifact | None:
        """The image's index artifact (looked up once per image; None when there is none)."""
        try:
            if not manifest:
                manifest = (await self.registry.resolve(ref)).manifest_digest
            return await find_artifact(self.registry, ref, manifest)
        except ClipError as exc:
            log.info("no index artifact for %s: %s", ref, exc)
            return None

    async def _build(self, digest: str, image_ref: str) -> LayerIndex:
        """Stream the blob once: build its index and fill the disk cache in the same pass."""
        log.info("building index", extra={"fields": {"layer": digest, "image": image_ref}})
        cache = self.cache.layer(digest)
        writer = cache.writer()
        temporary = self.indexes.temporary(digest)
        try:
            with TELEMETRY.span("index.build", **{"clip.layer": digest}):
                size = await build_from_registry(
                    self.registry, image_ref, digest, temporary, writer.write
                )
            writer.finish(size)
            index = self.indexes.commit(temporary, digest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            self.cache.remove(digest)
            raise
        TELEMETRY.registry_request("blob", 200, index.compressed_size)
        self._spawn(self._share_index(digest, upload_blocks=True))
        self._spawn(self.evict())
        return index

    async def _share_index(self, digest: str, upload_blocks: bool = False) -> None:
        """Put the index into the ContentCache; after a build also every block of the layer."""
        if isinstance(self.content, NoContentCache):
            return
        data = await asyncio.to_thread(self.indexes.path(digest).read_bytes)
        await self.content.put_index(digest, data)
        if upload_blocks:
            try:
                sent = await self._upload_blocks(digest)
            except (OSError, ValueError) as exc:
                log.warning("upload of %s to the content cache stopped: %s", digest, exc)
                return
            log.info("layer shared", extra={"fields": {"layer": digest, "blocks": sent}})

    async def _upload_blocks(self, digest: str) -> int:
        """Queue every block of a fully cached layer that the ContentCache lacks, keeping the
        put queue at most half full so no put is dropped for lack of room."""
        cache = self.cache.layer(digest)
        room = self.config.content_cache.put_queue_bytes // 2
        sent = 0
        for block in range(cache.nblocks() or 0):
            if not cache.has(block) or await self.content.exists(digest, block):
                continue
            while self.content.health().queued_bytes > room:
                await asyncio.sleep(0.02)
            if not self.content.health().healthy:
                log.info("content cache unhealthy: upload of %s stopped", digest)
                break
            start = block * cache.block_size
            end = min(start + cache.block_size, cache.size or 0)
            data = await asyncio.to_thread(cache.read, start, end - start)
            await self.content.put_block(digest, block, data)
            sent += 1
        await self.content.flush(timeout=self.config.content_cache.index_timeout_seconds)
        return sent

    async def _check_content(self) -> None:
        try:
            await self.content.check()
        except ClipError as exc:
            log.warning("content cache unavailable (reads go to the registry): %s", exc)

    async def _flush_hit_metrics(self) -> None:
        """Batched memory/disk hit counts reach /metrics within a couple of seconds."""
        while self.fs is not None:
            await asyncio.sleep(2.0)
            if self.fs is not None:
                self.fs.readpath.hits.flush()

    async def _evict_periodically(self) -> None:
        limit = self.config.disk_cache.limit_bytes
        while limit > 0:
            await asyncio.sleep(EVICT_PERIOD)
            await self.evict()

    async def evict(self) -> None:
        """Bring the disk cache under its limit, keeping layers in use or being resolved."""
        if self.config.disk_cache.limit_bytes <= 0:
            return
        keep = set(self._users) | {d for d, t in self._resolving.items() if not t.done()}
        try:
            removed = await asyncio.to_thread(
                self.cache.evict, self.config.disk_cache.limit_bytes, keep
            )
        except OSError as exc:
            log.warning("disk cache eviction failed: %s", exc)
            return
        for entry in removed:
            log.info("evicted layer cache", extra={"fields": {
                "layer": entry.digest, "bytes": entry.bytes_cached}})

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
