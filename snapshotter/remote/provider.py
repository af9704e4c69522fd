"""The remote layer provider: what turns a Prepare with remote labels into a lazy lowerdir.

It resolves the layer's clip index (`resolve.py`: the node's store, the cluster's ContentCache,
the image's index artifact, and only then a streaming build that also fills the disk cache),
attaches the layer to the one FUSE mount with the registry as the last tier of the read path,
and starts its background fetch (`background.py`). The snapshots layer then commits the
snapshot and answers containerd ALREADY_EXISTS. What this node builds or completes it shares
with the ContentCache (`share.py`).

Lifecycle rules:
- Layers are identified by their full blob digest; the short directory name (`layer_id`) is
  only a name, and attach refuses a name held by another digest.
- Attach and detach of one digest are serialised and shielded from the caller's cancellation,
  so the user count always matches what is attached.
- Detach removes the layer from the mount, then cancels and awaits everything the read path
  runs for it (flights, worker threads, background fetch) in the trio thread, and only then
  closes its cache file (in a worker thread: closing fdatasyncs).
- The disk cache's `DiskBudget` (limit_bytes, ENOSPC) bounds every writer; layers nobody uses
  are evicted, least recently used first, when a write needs room.
- Every failure of a Prepare names the layer's blob digest and image, and is logged at warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapshotter.bridge import Bridge
from snapshotter.cache import DiskBudget, DiskCache, MemoryTier, digest_hex
from snapshotter.config import Config
from snapshotter.contentcache import open_content_cache
from snapshotter.errors import (
    AlreadyExists,
    ClipError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    quoted,
)
from snapshotter.fs.layerfs import LayerFS
from snapshotter.fs.mounts import is_mounted
from snapshotter.index import LayerIndex
from snapshotter.readpath import Layer, ReadPolicy, Source
from snapshotter.registry import RegistryClient
from snapshotter.registry.auth import Keychain
from snapshotter.registry.reference import SHA256_DIGEST
from snapshotter.remote.background import BackgroundFetch
from snapshotter.remote.build import LayerBounds
from snapshotter.remote.profile import encode_profile, profile_digest, restart_points
from snapshotter.remote.resolve import Resolver
from snapshotter.remote.share import Sharer
from snapshotter.remote.store import IndexStore
from snapshotter.service.status import LayerStatus, ProviderStatus, tier_health
from snapshotter.snapshots.remote import CRI_PREFIX, RemoteLayer
from snapshotter.telemetry import TELEMETRY

if TYPE_CHECKING:
    from snapshotter.service.daemon import Daemon

log = logging.getLogger(__name__)

MANIFEST_LABEL = CRI_PREFIX + "manifest-digest"
#: Seconds between re-measurements of the disk cache (eviction also runs on every write that
#: needs room and after every release).
EVICT_PERIOD = 30.0


def layer_id(digest: str) -> str:
    """The layer's directory name under the mount: short, so 128 lowerdirs fit in a page."""
    return digest.removeprefix("sha256:")[:16]


def _check_digest(digest: str) -> str:
    if not SHA256_DIGEST.match(digest):
        raise InvalidArgument(f"layer digest {quoted(digest)} is not a sha256 digest")
    return digest


class RemoteLayerProvider:
    """LayerProvider (for the snapshots layer) and BackgroundService (for the daemon)."""

    name = "remote-layers"

    def __init__(
        self,
        config: Config,
        keychain: Keychain | None = None,
        registry: RegistryClient | None = None,
    ) -> None:
        """``keychain``: an image's own credentials, asked before the configured ones (the
        pull secrets `clip serve`'s CRI image service keeps, see snapshotter/cri/).
        ``registry``: the client to use instead of one built from the configuration."""
        self.config = config
        root = Path(config.daemon.root)
        self.mountpoint = root / "mnt"
        self.indexes = IndexStore(root / "indexes")
        self.budget = DiskBudget(
            config.cache_dir(), config.disk_cache.limit_bytes, keep=self._busy
        )
        self.cache = DiskCache(root, directory=config.cache_dir(), budget=self.budget)
        self.content = open_content_cache(config.content_cache)
        self.registry = registry or RegistryClient.from_config(config, keychain=keychain)
        self.bounds = LayerBounds(
            config.layers.max_layer_bytes, config.layers.max_compression_ratio
        )
        self.resolver = Resolver(
            self.indexes, self.content, self.registry, self.cache, self.bounds,
            self._spawn, self._share_new,
        )
        self.sharer = Sharer(
            self.content, self.indexes, self.cache, config.content_cache.put_queue_bytes,
            config.content_cache.index_timeout_seconds,
        )
        self.fs: LayerFS | None = None
        self.bridge: Bridge | None = None
        self.background: BackgroundFetch | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._users: dict[str, int] = {}
        self._refs: dict[str, str] = {}  # digest -> image ref it is read from (for status)
        self._locks: dict[str, asyncio.Lock] = {}
        self._holder: Path | None = None

    # BackgroundService --------------------------------------------------------------------

    async def start(self, daemon: Daemon | None = None) -> None:
        await asyncio.to_thread(self.indexes.directory.mkdir, parents=True, exist_ok=True)
        self.bridge = Bridge(asyncio.get_running_loop())
        policy = ReadPolicy(timeout=self.config.fuse.read_timeout_seconds)
        memory = MemoryTier(self.config.memory_cache.limit_bytes)
        self.fs = LayerFS(self.cache, self.bridge, policy, memory,
                          allow_other=self.config.fuse.allow_other)
        if self._holder is not None:
            self.fs.serve_blobs(self._holder)
        self.fs.readpath.content = self.content
        self.background = BackgroundFetch(
            self.fs.readpath, self.config.background_fetch, self.budget, self._fetched,
            on_profile_run=self.fs.warm,
        )
        await asyncio.to_thread(self.budget.measure)
        await asyncio.to_thread(self.fs.start, self.mountpoint)
        self._spawn(self._check_content())
        self._spawn(self._evict_periodically())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        await self.resolver.stop()
        if self.fs is not None:
            await asyncio.to_thread(self.fs.stop)  # cancels every layer's work, closes caches
            self.fs = None
        await self.content.flush(timeout=2.0)
        await self.content.close()
        await self.registry.close()
        await asyncio.to_thread(self.cache.close)

    async def sweep(self) -> list[str]:
        """Attachments exist only while snapshots use them: nothing is left to sweep. Called
        once the restored layers are attached again: a stream served to nobody now fails."""
        if self.fs is not None:
            await asyncio.to_thread(self.fs.restored)
        return []

    def serve_blobs(self, holder: Path) -> None:
        """EROFS mode: the FUSE mount serves only the layers' streams, and its session outlives
        this daemon through the holder at socket `holder` (call before `start`)."""
        self._holder = holder

    def session_resumed(self) -> bool:
        """Whether the stream mount was taken over from a previous daemon, so that EROFS mounts
        over its files still work."""
        return self.fs is not None and self.fs.resumed

    # what the EROFS mounts need (snapshotter.erofs.layers.LayerStreams) -----------------------

    def layer_name(self, digest: str) -> str:
        """Short directory/file name of a layer (`<mountpoint>/blobs/<name>`, lowerdirs)."""
        return layer_id(digest)

    def index_of(self, digest: str) -> LayerIndex | None:
        """The layer's resolved, locally stored index; no network. Blocking when the index is
        not attached (it is read from the store): call it from a worker thread then."""
        fs = self.fs
        attached = fs.ops.by_name.get(layer_id(digest)) if fs is not None else None
        if attached is not None and attached.layer.digest == digest:
            return attached.layer.index
        return self.indexes.get(digest)

    def is_complete(self, digest: str) -> bool:
        """Whether the layer's whole uncompressed stream is in the disk cache (blocking I/O
        when the layer is not open: call it from a worker thread then)."""
        index = self.index_of(digest)
        return index is not None and self.cache.peek_complete(digest, index.uncompressed_size)

    def recording_profile(self, digest: str) -> bool:
        """Whether the attached layer is recording its start profile from this node's reads
        (no profile was known for it): its reads must then reach the read path."""
        fs = self.fs
        attached = fs.ops.by_name.get(layer_id(digest)) if fs is not None else None
        return attached is not None and attached.layer.recording_profile

    def narrow_readahead(self) -> contextlib.AbstractContextManager[None]:
        """Stream files opened in the body read ahead little (`BlobServer.narrow_readahead`)."""
        return self.fs.narrow_readahead() if self.fs is not None else contextlib.nullcontext()

    def cache_file(self, digest: str) -> Path:
        """The disk-cache file holding the layer's uncompressed stream (sparse until complete)."""
        return self.cache.directory / digest_hex(digest) / "data"

    # LayerProvider ------------------------------------------------------------------------

    async def prepare(self, layer: RemoteLayer) -> str:
        digest = _check_digest(layer.digest)
        try:
            with TELEMETRY.span("prepare", **{"clip.layer": digest,
                                              "clip.image": layer.image_ref}):
                manifest = layer.labels.get(MANIFEST_LABEL, "")
                for later in layer.layers:
                    if later != digest and SHA256_DIGEST.match(later):
                        self.resolver.start(later, layer.image_ref, manifest)
                index = await self.resolver.index(digest, layer.image_ref, manifest)
                complete = await asyncio.to_thread(
                    self.cache.peek_complete, digest, index.uncompressed_size
                )
                if not complete:
                    await self._check_reachable(layer)
                return await self._attach(layer, index)
        except (ClipError, OSError) as exc:
            raise self._failure(layer, exc) from None

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        digest = _check_digest(layer.digest)
        try:
            index = await asyncio.to_thread(self.indexes.get, digest)
            if index is None:
                manifest = layer.labels.get(MANIFEST_LABEL, "")
                index = await self.resolver.index(digest, layer.image_ref, manifest)
            path = await self._attach(layer, index)
        except (ClipError, OSError) as exc:
            raise self._failure(layer, exc) from None
        if await asyncio.to_thread(self.cache.peek_complete, digest, index.uncompressed_size):
            # a previous run may have stopped before (or while the cache was down) sharing it
            self._spawn(self.sharer.share(digest, upload_blocks=True))
        return path

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        # shielded: a cancelled Remove must not leave the layer half detached
        task = asyncio.create_task(self._release(layer.digest))
        await asyncio.shield(task)

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

    def _busy(self) -> set[str]:
        """Layers whose caches eviction must keep although no process has them open."""
        return self.resolver.busy() | set(self._users)

    def _lock(self, digest: str) -> asyncio.Lock:
        lock = self._locks.get(digest)
        if lock is None:
            lock = self._locks[digest] = asyncio.Lock()
        return lock

    def _failure(self, layer: RemoteLayer, exc: ClipError | OSError) -> ClipError:
        """One error naming the layer and image (logged at warning: why the layer failed)."""
        where = f"layer {layer.digest} of {quoted(layer.image_ref)}"
        if isinstance(exc, ClipError):
            error = exc if layer.digest in str(exc) else _renamed(exc, f"{where}: {exc}")
        elif exc.errno == errno.ENOSPC:
            error = ResourceExhausted(f"{where}: no space left in {self.cache.directory}")
        else:
            error = Internal(f"{where}: {exc.strerror or exc}")
        log.warning("layer refused: %s", error, extra={"fields": {
            "layer": layer.digest, "image": layer.image_ref, "code": error.grpc_code.name}})
        return error

    def _source(self, ref: str, digest: str) -> Source:
        registry, budget = self.registry, self.config.fuse.read_timeout_seconds

        async def source(coff: int, length: int) -> bytes:
            # the registry's own retries end with the read's budget ([fuse] read_timeout_seconds)
            try:
                data = await registry.read_range(
                    ref, digest, coff, length, deadline=registry.deadline(budget)
                )
            except ClipError:
                TELEMETRY.registry_request("range", "error")
                raise
            TELEMETRY.registry_request("range", 206, len(data))
            return data

        return source

    async def _attach(self, layer: RemoteLayer, index: LayerIndex) -> str:
        """Attach and count one user. Shielded: a started attach always completes; if the
        Prepare went away meanwhile, that user is released again once it has (no snapshot
        will ever release it), so the count keeps matching the snapshots."""
        task = asyncio.create_task(self._attach_locked(layer, index))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._undo_attach(done, layer.digest))
            raise

    def _undo_attach(self, done: asyncio.Task[str], digest: str) -> None:
        if not done.cancelled() and done.exception() is None:
            self._spawn(self._release(digest))

    async def _attach_locked(self, layer: RemoteLayer, index: LayerIndex) -> str:
        fs = self.fs
        if fs is None or self.bridge is None:
            raise Unavailable(f"layer {layer.digest}: the FUSE mount is not running")
        digest, name = layer.digest, layer_id(layer.digest)
        async with self._lock(digest):
            attached = fs.ops.by_name.get(name)
            if attached is not None and attached.layer.digest != digest:
                raise FailedPrecondition(
                    f"layer {digest} of {quoted(layer.image_ref)}: its name {name} is taken by "
                    f"layer {attached.layer.digest}"
                )
            try:
                path = await asyncio.to_thread(
                    fs.attach, name, index, self._source(layer.image_ref, digest)
                )
                await self._start_background(fs.ops.by_name[name].layer)
            except AlreadyExists:
                path = fs.path(name)
            self._users[digest] = self._users.get(digest, 0) + 1
            self._refs[digest] = layer.image_ref
            return str(path)

    async def _release(self, digest: str) -> None:
        async with self._lock(digest):
            users = self._users.get(digest, 0) - 1
            if users > 0:
                self._users[digest] = users
                return
            self._users.pop(digest, None)
            self._refs.pop(digest, None)
            await self._detach(digest)
        self._spawn(self.evict())

    async def _detach(self, digest: str) -> None:
        """Unmount-side removal, then the layer's work drained, then its cache file closed."""
        fs = self.fs
        attached = fs.ops.by_name.get(layer_id(digest)) if fs is not None else None
        if fs is None or attached is None or attached.layer.digest != digest:
            return
        layer = await asyncio.to_thread(fs.detach, layer_id(digest))
        if fs.running and self.bridge is not None:
            with contextlib.suppress(RuntimeError):  # the trio loop ended meanwhile
                await self.bridge.to_trio(fs.readpath.close_layer, layer)
        with contextlib.suppress(InvalidArgument, OSError):
            await asyncio.to_thread(self.cache.release, digest)

    async def _start_background(self, layer: Layer) -> None:
        """Prefetch the layer's start profile (when one is known) and fetch the rest; with no
        profile known, record one from this node's first reads."""
        await asyncio.to_thread(layer.cache.touch)
        profile = await asyncio.to_thread(
            self.indexes.profile, layer.digest, layer.cache.block_size
        )
        if profile is not None and profile.points:
            taken = layer.resume.publish(profile.points)
            if taken < len(profile.points):
                log.warning("layer %s: %d of the start profile's %d restart points are not "
                            "block boundaries its index records (a version 1 index records "
                            "none); ignored", layer.digest,
                            len(profile.points) - taken, len(profile.points))
        seconds = self.config.background_fetch.profile_seconds
        if profile is None and seconds > 0:
            layer.record_profile(seconds)
            self._spawn(self._save_profile(layer, seconds))
        fs, background, bridge = self.fs, self.background, self.bridge
        if fs is None or background is None or bridge is None:
            return
        if background.wanted(profile):
            bridge.call_in_trio(fs.readpath.spawn, layer, background.run, layer, profile)

    def _fetched(self, layer: Layer) -> None:
        """Trio thread: background fetch completed a layer; fill whatever blocks the
        ContentCache lacks (puts of fetched blocks are dropped while it is down or full)."""
        if self.bridge is None or not self.sharer.enabled:
            return
        with contextlib.suppress(RuntimeError):  # the asyncio loop closed meanwhile
            self.bridge.loop.call_soon_threadsafe(self._share_complete, layer.digest)

    def _share_complete(self, digest: str) -> None:
        self._spawn(self.sharer.share(digest, upload_blocks=True))

    async def _share_new(self, digest: str, built: bool) -> None:
        """An index came from the registry: share it (after a build, with the layer's blocks)."""
        await self.sharer.share(digest, upload_blocks=built)
        if built:
            await self.evict()

    async def _save_profile(self, layer: Layer, seconds: float) -> None:
        await asyncio.sleep(seconds)
        blocks, layer.profile = layer.profile, None
        if not blocks:
            return
        points = await asyncio.to_thread(
            restart_points, layer.index, blocks, layer.cache.block_size,
            partial(_cached_bytes, layer))
        data = encode_profile(layer.digest, layer.cache.block_size, blocks,
                              layer.profile_started, points)
        await asyncio.to_thread(self.indexes.put_profile, layer.digest, data)
        await self.content.put_index(profile_digest(layer.digest), data)
        log.info("start profile recorded", extra={"fields": {
            "layer": layer.digest, "blocks": len(blocks), "restart_points": len(points)}})

    async def _check_content(self) -> None:
        try:
            await self.content.check()
        except ClipError as exc:
            log.warning("content cache unavailable (reads go to the registry): %s", exc)

    async def _evict_periodically(self) -> None:
        while True:
            await asyncio.sleep(EVICT_PERIOD)
            await asyncio.to_thread(self.budget.measure)
            await self.evict()

    async def evict(self) -> None:
        """Bring the disk cache under its limit, keeping layers in use or being resolved."""
        await asyncio.to_thread(self.budget.make_room, 0)

    async def _check_reachable(self, layer: RemoteLayer) -> None:
        """A layer not fully on disk needs its registry: fail the Prepare now if it is gone."""
        try:
            present = await self.registry.blob_exists(layer.image_ref, layer.digest)
        except ClipError as exc:
            raise Unavailable(
                f"layer {layer.digest} of {quoted(layer.image_ref)} is not fully cached and its "
                f"registry is unreachable: {exc}"
            ) from None
        if not present:
            raise Unavailable(
                f"layer {layer.digest} is not fully cached and {quoted(layer.image_ref)} no "
                "longer has it"
            )


def _renamed(exc: ClipError, message: str) -> ClipError:
    """`exc`'s kind (and gRPC code) with a new message."""
    try:
        return type(exc)(message)
    except TypeError:  # a subclass with its own constructor
        error = ClipError(message)
        error.grpc_code = exc.grpc_code
        return error


def _cached_bytes(layer: Layer, uoff: int, length: int) -> bytes | None:
    """Stream bytes of `layer` from this node's disk cache, None when not all there (or the
    layer was detached meanwhile)."""
    try:
        return layer.cache.read(uoff, length) if layer.cache.has_range(uoff, length) else None
    except (OSError, ValueError):
        return None
