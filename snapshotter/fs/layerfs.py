"""LayerFS: the daemon's handle on the one FUSE mount.

pyfuse3 allows one mount per process and runs on trio, so LayerFS owns a thread running a trio
loop that runs pyfuse3's main loop and the read path's flights. The daemon (asyncio, main thread)
calls `attach`/`detach` from its own thread; they only swap entries in dictionaries the handlers
read, then invalidate the kernel's dentry for a removed layer.

`stop()` always leaves no mount behind: it ends the FUSE loop, lets pyfuse3 unmount, and if the
mount point is still mounted (the loop died, a previous process crashed) detaches it lazily.
`start()` likewise clears a stale clip mount left by a crashed predecessor.

In EROFS mode (`serve_blobs`) the kernel serves every layer's tree and the mount only carries
`blobs/<layer id>`, the layers' streams. Then the mount is served by `BlobServer`, which speaks
the FUSE protocol itself so that its session can outlive this process: a holder process keeps
the `/dev/fuse` descriptor, and `stop()` with layers still attached leaves the session to it
(containers keep reading; their reads wait), so the next daemon takes it over, has the kernel
resend what was in flight, and serves on (docs/restarts.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pyfuse3
import trio

from snapshotter.bridge import Bridge
from snapshotter.cache import DiskCache, MemoryTier
from snapshotter.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snapshotter.fs.blobserver import BlobServer
from snapshotter.fs.mounts import clear_stale_mount, is_mounted, lazy_unmount
from snapshotter.fs.ops import BLOB_BLKSIZE, Attached, ClipOperations
from snapshotter.fs.tree import LayerTree
from snapshotter.index import LayerIndex
from snapshotter.readpath import Layer, ReadPath, ReadPolicy, Source

log = logging.getLogger(__name__)

MOUNT_OPTIONS = frozenset({"fsname=clip", "default_permissions", "ro"})
_LAYER_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_START_TIMEOUT = 30.0
_FLUSH_PERIOD = 2.0


class LayerFS:
    """One FUSE mount serving every attached layer as `<mountpoint>/<layer id>/`."""

    def __init__(
        self,
        cache: DiskCache,
        bridge: Bridge | None = None,
        policy: ReadPolicy | None = None,
        memory: MemoryTier | None = None,
        allow_other: bool = True,
    ) -> None:
        self.cache = cache
        self.bridge = bridge
        #: `[fuse] allow_other`: other users (containers) may read the mount.
        self.options = set(MOUNT_OPTIONS) | ({"allow_other"} if allow_other else set())
        self.readpath = ReadPath(bridge, memory, policy)
        self.ops = ClipOperations(self.readpath)
        self.mountpoint: Path | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._next_slot = 1
        self._lock = threading.Lock()
        self._holder: Path | None = None
        self.server: BlobServer | None = None
        self._stop_blobs: trio.Event | None = None

    def serve_blobs(self, holder: Path) -> None:
        """Serve only the layers' streams, through a `BlobServer` whose session the holder at
        socket `holder` keeps across restarts (call before `start`)."""
        self._holder = holder

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, mountpoint: os.PathLike[str] | str) -> None:
        """Mount at `mountpoint` and serve from a new thread; returns once the mount is live."""
        if self._thread is not None:
            raise AlreadyExists(f"fuse: already mounted at {self.mountpoint}")
        given = Path(mountpoint)
        if self._holder is not None:
            # never stat the mount itself: a session kept for us waits for its server (us)
            mp = Path(os.path.realpath(given.parent)) / given.name
            self.server = BlobServer(mp, self._holder, wait_for_restore=True,
                                     warm_span=BLOB_BLKSIZE)
            if not is_mounted(mp):
                mp.mkdir(parents=True, exist_ok=True)
        else:
            mp = Path(os.path.realpath(given))
            clear_stale_mount(mp)
            mp.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mp
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._serve, args=(mp, ready), name="clip-fuse", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT) or self._error is not None:
            error = self._error
            self.stop()
            raise Unavailable(f"fuse: cannot mount {mp}: {error or 'timed out'}")

    def _serve(self, mp: Path, ready: threading.Event) -> None:
        serve: Callable[[trio.Nursery, threading.Event], Awaitable[None]]
        if self.server is not None:
            serve = self._serve_blobs
        else:
            try:
                pyfuse3.init(self.ops, str(mp), set(self.options))
            except Exception as exc:
                self._error = exc
                ready.set()
                return
            serve = self._serve_tree
        try:
            trio.run(self._trio_main, serve, ready)
        except BaseException as exc:
            log.exception("fuse: main loop failed")
            self._error = exc
        finally:
            ready.set()
            self._token = None
            if self.server is None:
                pyfuse3.close(unmount=True)

    async def _trio_main(
        self,
        serve: Callable[[trio.Nursery, threading.Event], Awaitable[None]],
        ready: threading.Event,
    ) -> None:
        """The FUSE thread's trio loop: the read path's nursery and cache flushing beside
        `serve`, which sets `ready` once requests are answered and returns to stop."""
        self._token = trio.lowlevel.current_trio_token()
        if self.bridge is not None:
            self.bridge.bind_trio()
        try:
            async with trio.open_nursery() as nursery:
                self.readpath.bind(nursery)
                nursery.start_soon(self._flush_caches)
                await serve(nursery, ready)
                nursery.cancel_scope.cancel()
        finally:
            if self.bridge is not None:
                self.bridge.unbind_trio()

    async def _serve_tree(self, nursery: trio.Nursery, ready: threading.Event) -> None:
        """pyfuse3's loop, until `pyfuse3.terminate`."""
        ready.set()
        await pyfuse3.main()

    async def _serve_blobs(self, nursery: trio.Nursery, ready: threading.Event) -> None:
        """The blob server, until `stop` sets the stop event (its session is left as it is)."""
        assert self.server is not None
        self._stop_blobs = trio.Event()
        await nursery.start(self.server.run)
        ready.set()
        await self._stop_blobs.wait()

    def restored(self) -> None:
        """The daemon re-attached every layer it restores: requests for streams it does not
        serve now fail instead of waiting (blob-server mode; any thread but the FUSE one)."""
        if self.server is not None:
            self.server.restored()

    @property
    def resumed(self) -> bool:
        """Whether this mount's session was taken over from a previous daemon (blob-server
        mode): EROFS mounts over its stream files then still work."""
        return self.server is not None and self.server.resumed

    async def _flush_caches(self) -> None:
        """Make blocks fetched by misses durable soon, not only at the next miss or at stop, so
        a daemon killed with SIGKILL loses at most the last couple of seconds of fetches."""
        while True:
            await trio.sleep(_FLUSH_PERIOD)
            caches = {id(a.layer.cache): a.layer.cache for a in list(self.ops.by_name.values())}
            for cache in caches.values():
                try:
                    await trio.to_thread.run_sync(cache.flush)
                except (OSError, ValueError) as exc:
                    log.warning("cache %s: flush failed: %s", cache.digest, exc)

    def stop(self) -> None:
        """End the FUSE loop, unmount, flush caches; leaves no mount behind, even after errors."""
        thread, token = self._thread, self._token
        if thread is not None:
            if token is not None and thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    if self.server is not None and self._stop_blobs is not None:
                        trio.from_thread.run_sync(self._stop_blobs.set, trio_token=token)
                    else:
                        trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
            thread.join(_START_TIMEOUT)
            if thread.is_alive():
                log.error("fuse: loop thread did not stop; detaching the mount")
        self._thread = None
        if self.server is not None and self.ops.by_name:
            log.info("fuse: %d layer stream(s) attached: the session stays with its holder for "
                     "the next daemon", len(self.ops.by_name))
        elif self.server is not None:
            self.server.unmount()
        elif self.mountpoint is not None and is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)
        for name in list(self.ops.by_name):
            self.ops.remove(name)
        self.cache.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- layers ---------------------------------------------------------------------------------

    def attach(self, layer_id: str, index: LayerIndex, source: Source) -> Path:
        """Serve a layer at `<mountpoint>/<layer_id>`; returns that directory."""
        if not _LAYER_ID_RE.match(layer_id):
            raise InvalidArgument(f"fuse: invalid layer id {layer_id!r}")
        if self.mountpoint is None or not self.running:
            raise Unavailable(f"fuse: not mounted; cannot attach layer {layer_id}")
        layer = Layer(layer_id, index, source, self.cache.layer(index.blob_digest))
        with self._lock:
            if layer_id in self.ops.by_name:
                raise AlreadyExists(f"fuse: layer {layer_id} is already attached")
            slot = self._next_slot
            self._next_slot += 1
            self.ops.add(Attached(LayerTree(layer_id, slot, index), layer))
        if self.server is not None:
            read = self.readpath.read

            async def stream(name: str, offset: int, size: int) -> bytes:
                return await read(layer, offset, size)

            self.server.add(layer_id, layer.size, stream, functools.partial(held_parts, layer),
                            lambda: not layer.prefetching_profile)
        return self.mountpoint / layer_id

    def detach(self, layer_id: str) -> Layer:
        """Stop serving a layer; its open files and cached inodes then fail with ESTALE.

        Returns the layer's read-side state: its owner must still `ReadPath.close_layer()` it
        (in the trio thread) before closing its cache file. Blocking (the kernel drops the
        layer's dentry before it returns): call it from a worker thread, never the FUSE thread.
        """
        attached = self.ops.remove(layer_id)
        if attached is None:
            raise NotFound(f"fuse: layer {layer_id} is not attached")
        if self.server is not None:
            with contextlib.suppress(NotFound):
                self.server.remove(layer_id)
        elif self.running:
            with contextlib.suppress(OSError):  # not in the kernel's cache
                pyfuse3.invalidate_entry(pyfuse3.ROOT_INODE, os.fsencode(layer_id))
        return attached.layer

    def narrow_readahead(self) -> contextlib.AbstractContextManager[None]:
        """`BlobServer.narrow_readahead` in blob-server mode (nothing in FUSE-tree mode)."""
        if self.server is None:
            return contextlib.nullcontext()
        return self.server.narrow_readahead()

    def warm(self, layer: Layer, blocks: list[int]) -> None:
        """Blob-server mode: bring these fetched blocks of `layer` into the kernel's page cache
        (the FUSE thread; nothing in FUSE-tree mode, whose files the kernel asks for anyway)."""
        if self.server is not None and blocks:
            bs = layer.cache.block_size
            self.server.warm(layer.name, blocks[0] * bs, (blocks[-1] + 1 - blocks[0]) * bs)

    def layers(self) -> list[str]:
        return sorted(self.ops.by_name)

    def path(self, layer_id: str) -> Path:
        if self.mountpoint is None or layer_id not in self.ops.by_name:
            raise NotFound(f"fuse: layer {layer_id} is not attached")
        return self.mountpoint / layer_id


def held_parts(layer: Layer, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of stream bytes ``[start, end)`` whose blocks are on disk: what warming may
    ask for without fetching (measured: letting warming fetch the rest of each 1 MiB span made
    the scipy start fetch 78.6 MB instead of 66.1 and run slower, even with the background pass
    on). None while the layer records its start profile: the profile is the blocks the
    container's own reads touch, and warming would add their neighbours."""
    if layer.recording_profile:
        return []
    cache, bs = layer.cache, layer.cache.block_size
    parts: list[tuple[int, int]] = []
    for block in range(start // bs, -(-end // bs)):
        if not cache.has(block):
            continue
        lo, hi = max(start, block * bs), min(end, (block + 1) * bs)
        if parts and parts[-1][1] == lo:
            parts[-1] = (parts[-1][0], hi)
        else:
            parts.append((lo, hi))
    return parts
