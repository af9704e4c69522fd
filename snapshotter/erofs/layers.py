"""Remote layers served by the kernel: an EROFS image per layer, mounted over its tar stream.

`ErofsLayers` is the LayerProvider the snapshots layer talks to in EROFS mode. It lets the
remote-layer provider (``inner``) resolve the layer's index and attach its stream to the FUSE
mount exactly as in FUSE mode, then writes the layer's EROFS image from the index and mounts it
file-backed at ``<root>/layers/<layer>/`` with the layer's uncompressed tar stream as the image's
extra device. The image is ``<root>/erofs/<layer>.<disk|fuse>[.mtime].img``: ``disk|fuse`` says
which device it is mounted over, so a restart can tell from the mount table whether a mount it
finds still works without the previous daemon; ``.mtime`` marks an image written with compact
inodes' own mtimes (the start-time probe found a kernel that shows them), so a mount left by a
daemon that probed differently is never kept. The device is:

- the disk-cache file itself when the whole stream is on disk: the kernel then reads the
  layer with no daemon in the path, and the mount outlives any restart of clip — unless the
  layer is recording its start profile (none was known: this node's first reads become the
  profile other nodes prefetch), since reads of the cache file never reach clip;
- otherwise ``<mountpoint>/blobs/<layer>``, the FUSE file whose missing bytes the read path
  fetches. Lookups, getattr, readdir, open and xattrs never reach clip, only stream reads.

One mount per layer digest, shared by every snapshot of that layer (reference counted); the
last release unmounts it and removes its image. A restart keeps the mounts it finds over
complete cache files, and those over stream files when the stream mount's FUSE session was
taken over from the previous daemon (its holder kept it: running containers never noticed);
any other mount at a layer's path (its FUSE connection died with the holder) is detached and
mounted anew for new snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from snapshotter.erofs import write_image
from snapshotter.erofs.mount import mount_image, probe_file_backed, unmount
from snapshotter.errors import ClipError, FailedPrecondition, Unavailable
from snapshotter.fs.mounts import mount_at
from snapshotter.index import LayerIndex
from snapshotter.service.status import ProviderStatus
from snapshotter.snapshots.remote import LayerProvider, RemoteLayer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FsMode:
    """`[fs] mode` made definite, with what the start-time probe found."""

    mode: str  # "erofs" or "fuse"
    compact_mtime: bool = False  # images get compact inodes with their own mtimes
    direct_io: bool = False  # mounts over the disk cache read it with direct I/O


def choose_mode(configured: str, workdir: Path, device_dir: Path | None = None) -> FsMode:
    """`[fs] mode` made definite.

    "auto" mounts a tiny image file-backed with an extra device (what every layer needs) and
    uses EROFS if that works; "erofs" insists on it and refuses to start without it. The same
    probe says whether the kernel shows compact inodes' own mtimes (6.15+) and whether a mount
    over a file in ``device_dir`` (the disk cache's directory) can read it with direct I/O.
    """
    if configured == "fuse":
        return FsMode("fuse")
    probe = workdir / f".probe-{os.getpid()}"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        found = probe_file_backed(probe, device_dir)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    why = found.unusable
    if why is None:
        log.info("fs mode: erofs (the kernel serves layers; file-backed EROFS works; compact "
                 "inodes %s; complete layers read from the disk cache %s)",
                 "with their own mtimes" if found.compact_mtime
                 else "only at the layer's most common mtime: this kernel ignores theirs",
                 "with direct I/O" if found.direct_io
                 else "through its page cache (no direct I/O here)")
        return FsMode("erofs", found.compact_mtime, found.direct_io)
    if configured == "erofs":
        raise FailedPrecondition(f"[fs] mode = \"erofs\" but file-backed EROFS is unusable: {why}")
    log.warning("fs mode: fuse (file-backed EROFS is unusable here: %s)", why)
    return FsMode("fuse")


class LayerStreams(Protocol):
    """What `ErofsLayers` needs to know of an attached layer's stream (no network)."""

    @property
    def mountpoint(self) -> Path: ...

    def index_of(self, digest: str) -> LayerIndex | None: ...

    def is_complete(self, digest: str) -> bool: ...

    def recording_profile(self, digest: str) -> bool: ...

    def narrow_readahead(self) -> contextlib.AbstractContextManager[None]: ...

    def cache_file(self, digest: str) -> Path: ...

    def layer_name(self, digest: str) -> str: ...

    def status(self) -> ProviderStatus: ...

    def serve_blobs(self, holder: Path) -> None: ...

    def session_resumed(self) -> bool: ...


class StreamProvider(LayerProvider, LayerStreams, Protocol):
    """A remote-layer provider that attaches layer streams to the FUSE mount."""


class ErofsLayers:
    """LayerProvider: the inner provider's layers, each served by an EROFS mount — or, in FUSE
    mode, the inner provider's own FUSE tree directories, unchanged.

    Also a BackgroundService: `start` settles `[fs] mode` (it probes the kernel, which must
    happen after the daemon holds its root, so two daemons never probe in one root).
    """

    name = "layer-mounts"

    def __init__(
        self, inner: StreamProvider, root: Path, mode: str = "auto", cache_dir: Path | None = None
    ) -> None:
        self.inner = inner
        self.images = root / "erofs"
        self.layers = root / "layers"
        self.cache_dir = cache_dir or root / "cache"
        self.mode = mode
        #: Images get compact inodes with their own mtimes (settled by ``start``'s probe).
        self.compact_mtime = False
        #: Mounts over the disk cache read it with direct I/O (settled by ``start``'s probe).
        self.direct_io = False
        self._users: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def start(self, daemon: object = None) -> None:
        """Settle the mode; in EROFS mode the inner provider's stream mount then outlives
        restarts through a holder process (its socket: ``<root>/fuse-holder.sock``)."""
        found = await asyncio.to_thread(choose_mode, self.mode, self.images, self.cache_dir)
        self.mode, self.compact_mtime, self.direct_io = (
            found.mode, found.compact_mtime, found.direct_io)
        if self.mode == "erofs":
            self.inner.serve_blobs(self.images.parent / "fuse-holder.sock")

    async def stop(self) -> None:
        """Layer mounts stay: running containers keep reading them (see the module doc)."""

    async def prepare(self, layer: RemoteLayer) -> str:
        lowerdir = await self.inner.prepare(layer)
        if self.mode == "fuse":
            return lowerdir
        return await self._use(layer, "")

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        fuse_dir = await self.inner.restore(layer, lowerdir)
        if self.mode == "fuse":
            return fuse_dir
        return await self._use(layer, lowerdir)

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        if self.mode == "fuse":
            await self.inner.release(layer, lowerdir)
            return
        async with self._lock(layer.digest):
            users = self._users.get(layer.digest, 0) - 1
            if users > 0:
                self._users[layer.digest] = users
            elif self._users.pop(layer.digest, None) is not None:
                await asyncio.to_thread(self._unmount, layer.digest)
        await self.inner.release(layer, lowerdir)

    async def sweep(self) -> list[str]:
        """Unmount layer mounts no snapshot uses (left by a daemon that died between mounting
        and committing, or whose snapshot could not be restored)."""
        in_use = {self.inner.layer_name(d) for d in self._users}
        swept = []
        for target in sorted(self.layers.glob("*")) if self.layers.is_dir() else []:
            if target.name not in in_use and target.is_dir():
                await asyncio.to_thread(self._drop, target)
                swept.append(f"layers/{target.name}")
        if swept:
            log.info("unmounted layers no snapshot uses: %s", ", ".join(swept))
        return swept + await self.inner.sweep()

    def status(self) -> ProviderStatus:
        """The inner provider's report, saying how layers are served."""
        return dataclasses.replace(self.inner.status(), fs_mode=self.mode,
                                   direct_io=self.direct_io)

    def mounted(self) -> dict[str, Path]:
        """Layer digest -> mount directory of every layer mounted by this daemon."""
        return {d: self._target(d) for d in self._users}

    async def _use(self, layer: RemoteLayer, recorded: str) -> str:
        """Count one more user of the layer's mount, mounting it first if needed; on failure
        the inner provider's attachment is released again, so nothing is left half done."""
        try:
            async with self._lock(layer.digest):
                target = self._target(layer.digest)
                if layer.digest not in self._users:
                    await asyncio.to_thread(self._mount, layer, recorded == str(target))
                self._users[layer.digest] = self._users.get(layer.digest, 0) + 1
                return str(target)
        except BaseException:
            await self.inner.release(layer, recorded)
            raise

    def _lock(self, digest: str) -> asyncio.Lock:
        return self._locks.setdefault(digest, asyncio.Lock())

    def _target(self, digest: str) -> Path:
        return self.layers / self.inner.layer_name(digest)

    def _device(self, digest: str) -> Path:
        if self.inner.is_complete(digest) and not self.inner.recording_profile(digest):
            return self.inner.cache_file(digest)
        return self._blob(digest)

    def _mount(self, layer: RemoteLayer, restoring: bool) -> None:
        """Write the image and mount it (blocking: runs in a worker thread)."""
        digest = layer.digest
        target, device = self._target(digest), self._device(digest)
        image = self._image(digest, device)
        over_fuse = device == self._blob(digest)
        if restoring and _serves(target, image) and (
            not over_fuse or self.inner.session_resumed()
        ):
            log.info("layer %s of %s: kept its EROFS mount over %s", digest, layer.image_ref,
                     "the FUSE stream (session resumed)" if over_fuse else "the disk cache")
            return
        index = self.inner.index_of(digest)
        if index is None:
            raise Unavailable(f"layer {digest} of {layer.image_ref}: its index is not on disk")
        unmount(target)  # a mount left by a previous daemon over a FUSE file that is gone
        for stale in self.images.glob(f"{target.name}.*.img"):  # its image, another variant
            if stale != image:
                stale.unlink(missing_ok=True)
        self.images.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        write_image(index, image, compact_mtime=self.compact_mtime)
        # EROFS opens the stream at mount, and keeps the readahead window it had then: a layer
        # recording its profile reads with a narrow one, so the profile is what was read
        narrow = over_fuse and self.inner.recording_profile(digest)
        # Over the disk cache, buffered reads would cache each byte twice (the layer's file
        # and the cache file) and read ahead across file boundaries in the stream; over the
        # FUSE stream they go through clip's read path, whose readahead the profile relies on.
        direct = self.direct_io and not over_fuse
        try:
            with self.inner.narrow_readahead() if narrow else contextlib.nullcontext():
                mount_image(image, device, target, direct_io=direct)
        except ClipError as exc:
            image.unlink(missing_ok=True)
            raise type(exc)(f"layer {digest} of {layer.image_ref}: {exc}") from None
        log.info("layer %s of %s mounted (EROFS over %s)", digest, layer.image_ref,
                 "the FUSE stream" if over_fuse
                 else "the disk cache, direct I/O" if direct else "the disk cache")

    def _image(self, digest: str, device: Path) -> Path:
        kind = "fuse" if device == self._blob(digest) else "disk"
        variant = ".mtime" if self.compact_mtime else ""
        return self.images / f"{self.inner.layer_name(digest)}.{kind}{variant}.img"

    def _blob(self, digest: str) -> Path:
        return self.inner.mountpoint / "blobs" / self.inner.layer_name(digest)

    def _unmount(self, digest: str) -> None:
        self._drop(self._target(digest))

    def _drop(self, target: Path) -> None:
        """Unmount a layer directory, remove it and its images (blocking)."""
        unmount(target)
        for image in self.images.glob(target.name + ".*.img"):
            image.unlink(missing_ok=True)
        try:
            os.rmdir(target)
        except OSError as exc:
            log.warning("cannot remove layer directory %s: %s", target, exc)


def _serves(target: Path, image: Path) -> bool:
    """Whether `target` is an EROFS mount of `image` (a mount a previous daemon left)."""
    found = mount_at(target)
    return found is not None and found[0] == "erofs" and found[1] == os.fspath(image)
