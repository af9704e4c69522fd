"""Finding a layer's clip index: the node's store, the ContentCache, the image's index artifact,
and only then a build from the registry blob (which also fills the disk cache).

One resolution per digest however many Prepares ask (single flight). The shared task is
shielded from its waiters: a Prepare cancelled by containerd stops waiting, the resolution
goes on for the others. A shared task that was itself cancelled (only the daemon's stop does
that) is replaced by a fresh one on the next request, never reported as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from snapshotter.cache import DiskCache
from snapshotter.contentcache import ContentCache, NoContentCache
from snapshotter.errors import ClipError, ResourceExhausted, Unavailable
from snapshotter.index import LayerIndex
from snapshotter.registry import RegistryClient
from snapshotter.remote.artifact import Artifact, find_artifact
from snapshotter.remote.build import LayerBounds, build_from_registry, index_of_blob
from snapshotter.remote.profile import decode_profile, profile_digest
from snapshotter.remote.store import IndexStore
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

#: How often a waiter starts over when the shared resolution it waited on was cancelled.
_RETRIES = 3


class Resolver:
    """Resolves digests to stored indexes (see the module doc); asyncio thread."""

    def __init__(
        self,
        indexes: IndexStore,
        content: ContentCache,
        registry: RegistryClient,
        cache: DiskCache,
        bounds: LayerBounds,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        on_new: Callable[[str, bool], Coroutine[Any, Any, None]],
    ) -> None:
        self.indexes = indexes
        self.content = content
        self.registry = registry
        self.cache = cache
        self.bounds = bounds
        self._spawn = spawn
        #: `on_new(digest, built)`: an index came from the registry (artifact or build).
        self._on_new = on_new
        self._tasks: dict[str, asyncio.Task[LayerIndex]] = {}
        self._artifacts: dict[str, asyncio.Task[Artifact | None]] = {}

    def busy(self) -> set[str]:
        """Digests being resolved now (their caches must not be evicted)."""
        return {d for d, t in list(self._tasks.items()) if not t.done()}

    def start(self, digest: str, image_ref: str, manifest: str) -> asyncio.Task[LayerIndex]:
        """The shared task resolving `digest` (started if none is running or usable)."""
        task = self._tasks.get(digest)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._find_or_build(digest, image_ref, manifest))
            task.add_done_callback(_consume_exception)
            self._tasks[digest] = task
        return task

    async def index(self, digest: str, image_ref: str, manifest: str) -> LayerIndex:
        """Wait for `digest`'s index without ever cancelling the shared work."""
        for _ in range(_RETRIES):
            task = self.start(digest, image_ref, manifest)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    continue  # the shared work was cancelled, not this waiter: start over
                raise
        raise Unavailable(f"layer {digest} of {image_ref}: index resolution kept being cancelled")

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._artifacts.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        self._artifacts.clear()

    async def _find_or_build(self, digest: str, image_ref: str, manifest: str) -> LayerIndex:
        """Local store, ContentCache, registry artifact, and only then a build."""
        with TELEMETRY.span("index.resolve", **{"clip.layer": digest}) as span:
            index = await asyncio.to_thread(self.indexes.get, digest)
            source = "local"
            if index is None:
                index, source = await self._from_content(digest), "contentcache"
            if index is None:
                index, source = await self._from_artifact(digest, image_ref, manifest), "registry"
                if index is not None:
                    self._spawn(self._on_new(digest, False))
            if index is None:
                index, source = await self._build(digest, image_ref), "built"
            span.set_attribute("clip.source", source)
            self.bounds.check(digest, image_ref, index.uncompressed_size, index.compressed_size)
            log.info("index resolved", extra={"fields": {
                "layer": digest, "image": image_ref, "source": source}})
            return index

    async def _from_content(self, digest: str) -> LayerIndex | None:
        if isinstance(self.content, NoContentCache):
            return None
        data = await self.content.get_index(digest)
        if data is None:
            return None
        index = await asyncio.to_thread(
            index_of_blob, lambda: LayerIndex.from_bytes(data), digest, "content cache index"
        )
        if index is None:
            return None
        stored = await asyncio.to_thread(self.indexes.put, digest, data)
        profile = await self.content.get_index(profile_digest(digest))
        await self._keep_profile(digest, profile)
        return stored

    async def _keep_profile(self, digest: str, profile: bytes | None) -> None:
        if profile is None:
            return
        decoded = decode_profile(profile, digest, self.cache.block_size)
        if decoded is not None and decoded.blocks:
            await asyncio.to_thread(self.indexes.put_profile, digest, profile)

    async def _from_artifact(self, digest: str, ref: str, manifest: str) -> LayerIndex | None:
        if not ref:
            return None
        key = manifest or ref
        task = self._artifacts.get(key)
        if task is None or task.cancelled():
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
            log.warning("index artifact of layer %s of %s: %s", digest, ref, exc)
            return None
        await self._keep_profile(digest, profile)
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
        cache = await asyncio.to_thread(self.cache.layer, digest)
        writer = cache.writer()
        temporary = self.indexes.temporary(digest)
        try:
            with TELEMETRY.span("index.build", **{"clip.layer": digest}):
                size = await build_from_registry(
                    self.registry, image_ref, digest, temporary, writer.write, self.bounds
                )
            await asyncio.to_thread(writer.finish, size)
            index = await asyncio.to_thread(self.indexes.commit, temporary, digest)
        except BaseException as exc:
            temporary.unlink(missing_ok=True)
            await asyncio.shield(asyncio.to_thread(self.cache.remove, digest))
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                if self.cache.budget is not None:
                    self.cache.budget.disk_full()
                raise ResourceExhausted(
                    f"layer {digest} of {image_ref}: no space left for its index in "
                    f"{self.indexes.directory} (disk cache {self.cache.directory})"
                ) from None
            raise
        TELEMETRY.registry_request("blob", 200, index.compressed_size)
        self._spawn(self._on_new(digest, True))
        return index


def _consume_exception(task: asyncio.Task[LayerIndex]) -> None:
    """Early-started layers may fail unobserved; their error is re-raised to the Prepare."""
    if not task.cancelled():
        task.exception()
