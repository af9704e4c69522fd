"""Read-path numbers through the real FUSE mount (prints, never asserts).

Builds a gzip layer with one large file and a wide directory, indexes it, mounts it with a local
blob source, and reports: cold sequential read (source -> inflate -> disk cache), page-cache
read, disk-tier read through a fresh attach (the cache file itself still in the host page cache),
a metadata walk, and cold random 4 KiB reads.

Run as root: `.venv/bin/python bench/fs_read.py [--size-mib 256]`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

from snapshotter.bridge import AsyncioThread, Bridge
from snapshotter.cache import DiskCache
from snapshotter.fs.layerfs import LayerFS
from snapshotter.fs.mounts import is_mounted, lazy_unmount
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index
from snapshotter.readpath import FileSource, ReadPolicy

MiB = 1 << 20


def make_layer(path: Path, size: int, wide: int) -> None:
    chunk = bytearray(os.urandom(MiB // 2)) + bytes(MiB // 2)  # ~2:1 compressible
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(chunk) * (size // MiB)))
        for i in range(wide):
            tar.addfile(tarfile.TarInfo(f"wide/f{i:06d}"), io.BytesIO(b""))
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=1, mtime=0))


def read_all(path: Path, bufsize: int = MiB) -> float:
    start = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(bufsize):
            pass
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--wide", type=int, default=50_000)
    args = ap.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_layer(d / "layer.tgz", size, args.wide)
        t = time.monotonic()
        with open(d / "layer.tgz", "rb") as f:
            build_index(f, d / "layer.idx", IndexBuildOptions())
        print(f"index build: {time.monotonic() - t:.2f}s for {args.size_mib} MiB")
        index = LayerIndex.open(d / "layer.idx")
        aio = AsyncioThread()
        fs = LayerFS(DiskCache(d / "root"), Bridge(aio.loop), ReadPolicy())
        mnt = d / "root" / "mnt"
        try:
            fs.start(mnt)
            source = FileSource(d / "layer.tgz")
            layer = fs.attach("bench", index, source)
            big = layer / "big.bin"
            secs = read_all(big)
            print(f"cold sequential read: {size / secs / MiB:.0f} MiB/s "
                  f"(source bytes {source.bytes_read / MiB:.0f} MiB)")
            secs = read_all(big)
            print(f"page-cache read (FUSE file pages kept): {size / secs / MiB:.0f} MiB/s")
            fs.detach("bench")  # new inodes: the kernel's pages of the FUSE file are gone
            big = fs.attach("bench-warm", index, source) / "big.bin"
            secs = read_all(big)
            print(f"disk-tier read (through FUSE, cache file in the host page cache): "
                  f"{size / secs / MiB:.0f} MiB/s")
            t = time.monotonic()
            n = sum(1 for e in os.scandir(big.parent / "wide") if e.stat(follow_symlinks=False))
            print(f"scandir+stat of {n} entries: {time.monotonic() - t:.2f}s")
            print(f"read path stats: {fs.readpath.stats}")
            fs.detach("bench-warm")
            fs.cache.remove(index.blob_digest)
            fs.readpath.memory.drop_layer(index.blob_digest)
            big = fs.attach("bench2", index, source) / "big.bin"
            report("cold random 4 KiB reads (200)", random_reads(big, size, 200))
        finally:
            fs.stop()
            aio.close()
            if is_mounted(mnt):
                lazy_unmount(mnt)


def random_reads(path: Path, size: int, count: int) -> list[float]:
    rng = random.Random(1)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(count):
            off = rng.randrange(0, size - 4096) // 4096 * 4096
            t = time.monotonic()
            os.pread(fd, 4096, off)
            out.append(time.monotonic() - t)
    finally:
        os.close(fd)
    return out


def report(name: str, samples: list[float]) -> None:
    samples.sort()
    p50 = samples[len(samples) // 2] * 1000
    p99 = samples[int(len(samples) * 0.99)] * 1000
    print(f"{name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")


if __name__ == "__main__":
    main()
