"""A small reader of the images clip writes: what ``clip index erofs --inspect`` prints, and
what the layout tests look at. It reads only what the writer produces (uncompressed FLAT
inodes, file data in the device table's mapped range, inline xattrs), and checks what it reads;
the kernel is the real reader. Times are read as kernels 6.15+ present them (a compact inode:
the superblock's epoch + its i_mtime, with the superblock's fixed nanoseconds); older kernels
ignore i_mtime, so ``Summary.compact_own_mtimes`` counts the inodes they would show wrongly."""

from __future__ import annotations

import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.erofs import format as ef
from snapshotter.erofs.writer import ErofsError


@dataclass(frozen=True)
class Inode:
    nid: int
    extended: bool
    layout: int
    mode: int
    nlink: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    rel_mtime: int  # a compact inode's i_mtime (seconds after the epoch); 0 when extended
    iu: int
    ino: int
    xattr_size: int

    @property
    def end_of_head(self) -> int:
        return (self.nid << 5) + (64 if self.extended else 32) + self.xattr_size


@dataclass(frozen=True)
class Summary:
    size: int
    blocks: int
    inodes: int
    root_nid: int
    epoch: int
    fixed_nsec: int
    checksum_ok: bool
    feature_compat: int
    feature_incompat: int
    devices: list[tuple[str, int, int]]  # (tag as hex, blocks, mapped_blkaddr)
    types: dict[str, int] = field(default_factory=dict)
    extended_inodes: int = 0
    compact_own_mtimes: int = 0  # compact inodes with i_mtime != 0: shown right by 6.15+ only
    inodes_with_xattrs: int = 0
    largest_dir: int = 0
    device_bytes: int = 0  # file data read from device 1 (the tar stream)


class Image:
    def __init__(self, data: bytes, origin: str = "image") -> None:
        self.data = data
        self.origin = origin
        if len(data) < ef.SUPER_OFFSET + ef.BLOCK:
            raise ErofsError(f"{origin}: too short for an EROFS image ({len(data)} bytes)")
        f = ef.SUPER.unpack_from(data, ef.SUPER_OFFSET)
        (magic, self.checksum, self.feature_compat, self.blkszbits, _ext, self.root_nid,
         self.inos, self.epoch, self.fixed_nsec, self.blocks, self.meta_blkaddr, _xattr_blkaddr,
         self.uuid, self.volume_name, self.feature_incompat, _algs, self.extra_devices,
         self.devt_slotoff, _dirblkbits, _npfx, _pfx_start, _packed) = f
        if magic != ef.MAGIC:
            raise ErofsError(f"{origin}: not an EROFS image (bad magic {magic:#x})")
        if self.blkszbits != ef.BLKSZBITS or self.meta_blkaddr != 0:
            raise ErofsError(f"{origin}: not an image clip wrote (block size "
                             f"{1 << self.blkszbits}, meta_blkaddr {self.meta_blkaddr})")

    @classmethod
    def open(cls, path: Path) -> Image:
        return cls(Path(path).read_bytes(), str(path))

    def checksum_ok(self) -> bool:
        block = bytearray(self.data[ef.SUPER_OFFSET : ef.SUPER_OFFSET + ef.BLOCK])
        block[4:8] = bytes(4)
        return bool(ef.crc32c_raw(0xFFFFFFFF, bytes(block)) == self.checksum)

    def devices(self) -> list[tuple[str, int, int]]:
        """(tag as hex, blocks, mapped_blkaddr) of each extra device."""
        out = []
        for i in range(self.extra_devices):
            tag, blocks, mapped = ef.DEVICE_SLOT.unpack_from(
                self.data, (self.devt_slotoff + i) * ef.DEVT_SLOT_SIZE)
            out.append((tag.rstrip(b"\0").hex(), blocks, mapped))
        return out

    def inode(self, nid: int) -> Inode:
        pos = nid << 5
        fmt = int.from_bytes(self.data[pos : pos + 2], "little")
        if fmt & 1:
            (_f, icount, mode, _r, size, iu, ino, uid, gid, sec, nsec,
             nlink) = ef.EXTENDED_INODE.unpack_from(self.data, pos)
            rel = 0
        else:
            (_f, icount, mode, nlink, size, rel, iu, ino, uid,
             gid) = ef.COMPACT_INODE.unpack_from(self.data, pos)
            sec, nsec = self.epoch + rel, self.fixed_nsec
        xsize = 12 + 4 * (icount - 1) if icount else 0
        return Inode(nid, bool(fmt & 1), (fmt >> 1) & 7, mode, nlink, size, uid, gid,
                     sec * 1_000_000_000 + nsec, rel, iu, ino, xsize)

    def flat_data(self, ino: Inode) -> bytes:
        if ino.layout == ef.LAYOUT_FLAT_PLAIN:
            start = ino.iu * ef.BLOCK
            return self.data[start : start + ino.size]
        if ino.layout != ef.LAYOUT_FLAT_INLINE:
            raise ErofsError(f"{self.origin}: nid {ino.nid} has no flat data")
        tail = ino.size % ef.BLOCK
        full = ino.size - tail
        start = ino.iu * ef.BLOCK
        return (self.data[start : start + full]
                + self.data[ino.end_of_head : ino.end_of_head + tail])

    def listdir(self, ino: Inode) -> list[tuple[bytes, int, int]]:
        """(name, nid, file type) of a directory, in on-disk order."""
        data = self.flat_data(ino)
        out = []
        for start in range(0, len(data), ef.BLOCK):
            block = data[start : start + ef.BLOCK]
            count = ef.DIRENT.unpack_from(block, 0)[1] // 12
            for i in range(count):
                nid, off, ftype = ef.DIRENT.unpack_from(block, 12 * i)
                if i + 1 < count:
                    name = block[off : ef.DIRENT.unpack_from(block, 12 * (i + 1))[1]]
                else:  # the last name ends at the block's end or its first zero byte
                    name = block[off:].split(b"\0", 1)[0]
                out.append((name, nid, ftype))
        return out

    def xattrs(self, ino: Inode) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        if not ino.xattr_size:
            return out
        pos = ino.end_of_head - ino.xattr_size + 12
        while pos < ino.end_of_head:
            name_len, index, value_size = ef.XATTR_ENTRY.unpack_from(self.data, pos)
            suffix = self.data[pos + 4 : pos + 4 + name_len]
            value = self.data[pos + 4 + name_len : pos + 4 + name_len + value_size]
            out[ef.XATTR_NAMES_BY_INDEX.get(index, b"?") + suffix] = value
            pos += 4 + name_len + value_size
            pos += -pos % 4
        return out

    def data_extent(self, ino: Inode) -> tuple[int, int]:
        """(device id, byte offset there) of a FLAT_PLAIN inode's data, mapped as the kernel
        maps it: an address in an extra device's [mapped_blkaddr, + blocks) is that device's."""
        if ino.layout != ef.LAYOUT_FLAT_PLAIN:
            raise ErofsError(f"{self.origin}: nid {ino.nid} is not FLAT_PLAIN")
        for device, (_tag, blocks, mapped) in enumerate(self.devices(), 1):
            if mapped and mapped <= ino.iu < mapped + blocks:
                return device, (ino.iu - mapped) * ef.BLOCK
        return 0, ino.iu * ef.BLOCK

    def walk(self) -> dict[bytes, Inode]:
        """path -> inode of everything reachable from the root (root is b"")."""
        root = self.inode(self.root_nid)
        out = {b"": root}
        todo = [(b"", root)]
        while todo:
            path, d = todo.pop()
            for name, nid, _ftype in self.listdir(d):
                if name in (b".", b".."):
                    continue
                child = self.inode(nid)
                p = path + b"/" + name if path else name
                out[p] = child
                if stat.S_ISDIR(child.mode):
                    todo.append((p, child))
        return out

    def summary(self) -> Summary:
        tree = self.walk()
        types: Counter[str] = Counter()
        for ino in tree.values():
            types[_TYPE_NAMES.get(stat.S_IFMT(ino.mode), "other")] += 1
        seen = {ino.nid: ino for ino in tree.values()}.values()
        dirs = [i for i in seen if stat.S_ISDIR(i.mode)]
        files = [i for i in seen if stat.S_ISREG(i.mode) and i.size]
        return Summary(
            size=len(self.data), blocks=self.blocks, inodes=self.inos, root_nid=self.root_nid,
            epoch=self.epoch, fixed_nsec=self.fixed_nsec, checksum_ok=self.checksum_ok(),
            feature_compat=self.feature_compat, feature_incompat=self.feature_incompat,
            devices=self.devices(), types=dict(sorted(types.items())),
            extended_inodes=sum(i.extended for i in seen),
            compact_own_mtimes=sum(i.rel_mtime != 0 for i in seen),
            inodes_with_xattrs=sum(bool(i.xattr_size) for i in seen),
            largest_dir=max((len(self.listdir(d)) - 2 for d in dirs), default=0),
            device_bytes=sum(i.size for i in files if self.data_extent(i)[0] == 1),
        )


_TYPE_NAMES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
               stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}
