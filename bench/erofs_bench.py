"""Benchmark of the EROFS image writer (issue #15): prints numbers, asserts nothing.

    .venv/bin/python -m bench.erofs_bench [--entries 100000] [--tar LAYER.tar] [--profile]

It generates a plain tar of ``--entries`` members (directories of 1,000 entries, files of
varied sizes, symlinks, hardlinks, a few capabilities) and one of 50,000 small files (the
image/layer ratio's worst case: the image costs a fixed number of bytes per entry whatever the
file size), builds their indexes, and times ``image_bytes`` in both writer variants (compact
inodes only at the layer's most common mtime, as every kernel reads them, and compact inodes
with their own mtimes, for kernels 6.15+): best and median of five, wall and CPU, milliseconds
per 10,000 entries, the image size as a share of the uncompressed layer, and the build's
peak traced memory (tracemalloc, one more build; issue #15's peak RSS budget). ``--tar``
measures a real layer too (e.g. a Debian root tarred up); by default it tars the same system
directories bench/index_bench.py uses. ``--profile`` prints a cProfile of one build.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import subprocess
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

from snapshotter.erofs import image_bytes
from snapshotter.index import IndexBuildOptions, LayerIndex, build_index

SOURCES = ["usr/lib/python3", "usr/share/doc", "usr/share/locale", "usr/share/perl",
           "usr/lib/x86_64-linux-gnu/perl-base", "usr/share/man", "usr/bin", "etc"]


def synthetic(path: Path, entries: int) -> None:
    rng = random.Random(15)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        made = 0
        d = 0
        while made < entries:
            dname = f"usr/share/pkg{d:05d}"
            info = tarfile.TarInfo(dname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            made += 1
            for i in range(min(999, entries - made)):
                info = tarfile.TarInfo(f"{dname}/file-{i:04d}.{rng.choice(['py', 'so', 'txt'])}")
                info.mtime = 1_700_000_000 + rng.randrange(3) * 0.25
                kind = rng.random()
                if kind < 0.05 and i:
                    info.type, info.linkname = tarfile.SYMTYPE, f"file-{i - 1:04d}.txt"
                    tar.addfile(info)
                elif kind < 0.07 and i:
                    info.type, info.linkname = tarfile.LNKTYPE, tar.getmembers()[-1].name
                    if tar.getmembers()[-1].type != tarfile.REGTYPE:
                        info.type, info.linkname = tarfile.REGTYPE, ""
                    tar.addfile(info, io.BytesIO(b""))
                else:
                    size = int(rng.lognormvariate(8, 2)) % (4 << 20)
                    info.size = size
                    if kind > 0.99:
                        info.pax_headers = {"SCHILY.xattr.security.capability": "\x01" * 20}
                    tar.addfile(info, io.BytesIO(bytes(size)))
                made += 1
            d += 1


def small_files(path: Path, entries: int) -> None:
    """Like the bench's manysmall image: files of 1-8 KiB, 1,000 per directory."""
    rng = random.Random(16)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(entries):
            if i % 1000 == 0:
                info = tarfile.TarInfo(f"data/d{i // 1000:04d}")
                info.type, info.mtime = tarfile.DIRTYPE, 1_700_000_000
                tar.addfile(info)
            info = tarfile.TarInfo(f"data/d{i // 1000:04d}/file{i:06d}.dat")
            info.size, info.mtime = rng.randrange(1024, 8192), 1_700_000_000 + i % 5
            tar.addfile(info, io.BytesIO(bytes(info.size)))


def system_tar(path: Path) -> None:
    paths = [p for p in SOURCES if Path("/", p).exists()]
    subprocess.run(["tar", "-C", "/", "-cf", str(path), *paths], check=False,
                   stderr=subprocess.DEVNULL)


def index_of(tar: Path) -> LayerIndex:
    out = io.BytesIO()
    with open(tar, "rb") as f:
        build_index(f, out, IndexBuildOptions())
    return LayerIndex.from_bytes(out.getvalue())


def measure(name: str, index: LayerIndex, runs: int, profile: bool) -> None:
    print(f"{name}: {len(index)} entries, layer {index.uncompressed_size / 1e6:.1f} MB")
    for compact_mtime in (False, True):
        walls, cpus = [], []
        size = 0
        for _ in range(runs):
            w, c = time.perf_counter(), time.process_time()
            size = len(image_bytes(index, compact_mtime=compact_mtime))
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        per = 10_000 / len(index) * 1000
        print(f"  compact_mtime={compact_mtime}: image {size / 1e3:.1f} KB = "
              f"{100 * size / index.uncompressed_size:.3f}% of the layer, "
              f"{size / len(index):.1f} bytes/entry")
        print(f"    build wall best {min(walls) * 1000:.1f} ms, median "
              f"{statistics.median(walls) * 1000:.1f} ms; cpu best {min(cpus) * 1000:.1f} ms")
        print(f"    per 10,000 entries: wall best {min(walls) * per:.1f} ms, median "
              f"{statistics.median(walls) * per:.1f} ms, cpu best {min(cpus) * per:.1f} ms")
        tracemalloc.start()
        image_bytes(index, compact_mtime=compact_mtime)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"    peak traced memory {peak / 1e6:.1f} MB = {peak / len(index):.0f} "
              f"bytes/entry (the returned image's copy included)")
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            image_bytes(index, compact_mtime=compact_mtime)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--tar", type=Path, help="a real uncompressed layer tar to measure too")
    ap.add_argument("--no-system", action="store_true", help="skip tarring system directories")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="erofs-bench.") as tmp:
        work = Path(tmp)
        gen = work / "synthetic.tar"
        synthetic(gen, args.entries)
        measure("synthetic", index_of(gen), args.runs, args.profile)
        gen.unlink()
        small = work / "small.tar"
        small_files(small, 50_000)
        measure("small files (50,000 of 1-8 KiB)", index_of(small), args.runs, args.profile)
        small.unlink()
        real = args.tar
        if real is None and not args.no_system:
            real = work / "system.tar"
            system_tar(real)
        if real is not None:
            measure(f"real layer {real.name}", index_of(real), args.runs, args.profile)


if __name__ == "__main__":
    main()
