"""Read amplification of the clip index: fixed vs adaptive checkpoints, with and without resume
points. Prints numbers, asserts nothing.

    .venv/bin/python bench/resume_bench.py [--blob LAYER.tar.gz ...] [--workdir DIR]

Without --blob it makes two gzip -6 layers: a text-heavy one (a tar of /usr/lib/python3.11) and
one of random bytes (64 MiB). For each it reports, for the fixed spacing rules only
(window_share=0) and for the adaptive density rule: checkpoints, index size as a share of the
uncompressed layer, build time, compressed bytes per random 4 KiB read; then the compressed
bytes a workload fetches with checkpoints alone vs with resume points (ResumePoints, the nearest
recorded point <= the read, points recorded by every fetch):

* scattered: 50 small files (< 64 KiB) picked at random, read in stream order (an import);
* random: 300 random 4 KiB reads in random order;
* blocks: every 1 MiB block of the layer in a random order (what the read path's block reads
  do when a workload touches the whole layer), counted against the layer's compressed size.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from snapshotter.index import (
    EntryType,
    IndexBuildOptions,
    LayerIndex,
    ResumePoints,
    build_index,
    compressed_range_from,
    inflate_from,
)

FIXED = IndexBuildOptions(window_share=0)
ADAPTIVE = IndexBuildOptions()
BLOCK = 1 << 20


def make_layers(work: Path) -> list[Path]:
    text = work / "python3.11.tar"
    subprocess.run(["tar", "-C", "/usr/lib", "-cf", str(text), "python3.11"], check=True,
                   stderr=subprocess.DEVNULL)
    rnd = random.Random(1)
    randomtar = work / "random.tar"
    src = work / "random"
    src.mkdir()
    for i in range(16):
        (src / f"r{i}.bin").write_bytes(rnd.randbytes(4 << 20))
    subprocess.run(["tar", "-C", str(src), "-cf", str(randomtar), "."], check=True)
    for tar in (text, randomtar):
        subprocess.run(["gzip", "-6", "-f", str(tar)], check=True)
    return [work / "python3.11.tar.gz", work / "random.tar.gz"]


Reads = list[tuple[int, int]]


def workloads(index: LayerIndex) -> dict[str, Reads]:
    rnd = random.Random(42)
    files = [index.entry(i) for i in range(len(index))
             if index.entry(i).type is EntryType.FILE and index.entry(i).size > 0]
    small = [e for e in files if e.size < 64 << 10]
    scattered = sorted((e.uoff, e.size) for e in rnd.sample(small, min(50, len(small))))
    big = [e for e in files if e.size >= 4096]
    random_reads = []
    for _ in range(300):
        e = rnd.choice(big)
        random_reads.append((e.uoff + rnd.randrange(e.size - 4095), 4096))
    size = index.uncompressed_size
    blocks = [(b * BLOCK, min(BLOCK, size - b * BLOCK)) for b in range(-(-size // BLOCK))]
    rnd.shuffle(blocks)
    return {"scattered": scattered, "random": random_reads, "blocks": blocks}


def fetched(index: LayerIndex, blob: bytes, reads: Reads, resume: bool) -> tuple[int, float]:
    """Compressed bytes fetched and CPU seconds to serve ``reads`` (no caching of data)."""
    points = ResumePoints(index, max_points=256)
    total = 0
    t = time.process_time()
    for uoff, length in reads:
        start = points.best_start(uoff) if resume else index.checkpoint_before(uoff)
        c0, c1 = compressed_range_from(index, start, uoff, length)
        total += c1 - c0
        res = inflate_from(index, start, blob[c0:c1], uoff, length,
                           record_every=256 << 10 if resume else None)
        points.add(res.points)
    return total, time.process_time() - t


def build(blob: Path, opts: IndexBuildOptions) -> tuple[LayerIndex, int, float]:
    out = io.BytesIO()
    t = time.perf_counter()
    with open(blob, "rb") as f:
        res = build_index(f, out, opts)
    return LayerIndex.from_bytes(out.getvalue()), res.index_size, time.perf_counter() - t


def report(blob: Path) -> None:
    data = blob.read_bytes()
    print(f"layer {blob.name}: {len(data) / 1e6:.1f} MB compressed")
    for name, opts in (("fixed", FIXED), ("adaptive", ADAPTIVE)):
        index, isize, secs = build(blob, opts)
        usize = index.uncompressed_size
        costs = []
        for uoff, length in workloads(index)["random"]:
            c0, c1 = index.compressed_range(uoff, length)
            costs.append(c1 - c0)
        print(f"  {name:8s}: {index.checkpoint_count} checkpoints, index {isize / 1e6:.2f} MB "
              f"= {100 * isize / usize:.2f}% of {usize / 1e6:.0f} MB, build {secs:.2f} s; "
              f"random 4 KiB read: mean {statistics.mean(costs) / 1024:.0f} KiB, median "
              f"{statistics.median(costs) / 1024:.0f} KiB, max {max(costs) / 1024:.0f} KiB")
        for wname, reads in workloads(index).items():
            useful = sum(n for _, n in reads)
            line: list[str] = []
            for label, resume in (("checkpoints", False), ("+resume", True)):
                total, cpu = fetched(index, data, reads, resume)
                line.append(f"{label} {total / 1e6:.2f} MB ({cpu:.2f} s CPU)")
            print(f"      {wname:9s} ({len(reads)} reads, {useful / 1e6:.2f} MB uncompressed): "
                  + ", ".join(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--blob", type=Path, action="append", help="gzip layer blob(s)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a tempdir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        blobs = args.blob or make_layers(Path(tmp))
        for blob in blobs:
            report(blob)


if __name__ == "__main__":
    main()
