"""Helpers for the EROFS tests: a layer's tar stream, index and image side by side, the image
mounted file-backed over the tar (unmounted by path on the way out), and index surgery to make
inputs no real tar produces."""

from __future__ import annotations

import dataclasses
import gzip
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import zstandard
from fs_layers import M, Node, index_layer, write_layer

from snapshotter.erofs import write_image
from snapshotter.erofs.mount import mount_image, unmount
from snapshotter.fs.mounts import is_mounted
from snapshotter.index import LayerIndex
from snapshotter.index import format as fmt


@dataclass
class Layer:
    blob: Path  # gzip
    tar: Path  # the uncompressed stream: device 1
    index: LayerIndex
    image: Path


def make_layer(tmp: Path, name: str, members: list[M], *, compact_mtime: bool = False) -> Layer:
    blob = write_layer(tmp / f"{name}.tgz", members, level=1)
    return layer_of_blob(tmp, name, blob, compact_mtime=compact_mtime)


def index_of(tmp: Path, name: str, members: list[M]) -> LayerIndex:
    """Only the index (for inputs the writer refuses)."""
    return index_layer(write_layer(tmp / f"{name}.tgz", members, level=1), tmp / f"{name}.idx")


def layer_of_blob(tmp: Path, name: str, blob: Path, *, compact_mtime: bool = False) -> Layer:
    raw = blob.read_bytes()
    tar = tmp / f"{name}.tar"
    tar.write_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    index = index_layer(blob, tmp / f"{name}.idx")
    image = tmp / f"{name}.img"
    write_image(index, image, compact_mtime=compact_mtime)
    return Layer(blob, tar, index, image)


@contextmanager
def mounted_image(layer: Layer, where: Path, *, direct_io: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mount_image(layer.image, layer.tar, where, direct_io=direct_io)
    try:
        yield where
    finally:
        unmount(where)
        assert not is_mounted(where)


def link_owner_rule(blob: Path, tree: dict[str, Node]) -> dict[str, Node]:
    """The rule clip presents: a hardlinked inode belongs to the last link entry's uid/gid (in
    tar order), applied to a described tree (not on disk: a real chown would also clear
    setuid bits and security.capability, see ``apply_like_containerd``)."""
    out = dict(tree)
    with tarfile.open(blob) as tar:
        for m in tar:
            if m.islnk():
                for path in out[os.path.normpath(m.name)].group:
                    out[path] = dataclasses.replace(out[path], uid=m.uid, gid=m.gid)
    return out


def dir_mode_rule(blob: Path, tree: dict[str, Node]) -> dict[str, Node]:
    """Every directory entry ends with exactly its header's mode bits, as containerd's applier
    leaves it (it chmods each entry). GNU ``tar -x`` differs in one case: a directory created
    inside a set-group-ID directory inherits that bit from the kernel, and tar keeps it."""
    out = dict(tree)
    with tarfile.open(blob) as tar:
        for m in tar:
            path = os.path.normpath(m.name)
            if m.isdir() and path in out and out[path].kind == "dir":
                out[path] = dataclasses.replace(out[path], mode=m.mode & 0o7777)
    return out


def apply_like_containerd(blob: Path, dest: Path) -> None:
    """What containerd 1.6's applier does beyond ``tar -x`` for a hardlink entry, on disk, in
    tar order: lchown the link path (the shared inode) to the entry's uid/gid (the kernel then
    drops setuid/setgid and security.capability), set the entry's own xattrs, chmod to the
    entry's mode, set the entry's mtime."""
    with tarfile.open(blob) as tar:
        for m in tar:
            if not m.islnk():
                continue
            path = dest / m.name
            os.lchown(path, m.uid, m.gid)
            for key, value in m.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    os.setxattr(path, key[len("SCHILY.xattr."):],
                                value.encode("utf-8", "surrogateescape"))
            os.chmod(path, m.mode)
            mtime_ns = int(Decimal(m.pax_headers.get("mtime", str(int(m.mtime)))) * 10**9)
            os.utime(path, ns=(mtime_ns, mtime_ns))


def patched_index(index: LayerIndex, *, entry: tuple[int, int, int] | None = None,
                  uncompressed_size: int | None = None) -> LayerIndex:
    """A copy of ``index`` with one u64 field of one entry record replaced (``entry`` =
    (ordinal, byte offset in the record, value)) or another stream size: inputs a real tar
    never gives, for the writer's refusals."""
    raw = index.to_bytes()
    header = list(fmt.HEADER.unpack_from(raw, 0))
    body_len, windows_len = header[13], header[15]
    body = bytearray(zstandard.ZstdDecompressor().decompress(
        raw[fmt.HEADER_SIZE : fmt.HEADER_SIZE + body_len], max_output_size=header[14]))
    if entry is not None:
        ordinal, offset, value = entry
        body[ordinal * fmt.ENTRY.size + offset : ordinal * fmt.ENTRY.size + offset + 8] = (
            value.to_bytes(8, "little"))
    if uncompressed_size is not None:
        header[10] = uncompressed_size
    packed = zstandard.ZstdCompressor().compress(bytes(body))
    header[13] = len(packed)
    windows = raw[len(raw) - windows_len :] if windows_len else b""
    return LayerIndex.from_bytes(fmt.HEADER.pack(*header) + packed + windows)


#: Byte offsets of ``size`` and ``uoff`` in an ENTRY record (see snapshotter/index/format.py).
SIZE_OFFSET, UOFF_OFFSET = 28, 44
