"""The tiny layer ``probe_file_backed`` mounts: one file in a one-member tar."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from snapshotter.erofs.writer import write_image
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index

PROBE_DATA = b"clip erofs probe\n"


def probe_layer(root: Path) -> tuple[Path, Path, bytes]:
    """(image, device, the probe file's bytes) written under ``root``."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("probe")
        info.size = len(PROBE_DATA)
        tar.addfile(info, io.BytesIO(PROBE_DATA))
    device = root / "probe.tar"
    device.write_bytes(raw.getvalue())
    out = io.BytesIO()
    with open(device, "rb") as f:
        build_index(f, out, IndexBuildOptions())
    image = root / "probe.img"
    write_image(LayerIndex.from_bytes(out.getvalue()), image)
    return image, device, PROBE_DATA
