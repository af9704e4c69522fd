"""pyfuse3 request handlers for the one clip mount.

The mount root (inode 1) lists the attached layers and `blobs`; `<mount>/<layer id>/` is a
layer's tree (see tree.py), and `<mount>/blobs/<layer id>` is the layer's whole uncompressed tar
stream as one read-only file: what an EROFS image generated from the layer's index uses as its
extra device, so that the kernel serves the tree and only missing stream bytes reach clip.
Everything is read-only. Handlers never block the trio loop on the network: a read miss
awaits the read path, which parks the task while other requests keep being served.

An exception other than FUSEError escaping a handler would end pyfuse3's main loop (and with it
the mount), so every handler maps unexpected errors to EIO and logs them.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from snapshotter.errors import ClipError
from snapshotter.fs.tree import IMMUTABLE_TIMEOUT, ORDINAL_MASK, SLOT_SHIFT, LayerTree, split_inode
from snapshotter.index import EntryType
from snapshotter.readpath import Layer, ReadPath
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
ROOT = pyfuse3.ROOT_INODE
#: Layer directories come and go; detach invalidates them, this bounds any leftover.
ROOT_ENTRY_TIMEOUT = 60.0
#: The kernel's largest FUSE READ: what stat reports as a stream's preferred I/O size, and
#: the span the blob server warms around a read (`LayerFS`; larger than a read-path block, see
#: `held_parts`).
BLOB_BLKSIZE = 1 << 20
#: `<mount>/blobs`: the directory of layer streams (slot 0 is the mount root's own slot).
BLOBS = "blobs"
BLOBS_INODE = 2
#: A layer's stream file is the last ordinal of its slot (no index has 2**40 - 1 entries).
BLOB_ORDINAL = ORDINAL_MASK


def _guard(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Count the request; map every unexpected error to EIO (see the module docstring)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        TELEMETRY.fuse_request(op)
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ClipError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    return wrapper


@dataclass(slots=True)
class Attached:
    """One attached layer: its presented tree and its read-side state."""

    tree: LayerTree
    layer: Layer


class ClipOperations(pyfuse3.Operations):  # type: ignore[misc]
    """Serves every attached layer from its index and the shared read path."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, readpath: ReadPath) -> None:
        super().__init__()
        self.readpath = readpath
        self.by_name: dict[str, Attached] = {}
        self.by_slot: dict[int, Attached] = {}
        self._lock = threading.Lock()
        self._dirs: dict[int, _Listing] = {}
        self._handles = itertools.count(1)

    # --- attachment (called from any thread) ----------------------------------------------------

    def add(self, attached: Attached) -> None:
        with self._lock:
            self.by_slot[attached.tree.slot] = attached
            self.by_name[attached.tree.name] = attached

    def remove(self, name: str) -> Attached | None:
        with self._lock:
            attached = self.by_name.pop(name, None)
            if attached is not None:
                del self.by_slot[attached.tree.slot]
            return attached

    # --- helpers --------------------------------------------------------------------------------

    def _resolve(self, inode: int) -> tuple[Attached, int]:
        slot, ordinal = split_inode(inode)
        attached = self.by_slot.get(slot)
        if attached is None or ordinal >= len(attached.tree.index):
            raise pyfuse3.FUSEError(errno.ESTALE)
        return attached, ordinal

    def _blob(self, inode: int) -> Attached | None:
        """The layer whose stream file `inode` is, or None when it is not a stream file."""
        slot, ordinal = split_inode(inode)
        if ordinal != BLOB_ORDINAL or slot == 0:
            return None
        attached = self.by_slot.get(slot)
        if attached is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return attached

    def _blob_attrs(self, attached: Attached) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = (attached.tree.slot << SLOT_SHIFT) | BLOB_ORDINAL
        a.st_mode = stat.S_IFREG | 0o444
        a.st_nlink = 1
        a.st_uid = a.st_gid = 0
        a.st_size = attached.layer.size
        a.st_blksize = BLOB_BLKSIZE
        a.st_blocks = -(-a.st_size // 512)
        a.entry_timeout = a.attr_timeout = ROOT_ENTRY_TIMEOUT
        return a

    def _blobs_attrs(self) -> pyfuse3.EntryAttributes:
        a = self._root_attrs()
        a.st_ino = BLOBS_INODE
        a.st_nlink = 2
        return a

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ROOT
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 3 + len(self.by_name)
        a.st_uid = a.st_gid = 0
        a.st_size = 0
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = 1.0
        return a

    def _layer_root_attrs(self, attached: Attached) -> pyfuse3.EntryAttributes:
        a = attached.tree.attrs(0)
        a.entry_timeout = ROOT_ENTRY_TIMEOUT
        return a

    # --- lookups and attributes -------------------------------------------------------------

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        sname = os.fsdecode(name)
        if parent_inode == ROOT:
            if sname in (".", ".."):
                return self._root_attrs()
            if sname == BLOBS:
                return self._blobs_attrs()
            attached = self.by_name.get(sname)
            if attached is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._layer_root_attrs(attached)
        if parent_inode == BLOBS_INODE:
            if sname == ".":
                return self._blobs_attrs()
            if sname == "..":
                return self._root_attrs()
            attached = self.by_name.get(sname)
            if attached is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._blob_attrs(attached)
        attached, dir_ordinal = self._resolve(parent_inode)
        tree = attached.tree
        if sname == ".":
            return tree.attrs(dir_ordinal)
        if sname == "..":
            if dir_ordinal == 0:
                return self._root_attrs()
            return tree.attrs(tree.index.entry(dir_ordinal).parent)
        found = tree.lookup(dir_ordinal, sname)
        if found is None:
            return _negative_entry()
        return tree.attrs(found)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attrs()
        if inode == BLOBS_INODE:
            return self._blobs_attrs()
        blob = self._blob(inode)
        if blob is not None:
            return self._blob_attrs(blob)
        attached, ordinal = self._resolve(inode)
        return attached.tree.attrs(ordinal)

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        attached, ordinal = self._resolve(inode)
        e = attached.tree.entry(ordinal)
        if e.type != EntryType.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(e.linkname)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inodes are computed, not allocated: nothing to release."""

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        layers = list(self.by_name.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(-(-a.layer.size // 4096) for a in layers)
        s.f_bfree = s.f_bavail = 0
        s.f_files = sum(len(a.tree.index) for a in layers) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- xattrs -----------------------------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, bytes]:
        if inode in (ROOT, BLOBS_INODE) or self._blob(inode) is not None:
            return {}
        attached, ordinal = self._resolve(inode)
        return attached.tree.xattrs(ordinal)

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self._xattrs(inode)]

    # --- directories ------------------------------------------------------------------------------

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the listing: readdir offsets are positions in it, stable for the handle."""
        if inode == ROOT:
            names = [(BLOBS, BLOBS_INODE), *((name, 0) for name in self.by_name)]
            listing = _Listing(None, sorted(names))
        elif inode == BLOBS_INODE:
            listing = _Listing(None, sorted((name, BLOB_ORDINAL) for name in self.by_name))
        else:
            if self._blob(inode) is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            attached, ordinal = self._resolve(inode)
            if not attached.tree.is_dir(ordinal):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            listing = _Listing(attached, attached.tree.listing(ordinal))
        fh = next(self._handles)
        self._dirs[fh] = listing
        return fh

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs[fh]
        for pos in range(start_id, len(listing.entries)):
            name, ordinal = listing.entries[pos]
            if listing.layer is None:
                if ordinal == BLOBS_INODE:
                    attrs = self._blobs_attrs()
                else:
                    attached = self.by_name.get(name)
                    if attached is None:  # detached since opendir
                        continue
                    attrs = (self._blob_attrs(attached) if ordinal == BLOB_ORDINAL
                             else self._layer_root_attrs(attached))
            else:
                attrs = listing.layer.tree.attrs(ordinal)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, pos + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # --- files ------------------------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self._blob(inode) is not None:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)
        attached, ordinal = self._resolve(inode)
        if attached.tree.entry(ordinal).type != EntryType.FILE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        blob = self._blob(fh)
        if blob is not None:
            size = min(size, blob.layer.size - off)
            if size <= 0:
                return b""
            return await self.readpath.read(blob.layer, off, size)
        attached, ordinal = self._resolve(fh)
        e = attached.tree.entry(ordinal)
        if off >= e.size or size <= 0:
            return b""
        size = min(size, e.size - off)
        return await self.readpath.read(attached.layer, e.uoff + off, size)

    async def release(self, fh: int) -> None:
        """File handles are inodes: nothing to release."""

    # --- everything that would modify a layer: EROFS ----------------------------------------

    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)


@dataclass(slots=True)
class _Listing:
    """An open directory: its layer (None for the mount root) and (name, ordinal) entries."""

    layer: Attached | None
    entries: Sequence[tuple[str, int]]


def _negative_entry() -> pyfuse3.EntryAttributes:
    """"No such name", in a form the kernel caches (inode 0 with an entry timeout).

    A plain ENOENT is not cached, and overlayfs looks every name up in each lower layer above
    the one that holds it, so a cold start would pay those misses again and again. Inside a
    layer nothing ever changes, so the miss is remembered as long as a positive entry; at the
    mount root (where layers come and go) lookups still answer ENOENT.
    """
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = 0
    attrs.entry_timeout = IMMUTABLE_TIMEOUT
    return attrs
