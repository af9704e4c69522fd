"""The EROFS image of one layer, generated from its clip index.

The image holds the layer's metadata only: inodes, directories, symlink targets and xattrs.
Every non-empty regular file is a ``FLAT_PLAIN`` inode whose block address lies in the range the
device table maps to *device 1*, the layer's uncompressed tar stream: block
``mapped_blkaddr + uoff / 512`` is the file's first data block there (tar data is 512-byte
aligned, so the image uses 512-byte blocks). docs/erofs.md describes the layout; the
presented tree is the one ``snapshotter.fs.tree`` presents over FUSE (whiteouts as char 0/0,
opaque markers as ``trusted.overlay.opaque=y``, hardlinks as one inode).

Building is one pass over the index's records in their (breadth-first) order, appending each
inode's bytes to one buffer as it is made; a directory's data is packed when it is placed, with
its children's ordinals where their nids go, and those are patched in once every nid is known
(``_finish``). Peak memory is the image plus a few bytes per entry (issue #15): records are
unpacked as the pass reaches them, never all kept. Regular files without xattrs and short
symlinks, nearly every entry of a real layer, are packed inline in that loop with one
``struct.pack`` each: the speed target is 50 ms per 10,000 entries in pure Python. Same index
and options, same bytes: nothing depends on time, randomness or dict order beyond the index's
own order.

``compact_mtime``: kernels 6.15+ give a 32-byte inode a time of its own (superblock epoch +
the inode's 32-bit i_mtime, with the superblock's fixed nanoseconds); 6.12-6.14 show every
compact inode with the superblock's time. With the option on, nearly every inode is compact
(the image is smaller); it must only be mounted where ``mount.probe_file_backed`` said the
kernel honours it. Off, a compact inode is used only where its mtime equals the superblock's,
which every kernel presents correctly.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import gc
import hashlib
import os
import stat
import struct
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from snapshotter.erofs import format as ef
from snapshotter.erofs.records import (
    CHILD_COUNT,
    FIRST_CHILD,
    GID,
    LINK_LEN,
    LINK_OFF,
    LINK_TARGET,
    MAJOR,
    MINOR,
    MODE,
    MTIME,
    MTIME_FIELD,
    NLINK,
    PARENT,
    SIZE,
    TYPE,
    UID,
    UOFF,
    X_COUNT,
    Record,
    Records,
)
from snapshotter.errors import InvalidArgument
from snapshotter.index import EntryType, LayerIndex

BLOCK = ef.BLOCK
WHITEOUT = b".wh."
META = b".wh..wh."
OPAQUE = b".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Where the first inode goes: right after the superblock and the one device slot.
FIRST_INODE = ef.SUPER_OFFSET + ef.SUPER_SIZE + ef.DEVT_SLOT_SIZE
DEVT_SLOTOFF = (ef.SUPER_OFFSET + ef.SUPER_SIZE) // ef.DEVT_SLOT_SIZE
#: Device 1 is mapped at the top of the 32-bit block address space, ending just below
#: EROFS_NULL_ADDR (a FLAT_PLAIN address the kernel reads as "no data"): its place depends on
#: the stream's size only, so every file's address is known before the image is laid out, and
#: the image may grow up to the device's first block.
MAPPED_END = ef.NULL_ADDR

_FILE, _DIR, _SYMLINK, _HARDLINK, _CHAR, _BLOCK, _FIFO = (int(t) for t in EntryType)
_IFMT = {_FILE: stat.S_IFREG, _DIR: stat.S_IFDIR, _SYMLINK: stat.S_IFLNK, _CHAR: stat.S_IFCHR,
         _BLOCK: stat.S_IFBLK, _FIFO: stat.S_IFIFO}
_FTYPE = {_FILE: ef.FT_REG, _DIR: ef.FT_DIR, _SYMLINK: ef.FT_LNK, _CHAR: ef.FT_CHR,
          _BLOCK: ef.FT_BLK, _FIFO: ef.FT_FIFO}
_U16, _U32 = 1 << 16, 1 << 32
#: Entry type code -> dirent file type (0 for hardlinks: a link shows its target's type).
_FTYPES = bytes(_FTYPE.get(t, 0) for t in range(256))
_ZERO32 = bytes(32)
_NAMEOFF = struct.Struct("<H")


class ErofsError(InvalidArgument):
    """The index holds something an EROFS image over the tar stream cannot express."""


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    size: int
    inodes: int
    blocks: int
    device_blocks: int


@dataclass
class _Image:
    data: bytearray
    inodes: int
    blocks: int
    device_blocks: int


def image_bytes(index: LayerIndex, *, compact_mtime: bool = False) -> bytes:
    """The image for ``index`` in memory (what ``write_image`` writes)."""
    return bytes(_build(index, compact_mtime).data)


def write_image(index: LayerIndex, path: Path, *, compact_mtime: bool = False) -> ImageInfo:
    """Write the image atomically: a temporary file in the same directory, fsynced, renamed
    over ``path``; on any failure nothing is left at ``path`` or beside it.

    ``compact_mtime=True`` only for kernels that honour compact inodes' own mtimes (6.15+;
    ``snapshotter.erofs.mount.probe_file_backed`` tells)."""
    image = _build(index, compact_mtime)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 is for secrets; an image is not one
            f.write(image.data)  # the build's own buffer: no copy of the image
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return ImageInfo(path, len(image.data), image.inodes, image.blocks, image.device_blocks)


def _build(index: LayerIndex, compact_mtime: bool) -> _Image:
    """One build with the cyclic garbage collector paused: the build allocates a tuple or two per
    entry (records, directory entries, short-lived) and no reference cycles, and collections
    that rescan them all cost ~15% of the build time. The collector's previous state is
    restored (another thread's build may have paused it: only the one that found it on turns it
    on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _Writer(index, compact_mtime).build()
    finally:
        if was_enabled:
            gc.enable()


_PLAIN = ef.LAYOUT_FLAT_PLAIN << 1
_INLINE = ef.LAYOUT_FLAT_INLINE << 1
_NS = 1_000_000_000
_LINK_MODE = stat.S_IFLNK | 0o777
#: Symlink targets shorter than this always fit a block with an extended inode.
_SHORT_LINK = BLOCK - 64

#: A directory entry until nids exist: (name, ref, type); ref >= 0 is an ordinal's own inode,
#: ref < 0 the whiteout inode of ordinal ~ref.
Dirent = tuple[bytes, int, int]


#: A placed directory whose dirents still name ordinals: (nid, inode header + xattrs length
#: (the inline tail starts there), first block, inline tail length, blocks of dirents).
_Dir = tuple[int, int, int, int, int]
#: Added to a whiteout's ordinal in a dirent's nid field until nids are patched in.
_WH_REF = 1 << 32


class _Writer:
    """One build: inodes are laid out in index (breadth-first) order as they are made, so
    every nid is known by the time the directories' entries are written (``_finish``)."""

    def __init__(self, index: LayerIndex, compact_mtime: bool) -> None:
        self.index = index
        self.compact_mtime = compact_mtime
        self.rec = Records(index)
        self.device_blocks = -(-index.uncompressed_size // BLOCK)
        if self.device_blocks >= MAPPED_END:
            self.fail(0, f"the tar stream ({index.uncompressed_size} bytes) is beyond 2^32 "
                         "blocks of 512 bytes")
        self.mapped_blkaddr = MAPPED_END - self.device_blocks
        self.out = bytearray(FIRST_INODE)  # the image, inode by inode, then patched in place
        self.pos = FIRST_INODE
        self.inodes = 0
        self.nid = array("q", [-1]) * len(index)
        self.whiteout_nid: dict[int, int] = {}
        self.dirs: list[_Dir] = []

    def fail(self, ordinal: int, reason: str) -> NoReturn:
        path = self.index.entry(ordinal).path or "/"
        raise ErofsError(f"layer {self.index.blob_digest}: entry {path!r}: {reason}")

    # -- the walk ---------------------------------------------------------------------------

    def build(self) -> _Image:
        names = self.rec.names
        for ordinal, name in enumerate(names):
            if len(name) > ef.NAME_LEN:
                self.fail(ordinal, f"name is {len(name)} bytes (EROFS allows {ef.NAME_LEN})")
        self._times()
        epoch, fixed, span = self.epoch, self.fixed_nsec, self.span
        owners = self.rec.link_owners()
        special = {o for o, name in enumerate(names) if name[:4] == WHITEOUT and o}
        self.shown = self._whiteouts_shown(special)
        self.ftypes = self.rec.types.translate(_FTYPES)
        self.links = {o: self.rec.record(o)[LINK_TARGET] for o in self.rec.hardlinks()}
        out, nids = self.out, self.nid
        compact, extended = ef.COMPACT_INODE.pack, ef.EXTENDED_INODE.pack
        base, stream = self.mapped_blkaddr, self.index.uncompressed_size
        pos, ino = self.pos, self.inodes
        strings = self.rec.string(0, self.rec.strings_len)
        for o, r in enumerate(self.rec):
            (_po, _pl, _nl, _parent, etype, mode, uid, gid, size, mtime, uoff, link_off,
             link_len, target, nlink, _ma, _mi, _xf, xcount, _fc, _cc, _cf) = r
            if etype == _FILE and not xcount and o not in special:  # the common case, inline
                if nlink > 1:
                    uid, gid = owners.get(o, (uid, gid))
                ino += 1
                mode = stat.S_IFREG | (mode & 0o7777)
                blkaddr = 0
                if size:
                    if uoff & (BLOCK - 1) or uoff + size > stream:
                        self._bad_data(o, uoff, size)
                    blkaddr = base + (uoff >> ef.BLKSZBITS)
                rel = mtime // _NS - epoch
                if mtime % _NS != fixed or not 0 <= rel < span or uid >= _U16 or gid >= _U16 \
                        or nlink >= _U16 or size >= _U32:
                    sec, nsec = divmod(mtime, _NS)
                    blob = extended(_PLAIN | 1, 0, mode, 0, size, blkaddr, ino, uid, gid, sec,
                                    nsec, nlink)
                    if pos % BLOCK == BLOCK - 32:  # a 64-byte inode never straddles blocks
                        out += _ZERO32
                        pos += 32
                else:
                    blob = compact(_PLAIN, 0, mode, nlink, size, rel, blkaddr, ino, uid, gid)
                nids[o] = pos >> 5
                out += blob
                pos += len(blob)
                continue
            if etype == _SYMLINK and 0 < link_len < _SHORT_LINK and not xcount \
                    and o not in special:  # a short symlink: the target inline (FLAT_INLINE)
                if nlink > 1:
                    uid, gid = owners.get(o, (uid, gid))
                ino += 1
                link = strings[link_off : link_off + link_len]
                rel = mtime // _NS - epoch
                if mtime % _NS != fixed or not 0 <= rel < span or uid >= _U16 or gid >= _U16 \
                        or nlink >= _U16:
                    sec, nsec = divmod(mtime, _NS)
                    blob = extended(_INLINE | 1, 0, _LINK_MODE, 0, link_len, 0, ino, uid, gid,
                                    sec, nsec, nlink) + link
                else:
                    blob = compact(_INLINE, 0, _LINK_MODE, nlink, link_len, rel, 0, ino, uid,
                                   gid) + link
                if len(blob) > BLOCK - pos % BLOCK:  # inode and target within one block
                    out += bytes(-pos % BLOCK)
                    pos += -pos % BLOCK
                nids[o] = pos >> 5
                blob += bytes(-len(blob) % 32)
                out += blob
                pos += len(blob)
                continue
            if etype == _HARDLINK:
                if target < 0:
                    self.fail(o, "hardlink without a target in the layer")
                if o in self.shown:  # a whiteout name is a whiteout, whatever the entry is
                    self.pos, self.inodes = pos, ino
                    self._put_whiteout(o, r)
                    pos, ino = self.pos, self.inodes
                continue
            self.pos, self.inodes = pos, ino
            self._other(o, r, o in special, owners)
            pos, ino = self.pos, self.inodes
        self.pos, self.inodes = pos, ino
        return self._finish()

    def _times(self) -> None:
        """Choose the superblock's time (``epoch`` seconds, ``fixed_nsec``) and ``span``: an
        mtime fits a compact inode when its nanoseconds are ``fixed_nsec`` and its second is in
        [epoch, epoch + span) (``_rel``). No table of the layer's mtimes is kept: a layer may
        have one per entry (50,000 ints and a dict, ~4 MB, for the whole build).

        Without compact mtimes: the most common mtime, and only it is compact (i_mtime 0).
        With them: the most common nanoseconds, then the 2^32-second window of seconds holding
        most of the mtimes with those nanoseconds (in practice all of them)."""
        counts = Counter(self.rec.column(MTIME_FIELD))
        if not self.compact_mtime:
            common = counts.most_common(1)[0][0]
            self.epoch, self.fixed_nsec = divmod(common, _NS)
            self.span = 1
            return
        per_nsec: Counter[int] = Counter()
        for mtime, n in counts.items():
            per_nsec[mtime % _NS] += n
        self.fixed_nsec = nsec = min(per_nsec, key=lambda k: (-per_nsec[k], k))
        self.epoch = _densest_window(sorted(
            (mtime // _NS, n) for mtime, n in counts.items() if mtime % _NS == nsec))
        self.span = _U32

    def _rel(self, mtime: int) -> int:
        """A compact inode's i_mtime for ``mtime`` (seconds after the epoch), or -1 where the
        inode needs the extended form for its time."""
        sec, ns = divmod(mtime, _NS)
        rel = sec - self.epoch
        return rel if ns == self.fixed_nsec and 0 <= rel < self.span else -1

    def _bad_data(self, o: int, uoff: int, size: int) -> NoReturn:
        if uoff & (BLOCK - 1):
            self.fail(o, f"data offset {uoff} in the tar stream is not 512-byte aligned")
        self.fail(o, f"data [{uoff}, {uoff + size}) lies beyond the tar stream "
                     f"({self.index.uncompressed_size} bytes)")

    def _whiteouts_shown(self, special: set[int]) -> set[int]:
        """Ordinals of the ``.wh.NAME`` entries presented as NAME (no real NAME beside them)."""
        record, names = self.rec.record, self.rec.names
        out = set()
        for ordinal in special:
            name = names[ordinal]
            if name.startswith(META):
                continue
            real = name[len(WHITEOUT):]
            parent = record(record(ordinal)[PARENT])
            lo = parent[FIRST_CHILD]
            hi = lo + parent[CHILD_COUNT]
            i = bisect.bisect_left(names, real, lo, hi)
            if real and not (i < hi and names[i] == real):
                out.add(ordinal)
        return out

    def _other(self, o: int, r: Record, special: bool,
               owners: dict[int, tuple[int, int]]) -> None:
        """Every inode but a plain regular file: whiteouts, directories, symlinks, devices,
        fifos, files with xattrs or under a ``.wh.`` name."""
        etype = r[TYPE]
        # Directories always get their inode (children name it as ".."), and so does anything
        # a hardlink shares, even under a name that is itself not shown.
        needed = etype == _DIR or r[NLINK] > 1
        if special:
            if o in self.shown:
                self._put_whiteout(o, r)
            if not needed:
                return
        uid, gid = owners.get(o, (r[UID], r[GID]))
        perms = 0o777 if etype == _SYMLINK else r[MODE] & 0o7777
        mode = _IFMT[etype] | perms
        nlink = max(r[NLINK], 1)
        xattrs = self._xattrs(o, etype == _DIR) if r[X_COUNT] or etype == _DIR else b""
        if etype == _FILE and r[SIZE]:
            self._mapped(o, r, mode, nlink, uid, gid, xattrs)
        elif etype == _SYMLINK:
            self._symlink(o, r, mode, nlink, uid, gid, xattrs)
        elif etype == _DIR:
            self._directory(o, r, mode, nlink, uid, gid, xattrs)
        else:
            rdev = 0
            if etype in (_CHAR, _BLOCK):
                if r[MAJOR] >= 1 << 12 or r[MINOR] >= 1 << 20:
                    self.fail(o, f"device {r[MAJOR]}:{r[MINOR]} does not fit EROFS's 12-bit "
                                 "major and 20-bit minor")
                rdev = ef.encode_rdev(r[MAJOR], r[MINOR])
            self.nid[o] = self._put(
                self._header(_PLAIN, mode, nlink, 0, rdev, uid, gid, r[MTIME], xattrs))

    def _put_whiteout(self, o: int, r: Record) -> None:
        """What containerd's applier makes of ``.wh.NAME``: NAME as a character device 0/0
        with permission bits 0 and the whiteout entry's own owner and time."""
        self.whiteout_nid[o] = self._put(
            self._header(_PLAIN, stat.S_IFCHR, 1, 0, 0, r[UID], r[GID], r[MTIME], b""))

    def _header(self, layout: int, mode: int, nlink: int, size: int, iu: int, uid: int,
                gid: int, mtime: int, xattrs: bytes) -> bytes:
        """An inode header followed by its xattr body. A 32-byte inode has 16-bit
        uid/gid/nlink, a 32-bit size and only the times ``_times`` allows; anything else
        needs the 64-byte form."""
        self.inodes += 1
        icount = (len(xattrs) - 12) // 4 + 1 if xattrs else 0
        if not self._compact(mtime, uid, gid, nlink, size):
            sec, nsec = divmod(mtime, _NS)
            return ef.EXTENDED_INODE.pack(layout | 1, icount, mode, 0, size, iu, self.inodes,
                                          uid, gid, sec, nsec, nlink) + xattrs
        return ef.COMPACT_INODE.pack(layout, icount, mode, nlink, size, self._rel(mtime), iu,
                                     self.inodes, uid, gid) + xattrs

    def _put(self, blob: bytes, need: int = 0) -> int:
        """Append an inode record (padded here to 32 bytes); returns its nid. Its first
        ``need`` bytes (at least the header) must not straddle a block boundary."""
        need = max(need, 64 if blob[0] & 1 else 32)
        room = BLOCK - self.pos % BLOCK
        if need > room:
            self.out += bytes(room)
            self.pos += room
        nid = self.pos >> 5
        blob += bytes(-len(blob) % 32)
        self.out += blob
        self.pos += len(blob)
        return nid

    def _put_blocks(self, data: bytes) -> int:
        """Append whole blocks (data zero-padded to a block multiple); returns the first
        block's address."""
        self.out += bytes(-self.pos % BLOCK)
        blkaddr = len(self.out) // BLOCK
        self.out += data
        self.out += bytes(-len(data) % BLOCK)
        self.pos = len(self.out)
        return blkaddr

    def _mapped(self, o: int, r: Record, mode: int, nlink: int, uid: int, gid: int,
                xattrs: bytes) -> None:
        """A regular file with data (and xattrs): FLAT_PLAIN at its block of device 1."""
        size, uoff = r[SIZE], r[UOFF]
        if uoff % BLOCK or uoff + size > self.index.uncompressed_size:
            self._bad_data(o, uoff, size)
        blkaddr = self.mapped_blkaddr + uoff // BLOCK
        self.nid[o] = self._put(self._header(_PLAIN, mode, nlink, size, blkaddr, uid, gid,
                                             r[MTIME], xattrs))

    def _symlink(self, o: int, r: Record, mode: int, nlink: int, uid: int, gid: int,
                 xattrs: bytes) -> None:
        target = self.rec.string(r[LINK_OFF], r[LINK_LEN])
        self.nid[o] = self._flat(target, (mode, nlink, uid, gid, r[MTIME], xattrs))[0]

    def _flat(self, payload: bytes, attrs: tuple[int, int, int, int, int, bytes],
              ) -> tuple[int, int, int, int]:
        """Place a FLAT inode: full blocks first (block aligned), then the inode with the last
        partial block inline (FLAT_INLINE) when inode, xattrs and tail fit in one block,
        otherwise every byte in blocks (FLAT_PLAIN). Returns (nid, inode header + xattrs
        length, first block, inline tail length)."""
        mode, nlink, uid, gid, mtime, xattrs = attrs
        size = len(payload)
        tail = size % BLOCK
        isize = 32 if self._compact(mtime, uid, gid, nlink, size) else 64
        if tail and isize + len(xattrs) + tail > BLOCK:
            tail = 0
        full = size - tail
        blkaddr = self._put_blocks(payload[:full]) if full else 0
        head = self._header(_INLINE if tail else _PLAIN, mode, nlink, size, blkaddr, uid, gid,
                            mtime, xattrs)
        nid = self._put(head + payload[full:], len(head) + tail)
        return nid, len(head), blkaddr, tail

    def _compact(self, mtime: int, uid: int, gid: int, nlink: int, size: int) -> bool:
        return not (self._rel(mtime) < 0 or uid >= _U16 or gid >= _U16 or nlink >= _U16
                    or size >= _U32)

    def _directory(self, o: int, r: Record, mode: int, nlink: int, uid: int, gid: int,
                   xattrs: bytes) -> None:
        entries = self._dirents(o, r)
        size = 12 * len(entries) + sum([len(e[0]) for e in entries])
        if size <= BLOCK:  # most directories: one block, no packing to work out
            counts = [len(entries)]
        else:
            counts, size = _blocks_of(entries)
        data = _dir_data(entries, counts)
        nid, head, blkaddr, tail = self._flat(data, (mode, nlink, uid, gid, r[MTIME], xattrs))
        self.nid[o] = nid
        self.dirs.append((nid, head, blkaddr, tail, len(counts)))

    def _dirents(self, o: int, r: Record) -> list[Dirent]:
        """The directory's presented entries, sorted by name bytes (as EROFS requires)."""
        names, shown, links, ftypes = self.rec.names, self.shown, self.links, self.ftypes
        entries: list[Dirent] = [(b".", o, ef.FT_DIR), (b"..", r[PARENT], ef.FT_DIR)]
        lo = r[FIRST_CHILD]
        unsorted = False
        for child in range(lo, lo + r[CHILD_COUNT]):
            name = names[child]
            if name[:4] == WHITEOUT:
                if child in shown:
                    entries.append((name[4:], ~child, ef.FT_CHR))
                    unsorted = True
                continue
            ref = links.get(child, child)
            entries.append((name, ref, ftypes[ref]))
        if unsorted or (len(entries) > 2 and entries[2][0] < b".."):
            entries.sort(key=_first)
        return entries

    def _xattrs(self, ordinal: int, is_dir: bool) -> bytes:
        """The inline xattr body: a 12-byte header, then entries of (name index, suffix, value),
        each padded to 4 bytes, sorted by (index, suffix) for determinism."""
        xattrs = {k.encode("utf-8", "surrogateescape"): v
                  for k, v in self.index.entry(ordinal).xattrs.items()}
        if is_dir and self._opaque(ordinal):
            xattrs[OPAQUE_XATTR.encode()] = b"y"
        if not xattrs:
            return b""
        entries = []
        for name, value in xattrs.items():
            index, suffix = _xattr_name(name)
            if index == 0:
                self.fail(ordinal, f"xattr {name!r} is in no namespace EROFS can store "
                                   "(user., trusted., security., system.posix_acl_*)")
            if len(suffix) > 255 or len(value) >= _U16:
                self.fail(ordinal, f"xattr {name!r} is too long for EROFS (name suffix "
                                   "<= 255 bytes, value < 64 KiB)")
            entries.append((index, suffix, value))
        entries.sort()
        body = [ef.XATTR_IBODY_HEADER.pack(0, 0)]
        for index, suffix, value in entries:
            raw = ef.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
            body.append(raw + bytes(-len(raw) % 4))
        out = b"".join(body)
        if (len(out) - 12) // 4 + 1 >= _U16:
            self.fail(ordinal, f"xattrs take {len(out)} bytes, more than an EROFS inode holds")
        return out

    def _opaque(self, ordinal: int) -> bool:
        r = self.rec.record(ordinal)
        lo, hi = r[FIRST_CHILD], r[FIRST_CHILD] + r[CHILD_COUNT]
        names = self.rec.names
        i = bisect.bisect_left(names, OPAQUE, lo, hi)
        return i < hi and names[i] == OPAQUE

    # -- bytes ------------------------------------------------------------------------------

    def _finish(self) -> _Image:
        blocks = -(-self.pos // BLOCK)
        if blocks > self.mapped_blkaddr:
            self.fail(0, f"the image ({blocks} blocks) and the tar stream "
                         f"({self.device_blocks} blocks) do not fit EROFS's 32-bit block "
                         "addresses together")
        out = self.out
        out += bytes(blocks * BLOCK - self.pos)
        for nid, head, blkaddr, tail, blocks_of_dir in self.dirs:
            for n in range(blocks_of_dir):
                if tail and n == blocks_of_dir - 1:
                    self._patch_nids(out, (nid << 5) + head)
                else:
                    self._patch_nids(out, (blkaddr + n) * BLOCK)
        self._superblock(out, blocks)
        self._checksum(out)
        return _Image(out, self.inodes, blocks, self.device_blocks)

    def _patch_nids(self, out: bytearray, start: int) -> None:
        """Put the nids into the dirents of the directory block at ``start`` (its first
        dirent's name offset tells how many there are), in place of the ordinals
        ``_dir_data`` wrote there."""
        nids, wh = self.nid, self.whiteout_nid
        dirents = _dirents_struct(_NAMEOFF.unpack_from(out, start + 8)[0] // 12)
        fields = list(dirents.unpack_from(out, start))
        fields[::3] = [nids[ref] if ref < _WH_REF else wh[ref - _WH_REF]
                       for ref in fields[::3]]
        dirents.pack_into(out, start, *fields)

    def _superblock(self, out: bytearray, blocks: int) -> None:
        uuid = hashlib.sha256(b"clip-erofs\0" + self.index.digest.encode()).digest()[:16]
        ef.SUPER.pack_into(
            out, ef.SUPER_OFFSET, ef.MAGIC, 0, ef.COMPAT_SB_CHKSUM, ef.BLKSZBITS, 0,
            self.nid[0], self.inodes, self.epoch, self.fixed_nsec, blocks, 0, 0, uuid, b"clip",
            ef.INCOMPAT_DEVICE_TABLE, 0, 1, DEVT_SLOTOFF, 0, 0, 0, 0,
        )
        tag = bytes.fromhex(self.index.blob_digest.removeprefix("sha256:"))
        ef.DEVICE_SLOT.pack_into(out, DEVT_SLOTOFF * ef.DEVT_SLOT_SIZE, tag,
                                 self.device_blocks, self.mapped_blkaddr)

    @staticmethod
    def _checksum(out: bytearray) -> None:
        """crc32c (kernel convention: seed ~0, no final inversion) of the superblock's block
        from the superblock on (512 bytes here), with the checksum field zero."""
        crc = ef.crc32c_raw(0xFFFFFFFF, bytes(out[ef.SUPER_OFFSET : ef.SUPER_OFFSET + BLOCK]))
        out[ef.SUPER_OFFSET + 4 : ef.SUPER_OFFSET + 8] = crc.to_bytes(4, "little")


@functools.lru_cache(maxsize=64)
def _dirents_struct(count: int) -> struct.Struct:
    """``count`` dirents (nid, nameoff, file type, reserved) packed by one call."""
    return struct.Struct("<" + "QHBx" * count)


def _dir_data(entries: list[Dirent], counts: list[int]) -> bytes:
    """A directory's data, made as soon as its entries are known (their nids are not yet:
    each dirent's nid field holds its ordinal, or ``_WH_REF`` + the ordinal of a whiteout, for
    ``_Writer._patch_nids``): blocks of dirents (nid, name offset, type) followed by their
    names; every block but the last padded with zeros to 512 bytes."""
    out = []
    start = 0
    for n, count in enumerate(counts):
        block = entries[start : start + count]
        start += count
        nameoff = 12 * count
        args: list[int] = []
        for name, ref, ftype in block:
            args += (ref if ref >= 0 else _WH_REF + ~ref, nameoff, ftype)
            nameoff += len(name)
        raw = _dirents_struct(count).pack(*args) + b"".join([e[0] for e in block])
        if n + 1 < len(counts):
            raw += bytes(BLOCK - len(raw))
        out.append(raw)
    return b"".join(out)


def _blocks_of(entries: list[Dirent]) -> tuple[list[int], int]:
    """(entries per block, data size) of a directory: entries fill blocks in order, none split
    across a block boundary."""
    counts = []
    used = count = 0
    for name, _ref, _type in entries:
        need = 12 + len(name)
        if used + need > BLOCK:
            counts.append(count)
            used = count = 0
        used += need
        count += 1
    counts.append(count)
    return counts, BLOCK * (len(counts) - 1) + used


def _densest_window(seconds: list[tuple[int, int]]) -> int:
    """The first second of the 2^32-second window holding the most entries; ``seconds`` is
    sorted (second, entries) with distinct seconds."""
    best = total = lo = 0
    start = seconds[0][0]
    for sec, n in seconds:
        total += n
        while sec - seconds[lo][0] >= _U32:
            total -= seconds[lo][1]
            lo += 1
        if total > best:
            best, start = total, seconds[lo][0]
    return start


def _first(entry: Dirent) -> bytes:
    return entry[0]


def _xattr_name(name: bytes) -> tuple[int, bytes]:
    """(EROFS name index, suffix) of a full xattr name; index 0 when no namespace fits."""
    whole = ef.XATTR_WHOLE_NAMES.get(name)
    if whole is not None:
        return whole, b""
    for prefix, index in ef.XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return 0, name
