"""Helpers for the EROFS tests: a layer's tar stream, index and image side by side, the image
mounted file-backed over the tar (unmounted by path on the way out), and index surgery to make
inputs no real tar produces."""

from __future__ import annotations

import gzip
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zstandard
from fs_layers import M, index_layer, write_layer

from snapshotter.erofs import write_image
from snapshotter.erofs.mount import mount_image, unmount
from snapshotter.fs.layerfs import is_mounted
from snapshotter.index import LayerIndex
from snapshotter.index import format as fmt


@dataclass
class Layer:
    blob: Path  # gzip
    tar: Path  # the uncompressed stream: device 1
    index: LayerIndex
    image: Path


def make_layer(tmp: Path, name: str, members: list[M]) -> Layer:
    blob = write_layer(tmp / f"{name}.tgz", members, level=1)
    return layer_of_blob(tmp, name, blob)


def index_of(tmp: Path, name: str, members: list[M]) -> LayerIndex:
    """Only the index (for inputs the writer refuses)."""
    return index_layer(write_layer(tmp / f"{name}.tgz", members, level=1), tmp / f"{name}.idx")


def layer_of_blob(tmp: Path, name: str, blob: Path) -> Layer:
    raw = blob.read_bytes()
    tar = tmp / f"{name}.tar"
    tar.write_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    index = index_layer(blob, tmp / f"{name}.idx")
    image = tmp / f"{name}.img"
    write_image(index, image)
    return Layer(blob, tar, index, image)


@contextmanager
def mounted_image(layer: Layer, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mount_image(layer.image, layer.tar, where)
    try:
        yield where
    finally:
        unmount(where)
        assert not is_mounted(where)


def apply_link_owners(blob: Path, dest: Path) -> None:
    """What containerd's applier does beyond ``tar -x`` for hardlink entries: lchown the link
    path (the shared inode) to the link entry's uid/gid, in tar order."""
    with tarfile.open(blob) as tar:
        for m in tar:
            if m.islnk():
                os.lchown(dest / m.name, m.uid, m.gid)


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


#: Byte offset of ``uoff`` in an ENTRY record (see snapshotter/index/format.py).
UOFF_OFFSET = 44
