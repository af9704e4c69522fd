"""The EROFS image of one layer, generated from its clip index.

The image holds the layer's metadata only: inodes, directories, symlink targets and xattrs.
Every non-empty regular file is a chunk-based inode with exactly one chunk whose index points
at the file's first data byte in *device 1*, the layer's uncompressed tar stream (tar data is
512-byte aligned, so the image uses 512-byte blocks). docs/erofs.md describes the layout; the
presented tree is the one ``snapshotter.fs.tree`` presents over FUSE (whiteouts as char 0/0,
opaque markers as ``trusted.overlay.opaque=y``, hardlinks as one inode).

Building is three passes over flat lists (no object per entry): what each inode is and how big
(``_plan``), where it goes (``_place``), and packing the bytes (``_pack``). Same index, same
bytes: nothing depends on time, randomness or dict order beyond the index's own order.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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
MAX_BLOCKS = 1 << 32

_FILE, _DIR, _SYMLINK, _HARDLINK, _CHAR, _BLOCK, _FIFO = (int(t) for t in EntryType)
_IFMT = {_FILE: stat.S_IFREG, _DIR: stat.S_IFDIR, _SYMLINK: stat.S_IFLNK, _CHAR: stat.S_IFCHR,
         _BLOCK: stat.S_IFBLK, _FIFO: stat.S_IFIFO}
_FTYPE = {_FILE: ef.FT_REG, _DIR: ef.FT_DIR, _SYMLINK: ef.FT_LNK, _CHAR: ef.FT_CHR,
          _BLOCK: ef.FT_BLK, _FIFO: ef.FT_FIFO}
_U16, _U32 = 1 << 16, 1 << 32


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
    data: bytes
    inodes: int
    blocks: int
    device_blocks: int


class _Inode:
    """One inode of the image (not per entry: hardlinks share, hidden entries have none)."""

    __slots__ = ("blkaddr", "extended", "fmt", "iu", "mode", "nid", "nlink", "ordinal",
                 "payload", "size", "tail", "uid_gid", "xattrs")

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.nid = 0
        self.blkaddr = 0
        self.payload = b""  # FLAT data (dir blocks, symlink target), full blocks + tail
        self.tail = 0  # bytes of payload kept inline after the inode (FLAT_INLINE)
        self.xattrs = b""


def image_bytes(index: LayerIndex) -> bytes:
    """The image for ``index`` in memory (what ``write_image`` writes)."""
    return _Writer(index).build().data


def write_image(index: LayerIndex, path: Path) -> ImageInfo:
    """Write the image atomically: a temporary file in the same directory, fsynced, renamed
    over ``path``; on any failure nothing is left at ``path`` or beside it."""
    image = _Writer(index).build()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_missing():
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return ImageInfo(path, len(image.data), image.inodes, image.blocks, image.device_blocks)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, FileNotFoundError)


class _Writer:
    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        self.rec = Records(index)
        self.device_blocks = -(-index.uncompressed_size // BLOCK)
        if self.device_blocks >= MAX_BLOCKS:
            self.fail(0, f"the tar stream ({index.uncompressed_size} bytes) is beyond 2^32 "
                         "blocks of 512 bytes")

    def fail(self, ordinal: int, reason: str) -> None:
        path = self.index.entry(ordinal).path or "/"
        raise ErofsError(f"layer {self.index.blob_digest}: entry {path!r}: {reason}")

    # -- what the tree holds ----------------------------------------------------------------

    def build(self) -> _Image:
        records, names = self.rec.records, self.rec.names
        for ordinal, name in enumerate(names):
            if len(name) > ef.NAME_LEN:
                self.fail(ordinal, f"name is {len(name)} bytes (EROFS allows {ef.NAME_LEN})")
        owners = self.rec.link_owners()
        self.build_time = Counter(r[MTIME] for r in records).most_common(1)[0][0]
        inodes: list[_Inode] = []
        natural: list[_Inode | None] = [None] * len(records)
        whiteout: dict[int, _Inode] = {}
        shown = self._whiteouts_shown(records, names)
        for ordinal, r in enumerate(records):
            etype = r[TYPE]
            if etype == _HARDLINK:
                if r[LINK_TARGET] < 0:
                    self.fail(ordinal, "hardlink without a target in the layer")
                continue
            # Directories always get their inode (their children name it as ".."), and so does
            # anything a hardlink shares, even under a name that is itself not shown.
            needed = etype == _DIR or r[NLINK] > 1
            if ordinal in shown:
                whiteout[ordinal] = self._whiteout(ordinal, r)
                inodes.append(whiteout[ordinal])
                if not needed:
                    continue
            elif not needed and names[ordinal].startswith(WHITEOUT):
                continue  # a hidden marker or a whiteout the real name overrides
            ino = self._natural(ordinal, r, owners.get(ordinal))
            natural[ordinal] = ino
            inodes.append(ino)
        self._directories(records, names, natural, whiteout)
        size = self._place(inodes)
        return _Image(self._pack(inodes, size), len(inodes), size // BLOCK, self.device_blocks)

    def _whiteouts_shown(self, records: list[Record], names: list[bytes]) -> set[int]:
        """Ordinals of the ``.wh.NAME`` entries presented as NAME (no real NAME beside them)."""
        out = set()
        for ordinal, name in enumerate(names):
            if ordinal and name.startswith(WHITEOUT) and not name.startswith(META):
                real = name[len(WHITEOUT):]
                parent = records[records[ordinal][PARENT]]
                lo = parent[FIRST_CHILD]
                i = bisect.bisect_left(names, real, lo, lo + parent[CHILD_COUNT])
                if real and not (i < lo + parent[CHILD_COUNT] and names[i] == real):
                    out.add(ordinal)
        return out

    def _whiteout(self, ordinal: int, r: Record) -> _Inode:
        ino = _Inode(ordinal)
        ino.mode, ino.nlink, ino.size, ino.iu = stat.S_IFCHR, 1, 0, 0
        ino.uid_gid = (r[UID], r[GID])
        ino.fmt = ef.LAYOUT_FLAT_PLAIN << 1
        ino.extended = self._extended(r[MTIME], r[UID], r[GID], 1, 0)
        return ino

    def _natural(self, ordinal: int, r: Record, owner: tuple[int, int] | None) -> _Inode:
        ino = _Inode(ordinal)
        etype = r[TYPE]
        perms = 0o777 if etype == _SYMLINK else r[MODE] & 0o7777
        ino.mode = _IFMT[etype] | perms
        ino.nlink = max(r[NLINK], 1)
        ino.uid_gid = owner if owner is not None else (r[UID], r[GID])
        ino.size, ino.iu, ino.fmt = 0, 0, ef.LAYOUT_FLAT_PLAIN << 1
        if etype == _FILE and r[SIZE]:
            self._chunked(ino, ordinal, r)
        elif etype == _SYMLINK:
            self._flat(ino, self.rec.string(r[LINK_OFF], r[LINK_LEN]))
        elif etype in (_CHAR, _BLOCK):
            if r[MAJOR] >= 1 << 12 or r[MINOR] >= 1 << 20:
                self.fail(ordinal, f"device {r[MAJOR]}:{r[MINOR]} does not fit EROFS's "
                                   "12-bit major and 20-bit minor")
            ino.iu = ef.encode_rdev(r[MAJOR], r[MINOR])
        if r[X_COUNT] or etype == _DIR:
            ino.xattrs = self._xattrs(ordinal, etype == _DIR)
        uid, gid = ino.uid_gid
        ino.extended = self._extended(r[MTIME], uid, gid, ino.nlink, r[SIZE])
        return ino

    def _extended(self, mtime: int, uid: int, gid: int, nlink: int, size: int) -> bool:
        """A 32-byte inode has no mtime of its own (it takes the superblock's build time) and
        16-bit uid/gid/nlink; anything else needs the 64-byte form."""
        return (mtime != self.build_time or uid >= _U16 or gid >= _U16 or nlink >= _U16
                or size >= _U32)

    def _chunked(self, ino: _Inode, ordinal: int, r: Record) -> None:
        size, uoff = r[SIZE], r[UOFF]
        if uoff % BLOCK:
            self.fail(ordinal, f"data offset {uoff} in the tar stream is not 512-byte aligned")
        blocks = -(-size // BLOCK)
        chunkbits = (blocks - 1).bit_length()
        if chunkbits > ef.CHUNK_BLKBITS_MAX:
            self.fail(ordinal, f"file of {size} bytes is larger than one EROFS chunk")
        ino.size = size
        ino.fmt = ef.LAYOUT_CHUNK_BASED << 1
        ino.iu = ef.CHUNK_FORMAT_INDEXES | chunkbits
        ino.blkaddr = uoff // BLOCK

    @staticmethod
    def _flat(ino: _Inode, payload: bytes) -> None:
        ino.payload = payload
        ino.size = len(payload)
        ino.tail = len(payload) % BLOCK
        ino.fmt = (ef.LAYOUT_FLAT_INLINE if ino.tail else ef.LAYOUT_FLAT_PLAIN) << 1

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
        r = self.rec.records[ordinal]
        lo, hi = r[FIRST_CHILD], r[FIRST_CHILD] + r[CHILD_COUNT]
        names = self.rec.names
        i = bisect.bisect_left(names, OPAQUE, lo, hi)
        return i < hi and names[i] == OPAQUE

    # -- directories ------------------------------------------------------------------------

    def _directories(self, records: list[Record], names: list[bytes],
                     natural: list[_Inode | None], whiteout: dict[int, _Inode]) -> None:
        """Each directory's sorted entry list, kept as (name, inode, type) until nids exist;
        its size (blocks of 512 bytes, entries never split) is known now."""
        self.dirs: list[tuple[_Inode, list[tuple[bytes, _Inode, int]], list[int]]] = []
        for ordinal, ino in enumerate(natural):
            if ino is None or records[ordinal][TYPE] != _DIR:
                continue
            r = records[ordinal]
            parent = natural[r[PARENT]]
            assert parent is not None
            entries = [(b".", ino, ef.FT_DIR), (b"..", parent, ef.FT_DIR)]
            lo = r[FIRST_CHILD]
            for child in range(lo, lo + r[CHILD_COUNT]):
                name = names[child]
                wh = whiteout.get(child)
                if wh is not None:
                    entries.append((name[len(WHITEOUT):], wh, ef.FT_CHR))
                    continue
                c = records[child]
                target = c[LINK_TARGET] if c[TYPE] == _HARDLINK else child
                cino = natural[target]
                if cino is None:
                    continue  # hidden: ``.wh..wh.*`` or an overridden whiteout
                entries.append((name, cino, _FTYPE[records[target][TYPE]]))
            entries.sort(key=_first)
            counts = []
            used = count = 0
            for name, _i, _t in entries:
                need = 12 + len(name)
                if used + need > BLOCK:
                    counts.append(count)
                    used = count = 0
                used += need
                count += 1
            counts.append(count)
            ino.size = BLOCK * (len(counts) - 1) + used
            ino.tail = used % BLOCK
            ino.fmt = (ef.LAYOUT_FLAT_INLINE if ino.tail else ef.LAYOUT_FLAT_PLAIN) << 1
            self.dirs.append((ino, entries, counts))

    # -- where everything goes --------------------------------------------------------------

    def _place(self, inodes: list[_Inode]) -> int:
        """Give every inode its nid and every flat payload its blocks; returns the image size.

        Inodes follow each other 32-byte aligned from just after the superblock; an inode
        with inline data is kept whole inside one block (moved to the next block when it does
        not fit; stored FLAT_PLAIN when even a whole block is too small), and no inode header
        straddles a block. Full blocks of directories and long symlinks come after all
        inodes."""
        pos = FIRST_INODE
        for ino in inodes:
            isize = 64 if ino.extended else 32
            head = isize + len(ino.xattrs)
            if ino.fmt == ef.LAYOUT_CHUNK_BASED << 1:
                total = head + (-head % 8) + 8
            elif ino.tail:
                total = head + ino.tail
                if total > BLOCK:
                    ino.tail = 0
                    ino.fmt = ef.LAYOUT_FLAT_PLAIN << 1
                    total = head
                elif pos % BLOCK + total > BLOCK:
                    pos += -pos % BLOCK
            else:
                total = head
            if pos % BLOCK + isize > BLOCK:
                pos += -pos % BLOCK
            ino.nid = pos >> 5
            pos += total + (-total % 32)
        block = -(-pos // BLOCK)
        for ino in inodes:
            full = ino.size - ino.tail
            if full and ino.fmt != ef.LAYOUT_CHUNK_BASED << 1:
                ino.blkaddr = block
                block += -(-full // BLOCK)
        if block >= MAX_BLOCKS:
            self.fail(0, f"the image needs {block} blocks, more than EROFS addresses")
        self.meta_end = pos
        return block * BLOCK

    # -- bytes ------------------------------------------------------------------------------

    def _pack(self, inodes: list[_Inode], size: int) -> bytes:
        for ino, entries, counts in self.dirs:
            ino.payload = _dir_blocks(entries, counts)
        out = bytearray(size)
        self._superblock(out, inodes)
        compact, extended = ef.COMPACT_INODE.pack_into, ef.EXTENDED_INODE.pack_into
        chunk = ef.CHUNK_INDEX.pack_into
        chunked = ef.LAYOUT_CHUNK_BASED << 1
        mtimes = self.rec.records
        for number, ino in enumerate(inodes, 1):
            pos = ino.nid << 5
            icount = (len(ino.xattrs) - 12) // 4 + 1 if ino.xattrs else 0
            uid, gid = ino.uid_gid
            iu = ino.blkaddr if ino.payload else ino.iu
            if ino.extended:
                sec, nsec = divmod(mtimes[ino.ordinal][MTIME], 1_000_000_000)
                extended(out, pos, ino.fmt | 1, icount, ino.mode, 0, ino.size, iu, number,
                         uid, gid, sec, nsec, ino.nlink)
                head = pos + 64
            else:
                compact(out, pos, ino.fmt, icount, ino.mode, ino.nlink, ino.size, 0, iu,
                        number, uid, gid)
                head = pos + 32
            if ino.xattrs:
                out[head : head + len(ino.xattrs)] = ino.xattrs
                head += len(ino.xattrs)
            if ino.fmt == chunked:
                chunk(out, head + (-head % 8), 0, 1, ino.blkaddr)
            elif ino.payload:
                self._flat_data(out, ino, head)
        self._checksum(out)
        return bytes(out)

    @staticmethod
    def _flat_data(out: bytearray, ino: _Inode, head: int) -> None:
        full = len(ino.payload) - ino.tail
        start = ino.blkaddr * BLOCK
        out[start : start + full] = ino.payload[:full]
        if ino.tail:
            out[head : head + ino.tail] = ino.payload[full:]

    def _superblock(self, out: bytearray, inodes: list[_Inode]) -> None:
        bt_s, bt_ns = divmod(self.build_time, 1_000_000_000)
        uuid = hashlib.sha256(b"clip-erofs\0" + self.index.digest.encode()).digest()[:16]
        ef.SUPER.pack_into(
            out, ef.SUPER_OFFSET, ef.MAGIC, 0, ef.COMPAT_SB_CHKSUM, ef.BLKSZBITS, 0,
            inodes[0].nid, len(inodes), bt_s, bt_ns, len(out) // BLOCK, 0, 0, uuid,
            b"clip", ef.INCOMPAT_CHUNKED_FILE | ef.INCOMPAT_DEVICE_TABLE, 0, 1, DEVT_SLOTOFF,
            0, 0, 0, 0,
        )
        tag = bytes.fromhex(self.index.blob_digest.removeprefix("sha256:"))
        ef.DEVICE_SLOT.pack_into(out, DEVT_SLOTOFF * ef.DEVT_SLOT_SIZE, tag,
                                 self.device_blocks, 0)

    @staticmethod
    def _checksum(out: bytearray) -> None:
        """crc32c (kernel convention: seed ~0, no final inversion) of the superblock's block
        from the superblock on (512 bytes here), with the checksum field zero."""
        crc = ef.crc32c_raw(0xFFFFFFFF, bytes(out[ef.SUPER_OFFSET : ef.SUPER_OFFSET + BLOCK]))
        out[ef.SUPER_OFFSET + 4 : ef.SUPER_OFFSET + 8] = crc.to_bytes(4, "little")


def _first(entry: tuple[bytes, _Inode, int]) -> bytes:
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


def _dir_blocks(entries: list[tuple[bytes, _Inode, int]], counts: list[int]) -> bytes:
    """A directory's data: blocks of dirents (nid, name offset, type) followed by their names;
    every block but the last padded with zeros to 512 bytes."""
    out = []
    start = 0
    pack = ef.DIRENT.pack
    for n, count in enumerate(counts):
        block = entries[start : start + count]
        start += count
        nameoff = 12 * count
        heads = []
        for name, ino, ftype in block:
            heads.append(pack(ino.nid, nameoff, ftype))
            nameoff += len(name)
        raw = b"".join(heads) + b"".join(e[0] for e in block)
        if n + 1 < len(counts):
            raw += bytes(BLOCK - len(raw))
        out.append(raw)
    return b"".join(out)
