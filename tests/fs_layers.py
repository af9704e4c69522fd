"""Helpers for the FUSE and read-path tests: build real gzip layers, extract them with GNU tar,
and describe a directory tree (types, modes, owners, xattrs, link targets, content digests)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapshotter.fs.mounts import is_mounted, lazy_unmount
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index

#: A valid VFS_CAP_REVISION_2 blob: cap_net_bind_service permitted + effective.
CAPABILITY = (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12)


@dataclass
class M:
    """One tar member to write."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_700_000_000.5
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)


def write_layer(path: Path, members: Iterable[M], level: int = 6) -> Path:
    """A gzip-compressed PAX tar with exactly these members, in order."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.uname = info.gname = ""
            info.mtime = m.mtime
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = {
                "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                for k, v in m.xattrs.items()
            }
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=level, mtime=0))
    return path


def index_layer(blob: Path, out: Path, **options: Any) -> LayerIndex:
    with open(blob, "rb") as f:
        build_index(f, out, IndexBuildOptions(**options))
    return LayerIndex.open(out)


def pread(path: Path, offset: int, size: int) -> bytes:
    """One positioned read through a descriptor of its own (opened and closed here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def pattern(n: int, seed: int) -> bytes:
    """Deterministic bytes that compress about 4:3 (random runs with zero gaps), so compressed
    offsets spread like a real binary's and laziness is measurable."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(48 * 1024) + bytes(16 * 1024)
    return bytes(out[:n])


def rich_members(big: int = 6 << 20) -> list[M]:
    """Every entry type and metadata feature a layer can carry."""
    return [
        M("bin", tarfile.DIRTYPE, mode=0o755),
        M("bin/tool", data=b"#!/bin/sh\necho hi\n", mode=0o4755, xattrs={
            "security.capability": CAPABILITY}),
        M("bin/sgid", data=b"x", mode=0o2711, uid=0, gid=42),
        M("bin/link-to-tool", tarfile.SYMTYPE, linkname="tool", mode=0o777),
        M("bin/hard1", tarfile.LNKTYPE, linkname="bin/tool"),
        M("bin/hard2", tarfile.LNKTYPE, linkname="bin/tool"),
        M("dev", tarfile.DIRTYPE, mode=0o755),
        M("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        M("dev/loop9", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=7, devminor=9),
        M("dev/fifo", tarfile.FIFOTYPE, mode=0o600, uid=1000, gid=1000),
        M("tmp", tarfile.DIRTYPE, mode=0o1777),
        M("srv", tarfile.DIRTYPE, mode=0o2750, uid=33, gid=33, xattrs={"user.dir": b"d"}),
        M("srv/data.bin", data=pattern(big, 1), mode=0o640, uid=33, gid=33),
        M("srv/empty", mode=0o600),
        M("srv/attrs", data=b"a", xattrs={"user.one": b"1", "user.bin": b"\x00\xff\x80"}),
        M("srv/" + "long-" * 30 + "name", data=b"long"),
        M("srv/ünïcode", data=b"utf8"),
        M("srv/abs-link", tarfile.SYMTYPE, linkname="/etc/" + "deep/" * 40 + "target"),
        M("srv/dangling", tarfile.SYMTYPE, linkname="../nowhere"),
        M("srv/.wh.gone", mode=0o600, uid=5, gid=6),
        M("opq", tarfile.DIRTYPE, mode=0o755),
        M("opq/.wh..wh..opq", mode=0o600),
        M("opq/kept", data=b"kept"),
        M("implicit/parent/file", data=b"no parent entries"),
        M("srv/late", data=b"first"),
        M("srv/late", data=b"second wins", mode=0o600),
    ]


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    rdev: int
    mtime_ns: int | None
    link: str | None
    sha256: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int | None
    group: tuple[str, ...]


def _kind(mode: int) -> str:
    for name in ("S_ISREG", "S_ISDIR", "S_ISLNK", "S_ISCHR", "S_ISBLK", "S_ISFIFO"):
        if getattr(stat, name)(mode):
            return name[4:].lower()
    return "other"


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath, name)


def describe(
    root: Path, drop_xattr_prefix: str = "\0", dir_nlink: bool = True
) -> dict[str, Node]:
    """Path -> Node for everything below root (not root itself)."""
    stats = {p: os.lstat(p) for p in _walk(root)}
    by_ino: dict[int, list[str]] = {}
    for p, st in stats.items():
        if stat.S_ISREG(st.st_mode):
            by_ino.setdefault(st.st_ino, []).append(str(p.relative_to(root)))
    out = {}
    for p, st in stats.items():
        rel = str(p.relative_to(root))
        kind = _kind(st.st_mode)
        xattrs = tuple(sorted(
            (n, os.getxattr(p, n, follow_symlinks=False))
            for n in os.listxattr(p, follow_symlinks=False)
            if not n.startswith(drop_xattr_prefix)
        ))
        digest = None
        if kind == "reg":
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[rel] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=None if kind == "dir" else st.st_size,
            rdev=st.st_rdev if kind in ("chr", "blk") else 0,
            mtime_ns=None if kind == "dir" else st.st_mtime_ns,
            link=os.readlink(p) if kind == "lnk" else None,
            sha256=digest,
            xattrs=xattrs,
            nlink=st.st_nlink if dir_nlink or kind != "dir" else None,
            group=tuple(sorted(by_ino[st.st_ino])) if kind == "reg" else (),
        )
    return out


def extract(blob: Path, dest: Path, *extra: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpzf", str(blob),
         "-C", str(dest), *extra],
        check=True,
    )


def as_overlay_lower(tree: dict[str, Node]) -> dict[str, Node]:
    """What a layer directory must show for a `tar -x` tree: whiteout files become char 0/0
    devices, opaque markers vanish and mark their directory."""
    out: dict[str, Node] = {}
    for rel, node in tree.items():
        head, _, base = rel.rpartition("/")
        if base == ".wh..wh..opq":
            continue
        if base.startswith(".wh."):
            name = (head + "/" if head else "") + base[4:]
            out[name] = Node("chr", 0, node.uid, node.gid, 0, 0, node.mtime_ns, None, None,
                             (), 1, ())
            continue
        out[rel] = node
    for rel in tree:
        head, _, base = rel.rpartition("/")
        if base == ".wh..wh..opq":
            d = out[head]
            xattrs = tuple(sorted((*d.xattrs, ("trusted.overlay.opaque", b"y"))))
            out[head] = Node(**{**d.__dict__, "xattrs": xattrs})
    return out


def apply_layer(blob: Path, dest: Path) -> None:
    """Apply a layer onto an extracted tree the way an OCI runtime would (whiteouts first)."""
    with tarfile.open(blob) as tar:
        for m in tar.getmembers():
            head, _, base = m.name.rpartition("/")
            if base == ".wh..wh..opq":
                for child in (dest / head).iterdir():
                    _remove(child)
            elif base.startswith(".wh."):
                target = dest / head / base[4:]
                if target.exists() or target.is_symlink():
                    _remove(target)
    extract(blob, dest, "--exclude=.wh.*")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@contextmanager
def mounted(path: Path) -> Iterator[Path]:
    """Unmount `path` (lazily, by path) on the way out, whatever happened inside."""
    try:
        yield path
    finally:
        if is_mounted(path):
            lazy_unmount(path)
