"""The tiny layer ``probe_file_backed`` mounts: a file to read through the device mapping, and
an empty file whose compact inode carries a time of its own (kernel 6.15+ shows it)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from snapshotter.erofs.writer import write_image
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index

PROBE_DATA = b"clip erofs probe\n"
PROBE_MTIME = 1_700_000_000
#: The stamp file's mtime: a kernel that honours compact mtimes shows exactly this; an older
#: one shows the superblock's epoch instead (the earliest mtime: the root's, 0).
STAMP_MTIME = PROBE_MTIME + 86_400 + 17


@dataclass(frozen=True)
class ProbeLayer:
    image: Path
    device: Path
    data: bytes  # what ``probe`` reads
    stamp_mtime_ns: int  # what ``stamp`` shows where compact mtimes are honoured


def probe_layer(root: Path, device_dir: Path | None = None) -> ProbeLayer:
    """Write the probe layer's tar (the device: in ``device_dir``, by default ``root``),
    index and image (with compact mtimes) under ``root``. ``probe``'s data starts at offset
    512 of the tar, as a file's data may in any layer."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mtime in (("probe", PROBE_DATA, PROBE_MTIME),
                                  ("stamp", b"", STAMP_MTIME)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    device = (device_dir or root) / f"{root.name}.probe.tar"
    device.write_bytes(raw.getvalue())
    out = io.BytesIO()
    with open(device, "rb") as f:
        build_index(f, out, IndexBuildOptions())
    image = root / "probe.img"
    write_image(LayerIndex.from_bytes(out.getvalue()), image, compact_mtime=True)
    return ProbeLayer(image, device, PROBE_DATA, STAMP_MTIME * 1_000_000_000)
