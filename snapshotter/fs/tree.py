"""How one layer's index is presented as a directory tree an overlayfs lower can use.

- Inode numbers are `(slot << SLOT_SHIFT) | ordinal`: stable for the life of the mount, no table.
  A hardlink entry has no inode of its own; it is its target's inode, whose nlink counts it.
- OCI whiteouts `.wh.NAME` appear as `NAME`, a character device 0/0 with permission bits 0 and the
  whiteout's owner — what containerd's overlay applier creates with mknod. If the layer also has a
  real `NAME`, the real entry wins (tar order within one layer makes the whiteout moot).
- Opaque markers `.wh..wh..opq` (and any other `.wh..wh.*` AUFS meta entry) are hidden; the
  directory holding an opaque marker carries `trusted.overlay.opaque = y`.
- A hardlinked inode's owner is the last hardlink entry's uid/gid, as containerd's applier
  leaves it (it lchowns each link entry's path, i.e. the shared inode); see
  ``snapshotter.erofs.records.link_owners``. The EROFS image presents the same.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable

import pyfuse3

from snapshotter.erofs.records import link_owners
from snapshotter.index import Entry, EntryType, LayerIndex

SLOT_SHIFT = 40
ORDINAL_MASK = (1 << SLOT_SHIFT) - 1
WHITEOUT_PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Layers are immutable: let the kernel keep entries and attributes for a day.
IMMUTABLE_TIMEOUT = 86400.0
BLKSIZE = 128 * 1024

_TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}


def split_inode(inode: int) -> tuple[int, int]:
    """inode -> (slot, ordinal)."""
    return inode >> SLOT_SHIFT, inode & ORDINAL_MASK


def is_whiteout(name: str) -> bool:
    return name.startswith(WHITEOUT_PREFIX) and not name.startswith(META_PREFIX)


class LayerTree:
    """The presented tree of one attached layer (all lookups are index lookups)."""

    def __init__(self, name: str, slot: int, index: LayerIndex) -> None:
        self.name = name
        self.slot = slot
        self.index = index
        self.base = slot << SLOT_SHIFT
        # Decoding an entry costs more than building its attributes: keep the hot ones.
        self._entry: Callable[[int], Entry] = functools.lru_cache(maxsize=4096)(index.entry)
        self._owners: dict[int, tuple[int, int]] | None = None

    def owner(self, target: int, e: Entry) -> tuple[int, int]:
        """(uid, gid) of the inode of entry ``target`` (``e``): its own unless hardlinks share
        it, then the last link entry's. The links are found once per layer, on the first
        hardlinked inode asked about."""
        if e.nlink <= 1 or e.type == EntryType.DIR:
            return e.uid, e.gid
        if self._owners is None:
            self._owners = link_owners(self.index)
        return self._owners.get(target, (e.uid, e.gid))

    def inode(self, ordinal: int) -> int:
        return self.base | self.target(ordinal)

    def target(self, ordinal: int) -> int:
        """The ordinal whose data and inode an entry shares (itself unless a hardlink)."""
        e = self._entry(ordinal)
        if e.type == EntryType.HARDLINK and e.link_target >= 0:
            return e.link_target
        return ordinal

    def entry(self, ordinal: int) -> Entry:
        return self._entry(self.target(ordinal))

    def lookup(self, dir_ordinal: int, name: str) -> int | None:
        """Ordinal of the entry presented as `name` in a directory (a whiteout's own ordinal)."""
        if name.startswith(WHITEOUT_PREFIX):
            return None
        found = self.index.child(dir_ordinal, name)
        if found is None:
            found = self.index.child(dir_ordinal, WHITEOUT_PREFIX + name)
        return found

    def listing(self, dir_ordinal: int) -> list[tuple[str, int]]:
        """(presented name, ordinal) of a directory, in the index's stable order."""
        out: list[tuple[str, int]] = []
        for ordinal in self.index.children(dir_ordinal):
            name = self._entry(ordinal).name
            if name.startswith(META_PREFIX):
                continue
            if is_whiteout(name):
                shown = name[len(WHITEOUT_PREFIX) :]
                if not shown or self.index.child(dir_ordinal, shown) is not None:
                    continue
                name = shown
            out.append((name, ordinal))
        return out

    def is_dir(self, ordinal: int) -> bool:
        return self._entry(ordinal).type == EntryType.DIR

    def _whiteout(self, ordinal: int) -> bool:
        return ordinal != 0 and is_whiteout(self._entry(ordinal).name)

    def attrs(self, ordinal: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        own = self._entry(ordinal)
        target = ordinal
        if own.type == EntryType.HARDLINK and own.link_target >= 0:
            target = own.link_target
        e = own if target == ordinal else self._entry(target)
        a.st_ino = self.base | target
        a.generation = 0
        a.entry_timeout = IMMUTABLE_TIMEOUT
        a.attr_timeout = IMMUTABLE_TIMEOUT
        whiteout = ordinal != 0 and is_whiteout(own.name)
        if whiteout:  # its own owner and time, even if the entry is a hardlink
            e = own
            a.st_mode = stat.S_IFCHR
            a.st_nlink = 1
            a.st_rdev = 0
            a.st_size = 0
        else:
            perms = 0o777 if e.type == EntryType.SYMLINK else e.mode & 0o7777  # as Linux shows
            a.st_mode = _TYPE_BITS[e.type] | perms
            a.st_nlink = max(e.nlink, 1)
            a.st_rdev = os.makedev(e.devmajor, e.devminor)
            a.st_size = self._size(e)
        a.st_uid, a.st_gid = (e.uid, e.gid) if whiteout else self.owner(target, e)
        a.st_blksize = BLKSIZE
        a.st_blocks = -(-a.st_size // 512)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    @staticmethod
    def _size(e: Entry) -> int:
        if e.type == EntryType.FILE:
            return e.size
        if e.type == EntryType.SYMLINK:
            return len(os.fsencode(e.linkname))
        return 0

    def xattrs(self, ordinal: int) -> dict[str, bytes]:
        if self._whiteout(ordinal):
            return {}
        e = self.entry(ordinal)
        out = dict(e.xattrs)
        target = self.target(ordinal)
        if e.type == EntryType.DIR and self.index.child(target, OPAQUE_MARKER) is not None:
            out[OPAQUE_XATTR] = b"y"
        return out
