"""Fixtures for the index tests: real trees, layers made by GNU tar, and a checker that compares
what the index says (metadata and bytes) with what ``tar -x`` restores."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from pathlib import Path

import zstandard

from snapshotter.index import EntryType, IndexReader, LayerIndex

CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service+ep
TAR_XATTRS = ["--xattrs", "--xattrs-include=*"]


def make_special_tree(root: Path) -> None:
    """A tree with every entry type, special mode bits, xattrs, long names, hardlinks and OCI
    whiteouts (requires root for devices and security.* xattrs)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir()
    (root / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n")
    (root / "bin").mkdir()
    ping = root / "bin/ping"
    ping.write_bytes(b"\x7fELF" + os.urandom(5000))
    os.setxattr(ping, "security.capability", CAP)
    os.setxattr(ping, "user.comment", b"binary \x00\xff value")
    suid = root / "bin/su"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    sgid = root / "bin/wall"
    sgid.write_bytes(b"wall")
    os.chmod(sgid, 0o2711)
    tmp = root / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    os.chown(root / "etc/hosts", 1234, 5678)
    (root / "empty").write_bytes(b"")
    big = root / "big.bin"
    big.write_bytes(os.urandom(300_000) + bytes(200_000) + b"tail" * 10_000)
    os.link(big, root / "big-hardlink")
    os.link(big, root / "etc/big-hardlink2")
    os.symlink("../etc/hosts", root / "bin/hosts-link")
    os.symlink("/absolute/target/that/does/not/exist", root / "dangling")
    long_dir = root / ("d" * 120)
    long_dir.mkdir()
    long_file = long_dir / ("f" * 150 + ".txt")
    long_file.write_bytes(b"long name contents\n")
    os.symlink("x" * 140, root / "long-symlink")
    os.link(long_file, root / ("h" * 130))
    dev = root / "dev"
    dev.mkdir()
    os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(dev / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(dev / "fifo", 0o644)
    (root / "whiteouts").mkdir()
    (root / "whiteouts/.wh.gone").write_bytes(b"")
    (root / "whiteouts/.wh..wh..opq").write_bytes(b"")
    (root / "unicodé-ñame.txt").write_bytes("ünïcode".encode())
    os.utime(root / "etc/hosts", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def gnu_tar(src: Path, out: Path, fmt: str, *paths: str) -> bytes:
    """``tar -c`` with GNU tar in the given format (gnu or posix); returns the tar bytes."""
    args = ["tar", f"--format={fmt}", "-C", str(src), "-cf", str(out), "--numeric-owner"]
    if fmt == "posix":
        args += TAR_XATTRS
    subprocess.run([*args, *(paths or ["."])], check=True, capture_output=True)
    return out.read_bytes()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, 6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


def extract(tar: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-C", str(dest), "-xpf", str(tar), "--numeric-owner", "--same-owner",
         *TAR_XATTRS],
        check=True,
        capture_output=True,
    )


_KIND = {
    stat.S_IFREG: EntryType.FILE,
    stat.S_IFDIR: EntryType.DIR,
    stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFCHR: EntryType.CHAR,
    stat.S_IFBLK: EntryType.BLOCK,
    stat.S_IFIFO: EntryType.FIFO,
}


def compare_with_extracted(index: LayerIndex, blob: Path, tree: Path, nanos: bool) -> int:
    """Assert the index matches the extracted tree entry by entry; returns files compared."""
    on_disk = {
        str(Path(dirpath, name).relative_to(tree))
        for dirpath, dirs, files in os.walk(tree)
        for name in dirs + files
    }
    in_index = {index.entry(i).path for i in range(1, len(index))}
    assert in_index == on_disk, (sorted(in_index - on_disk)[:5], sorted(on_disk - in_index)[:5])
    reader = IndexReader(index, blob)
    files = 0
    inodes: dict[int, int] = {}
    for ordinal in range(1, len(index)):
        e = index.entry(ordinal)
        p = tree / e.path
        st = os.lstat(p)
        if e.type is not EntryType.HARDLINK:
            assert e.type is _KIND[stat.S_IFMT(st.st_mode)], e.path
        assert (e.uid, e.gid) == (st.st_uid, st.st_gid), e.path
        if e.type is not EntryType.SYMLINK:
            assert e.mode == stat.S_IMODE(st.st_mode), (e.path, oct(e.mode))
        if e.type is not EntryType.DIR:  # tar -x sets directory mtimes last, also fine
            want_ns = st.st_mtime_ns if nanos else st.st_mtime_ns // 10**9 * 10**9
            assert e.mtime_ns == want_ns, e.path
        target = index.entry(e.link_target) if e.type is EntryType.HARDLINK else e
        if e.type is EntryType.HARDLINK:
            assert target.type is not EntryType.HARDLINK
            assert os.lstat(tree / target.path).st_ino == st.st_ino
            assert e.linkname == target.path or os.lstat(tree / e.linkname).st_ino == st.st_ino
        if target.type is EntryType.FILE:
            assert target.size == st.st_size, e.path
            assert target.nlink == st.st_nlink, e.path
            assert reader.read(ordinal, 0, target.size) == p.read_bytes(), e.path
            inodes[st.st_ino] = target.ordinal
            files += 1
        elif e.type is EntryType.SYMLINK:
            assert e.linkname == os.readlink(p)
        elif e.type in (EntryType.CHAR, EntryType.BLOCK):
            assert (e.devmajor, e.devminor) == (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif e.type is EntryType.DIR:
            assert e.nlink == st.st_nlink, e.path
        if e.type is not EntryType.SYMLINK:
            disk_x = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in os.listxattr(p, follow_symlinks=False)}
            assert dict(target.xattrs if e.type is EntryType.HARDLINK else e.xattrs) == disk_x, (
                e.path
            )
    return files
