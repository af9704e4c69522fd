"""Filesystem appliers and tree comparison for the snapshotter conformance tests.

A Python rendering of the operations containerd's snapshotter test suite applies to mounted
snapshots (create file/dir, remove, chown, link, rename) and of its directory comparison: paths,
types, full mode, uid/gid, sizes, link counts, device numbers, file contents, symlink
targets and user-visible xattrs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

Applier = Callable[[Path], None]


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def create_file(path: str, data: bytes, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        target.write_bytes(data)
        os.chmod(target, mode)

    return apply


def create_dir(path: str, mode: int) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        target.mkdir()
        os.chmod(target, mode)

    return apply


def remove_all(path: str) -> Applier:
    def apply(root: Path) -> None:
        target = _at(root, path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    return apply


def chown(path: str, uid: int, gid: int) -> Applier:
    return lambda root: os.lchown(_at(root, path), uid, gid)


def link(old: str, new: str) -> Applier:
    return lambda root: os.link(_at(root, old), _at(root, new))


def rename(old: str, new: str) -> Applier:
    """rename(2), falling back like mv(1) when overlayfs answers EXDEV for a lower dir."""

    def apply(root: Path) -> None:
        src, dst = _at(root, old), _at(root, new)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            st = os.lstat(src)
            os.lchown(dst, st.st_uid, st.st_gid)
            shutil.rmtree(src)

    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)

    return apply


def _describe(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    xattrs = {}
    for name in os.listxattr(path, follow_symlinks=False):
        if name.startswith(("user.", "security.capability")):
            xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
    content: object = None
    if stat.S_ISREG(st.st_mode):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    is_dir = stat.S_ISDIR(st.st_mode)
    size, nlink = (None, None) if is_dir else (st.st_size, st.st_nlink)
    rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
    return (st.st_mode, st.st_uid, st.st_gid, size, content, sorted(xattrs.items()), nlink, rdev)


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root`` (root itself excluded) with its comparable attributes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            out[str(full.relative_to(root))] = _describe(full)
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    want, got = tree(expected), tree(actual)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(p for p in set(want) & set(got) if want[p] != got[p])
    details = [f"{p}: want {want[p]} got {got[p]}" for p in differ[:5]]
    assert not (missing or extra or differ), (
        f"trees differ: missing {missing[:10]} extra {extra[:10]} differ {details}"
    )
