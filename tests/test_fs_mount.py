"""The real FUSE mount: a layer tree equals `tar -x` of the layer (with overlay whiteouts), two
layer directories stacked by overlayfs equal applying both layers, big directories, read-only."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fs_layers import (
    CAPABILITY,
    M,
    apply_layer,
    as_overlay_lower,
    describe,
    extract,
    index_layer,
    mounted,
    rich_members,
    write_layer,
)

from snapshotter.bridge import AsyncioThread, Bridge
from snapshotter.cache import DiskCache
from snapshotter.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snapshotter.fs.layerfs import LayerFS
from snapshotter.fs.mounts import is_mounted, mount_at
from snapshotter.readpath import FileSource, ReadPolicy


@pytest.fixture
def lfs(tmp_path: Path) -> Iterator[LayerFS]:
    aio = AsyncioThread()
    root = tmp_path / "root"
    fs = LayerFS(DiskCache(root), Bridge(aio.loop), ReadPolicy(timeout=10))
    with mounted(root / "mnt"):
        try:
            fs.start(root / "mnt")
            yield fs
        finally:
            fs.stop()
            aio.close()
    assert not is_mounted(root / "mnt")


def attach(fs: LayerFS, tmp_path: Path, name: str, members: list[M]) -> tuple[Path, Path]:
    blob = write_layer(tmp_path / f"{name}.tgz", members)
    index = index_layer(blob, tmp_path / f"{name}.idx")
    return blob, fs.attach(name, index, FileSource(blob))


def test_layer_tree_equals_tar_extraction(lfs: LayerFS, tmp_path: Path) -> None:
    blob, layer_dir = attach(lfs, tmp_path, "rich", rich_members())
    extract(blob, tmp_path / "x")
    expected = as_overlay_lower(describe(tmp_path / "x"))
    got = describe(layer_dir)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path] == expected[path], path
    # spot checks of the semantics the comparison relies on
    assert got["bin/tool"].nlink == 3 and got["bin/tool"].group == (
        "bin/hard1", "bin/hard2", "bin/tool")
    assert got["srv/gone"].kind == "chr" and got["srv/gone"].mode == 0
    assert os.getxattr(layer_dir / "opq", "trusted.overlay.opaque") == b"y"
    assert not (layer_dir / "opq/.wh..wh..opq").exists()
    assert not (layer_dir / "srv/.wh.gone").exists()
    # inode numbers are (slot, ordinal): a hardlink is its target's inode
    tree = lfs.ops.by_name["rich"].tree
    tool = tree.index.lookup("bin/tool")
    assert tool is not None
    assert os.stat(layer_dir / "bin/hard2").st_ino == tree.base | tool == tree.inode(tool)
    with pytest.raises(OSError) as err:
        (layer_dir / "bin/tool").write_bytes(b"x")
    assert err.value.errno == errno.EROFS


def test_mount_root_options_and_read_only(lfs: LayerFS, tmp_path: Path) -> None:
    _, layer_dir = attach(lfs, tmp_path, "one", [M("d", tarfile.DIRTYPE), M("d/f", data=b"x")])
    mnt = layer_dir.parent
    assert os.listdir(mnt) == ["blobs", "one"]
    assert mount_at(mnt) == ("fuse", "clip")
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    opts = next(line.split()[5] for line in mountinfo if line.split()[4] == str(mnt))
    assert opts.split(",")[0] == "ro"
    assert os.statvfs(mnt).f_files >= 3
    for action in (
        lambda: os.open(layer_dir / "d/f", os.O_WRONLY),
        lambda: os.open(layer_dir / "d/new", os.O_CREAT | os.O_WRONLY),
        lambda: os.mkdir(layer_dir / "d/sub"),
        lambda: os.unlink(layer_dir / "d/f"),
        lambda: os.chmod(layer_dir / "d/f", 0o600),
        lambda: os.setxattr(layer_dir / "d/f", "user.x", b"1"),
        lambda: os.rename(layer_dir / "d/f", layer_dir / "d/g"),
        lambda: os.symlink("f", layer_dir / "d/s"),
    ):
        with pytest.raises(OSError) as err:
            action()
        assert err.value.errno == errno.EROFS
    with pytest.raises(OSError) as err:
        os.getxattr(layer_dir / "d/f", "user.none")
    assert err.value.errno == errno.ENODATA
    with pytest.raises(AlreadyExists):
        lfs.attach("one", lfs.ops.by_name["one"].tree.index, FileSource(tmp_path / "one.tgz"))
    for bad in ("", "..", "a/b", "x" * 65):
        with pytest.raises(InvalidArgument):
            lfs.attach(bad, lfs.ops.by_name["one"].tree.index, FileSource(tmp_path / "one.tgz"))
    lfs.detach("one")
    with pytest.raises(NotFound):
        lfs.detach("one")
    assert os.listdir(mnt) == ["blobs"]
    assert not layer_dir.exists()


def _layers_a_b() -> tuple[list[M], list[M]]:
    a = [
        M("etc", tarfile.DIRTYPE, mode=0o755),
        M("etc/keep", data=b"keep"),
        M("etc/remove-me", data=b"bye"),
        M("etc/replace", data=b"old"),
        M("var", tarfile.DIRTYPE, mode=0o755),
        M("var/cache", tarfile.DIRTYPE, mode=0o755),
        M("var/cache/old1", data=b"1"),
        M("var/cache/sub", tarfile.DIRTYPE),
        M("var/cache/sub/old2", data=b"2"),
        M("usr", tarfile.DIRTYPE),
        M("usr/bin", tarfile.DIRTYPE),
        M("usr/bin/tool", data=b"tool", mode=0o4755,
          xattrs={"user.a": b"A", "security.capability": CAPABILITY}),
        M("usr/bin/alias", tarfile.LNKTYPE, linkname="usr/bin/tool"),
        M("gone-dir", tarfile.DIRTYPE),
        M("gone-dir/x", data=b"x"),
    ]
    b = [
        M("etc", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_100),
        M("etc/.wh.remove-me"),
        M("etc/replace", data=b"new", mode=0o600),
        M("etc/added", tarfile.SYMTYPE, linkname="keep"),
        M("var", tarfile.DIRTYPE, mode=0o755, mtime=1_700_000_100),
        M("var/cache", tarfile.DIRTYPE, mode=0o700, mtime=1_700_000_100),
        M("var/cache/.wh..wh..opq"),
        M("var/cache/fresh", data=b"fresh"),
        M(".wh.gone-dir"),
        M("dev", tarfile.DIRTYPE),
        M("dev/fifo", tarfile.FIFOTYPE),
    ]
    return a, b


def test_missing_names_in_a_layer_are_cached_by_the_kernel(
    lfs: LayerFS, tmp_path: Path
) -> None:
    """A miss inside a layer reaches the daemon once; at the mount root it is never cached."""
    _, layer_dir = attach(lfs, tmp_path, "neg", [M("d", tarfile.DIRTYPE), M("d/f", data=b"x")])
    asked: list[bytes] = []
    real_lookup = lfs.ops.lookup

    async def counting_lookup(parent: int, name: bytes, ctx: object) -> object:
        asked.append(name)
        return await real_lookup(parent, name, ctx)  # type: ignore[arg-type]

    lfs.ops.lookup = counting_lookup  # type: ignore[method-assign,assignment]
    for _ in range(3):
        assert not (layer_dir / "d" / "missing").exists()
    assert asked.count(b"missing") == 1
    assert (layer_dir / "d" / "f").read_bytes() == b"x"

    mnt = layer_dir.parent
    assert not (mnt / "later").exists()
    _, later_dir = attach(lfs, tmp_path, "later", [M("g", data=b"y")])
    assert (later_dir / "g").read_bytes() == b"y"


def test_overlay_over_two_layers_equals_applying_them(lfs: LayerFS, tmp_path: Path) -> None:
    a, b = _layers_a_b()
    blob_a, dir_a = attach(lfs, tmp_path, "a", a)
    blob_b, dir_b = attach(lfs, tmp_path, "b", b)
    expected_root = tmp_path / "expected"
    extract(blob_a, expected_root)
    apply_layer(blob_b, expected_root)
    merged = tmp_path / "merged"
    merged.mkdir()
    with mounted(merged):
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={dir_b}:{dir_a}", str(merged)], check=True)
        got = describe(merged, drop_xattr_prefix="trusted.overlay.", dir_nlink=False)
    expected = describe(expected_root, drop_xattr_prefix="trusted.overlay.", dir_nlink=False)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert got[path] == expected[path], path
    assert "etc/remove-me" not in got and "gone-dir" not in got
    assert "var/cache/old1" not in got and "var/cache/fresh" in got


class _Dirent(ctypes.Structure):
    _fields_ = (("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_uint16), ("d_type", ctypes.c_uint8),
                ("d_name", ctypes.c_char * 256))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = (ctypes.c_char_p,)
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = (ctypes.c_void_p,)
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = (ctypes.c_void_p,)
    libc.seekdir.argtypes = (ctypes.c_void_p, ctypes.c_long)
    libc.closedir.argtypes = (ctypes.c_void_p,)
    return libc


def _read_names(libc: ctypes.CDLL, d: int, limit: int | None = None) -> list[bytes]:
    names = []
    while limit is None or len(names) < limit:
        ent = libc.readdir(d)
        if not ent:
            break
        names.append(ent.contents.d_name)
    return names


def test_directory_of_50k_entries(lfs: LayerFS, tmp_path: Path) -> None:
    n = 50_000
    members = [M("big", tarfile.DIRTYPE)] + [M(f"big/f{i:05d}") for i in range(n)]
    _, layer_dir = attach(lfs, tmp_path, "wide", members)
    start = time.monotonic()
    names = os.listdir(layer_dir / "big")
    print(f"listdir of {n} entries: {time.monotonic() - start:.2f}s")
    assert sorted(names) == [f"f{i:05d}" for i in range(n)]
    libc = _libc()
    d = libc.opendir(os.fsencode(layer_dir / "big"))
    assert d
    try:
        head = _read_names(libc, d, 20_001)
        pos = libc.telldir(d)
        rest = _read_names(libc, d)
        libc.seekdir(d, pos)
        again = _read_names(libc, d)
    finally:
        libc.closedir(d)
    assert rest == again
    listed = [x for x in head + rest if x not in (b".", b"..")]
    assert len(listed) == n and len(set(listed)) == n


def test_stop_leaves_no_mount_even_after_loop_failure(tmp_path: Path) -> None:
    class Boom(BaseException):
        pass

    root = tmp_path / "root"
    mnt = root / "mnt"
    fs = LayerFS(DiskCache(root))
    with mounted(mnt):
        fs.start(mnt)
        assert is_mounted(mnt)

        async def explode(*_: object) -> None:
            raise Boom

        fs.ops.statfs = explode  # type: ignore[method-assign]
        with pytest.raises(OSError):
            os.statvfs(mnt)
        fs.stop()
        assert not is_mounted(mnt)
        # a second LayerFS can mount again at the same place in the same process
        fs2 = LayerFS(DiskCache(root))
        fs2.start(mnt)
        try:
            assert os.listdir(mnt) == ["blobs"]
        finally:
            fs2.stop()
        assert not is_mounted(mnt)


CHILD = """
import sys, time
from snapshotter.cache import DiskCache
from snapshotter.fs.layerfs import LayerFS
fs = LayerFS(DiskCache(sys.argv[1]))
fs.start(sys.argv[2])
print("ready", flush=True)
time.sleep(600)
"""


def test_start_clears_mount_of_a_killed_predecessor(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mnt = root / "mnt"
    with mounted(mnt):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(mnt)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        finally:
            child.kill()
            child.wait()
        assert is_mounted(mnt)
        with pytest.raises(OSError) as err:
            os.listdir(mnt)
        assert err.value.errno == errno.ENOTCONN
        fs = LayerFS(DiskCache(root))
        fs.start(mnt)
        try:
            assert os.listdir(mnt) == ["blobs"]
        finally:
            fs.stop()
        assert not is_mounted(mnt)


def test_start_refuses_a_foreign_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(mnt):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
        fs = LayerFS(DiskCache(tmp_path))
        with pytest.raises(Unavailable, match="already a tmpfs mount"):
            fs.start(mnt)
        assert mount_at(mnt) == ("tmpfs", "tmpfs")


def test_blob_files_serve_each_layers_uncompressed_stream(lfs: LayerFS, tmp_path: Path) -> None:
    """`<mount>/blobs/<layer id>` is the layer's whole tar stream, read through the read path."""
    import gzip

    blob, _ = attach(lfs, tmp_path, "rich", rich_members())
    stream = gzip.decompress(blob.read_bytes())
    assert lfs.mountpoint is not None
    blobs = lfs.mountpoint / "blobs"
    assert sorted(os.listdir(lfs.mountpoint)) == ["blobs", "rich"]
    assert os.listdir(blobs) == ["rich"]
    st = os.stat(blobs / "rich")
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o444
    assert st.st_size == len(stream)
    reads_before = _fuse_requests("read")
    assert (blobs / "rich").read_bytes() == stream
    assert _fuse_requests("read") > reads_before  # counted for clip_fuse_requests_total
    with open(blobs / "rich", "rb") as f:  # an unaligned read inside, and one past the end
        f.seek(1000)
        assert f.read(5000) == stream[1000:6000]
        f.seek(len(stream) + 10)
        assert f.read(100) == b""
    with pytest.raises(OSError) as err:
        os.open(blobs / "rich", os.O_WRONLY)
    assert err.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(FileNotFoundError):
        os.stat(blobs / "missing")
    lfs.detach("rich")
    assert os.listdir(blobs) == []


def _fuse_requests(op: str) -> float:
    from snapshotter.telemetry import TELEMETRY

    value = TELEMETRY.registry.get_sample_value("clip_fuse_requests_total", {"op": op})
    return value or 0.0


@pytest.mark.parametrize("allow_other", [True, False])
def test_allow_other_is_the_configured_mount_option(tmp_path: Path, allow_other: bool) -> None:
    """`[fuse] allow_other` reaches the mount (it was documented and ignored)."""
    root = tmp_path / "root"
    fs = LayerFS(DiskCache(root), allow_other=allow_other)
    with mounted(root / "mnt"):
        try:
            fs.start(root / "mnt")
            mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
            line = next(x for x in mountinfo if x.split()[4] == str(root / "mnt"))
            super_options = line.split(" - ")[1].split()[2].split(",")
            assert ("allow_other" in super_options) == allow_other
        finally:
            fs.stop()
