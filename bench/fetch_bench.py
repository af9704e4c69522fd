"""Registry bytes of one layer's life on a node: a start profile, a background fetch of the
rest and random foreground reads meanwhile, all through the read path against a local blob.
Prints served vs distinct vs blob bytes and the request count; asserts nothing.

    PYTHONPATH=$PWD .venv/bin/python bench/fetch_bench.py [--blob LAYER.tar.gz] [--reads N]
        [--no-background]

"served" is what the registry would send (the sum of every requested range), "distinct" the
union of those ranges; served > distinct means requests overlapped (bytes crossing the network
twice). The source answers after `--latency-ms` (a registry's round trip), so fetches overlap
in time as they do on a node. Only APIs that exist before and after the fetch-planning change
are used, so the same script measures both (run it with PYTHONPATH at either tree).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import trio

from snapshotter.cache import DiskCache, MemoryTier
from snapshotter.config import BackgroundFetchConfig
from snapshotter.index import EntryType, IndexBuildOptions, LayerIndex, build_index
from snapshotter.readpath import FileSource, Layer, ReadPath, ReadPolicy
from snapshotter.remote.background import BackgroundFetch
from snapshotter.remote.profile import StartProfile

DEFAULT_BLOB = Path(__file__).resolve().parent / "work" / "layers" / "sci.tar.gz"


class Recorder:
    """FileSource with a round-trip delay that records every requested range."""

    def __init__(self, blob: Path, latency: float) -> None:
        self.file = FileSource(blob)
        self.latency = latency
        self.spans: list[tuple[int, int]] = []

    async def __call__(self, coff: int, length: int) -> bytes:
        self.spans.append((coff, coff + length))
        await trio.sleep(self.latency)
        return await self.file(coff, length)


def distinct(spans: list[tuple[int, int]]) -> int:
    total, reach = 0, 0
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def overlapping_pairs(spans: list[tuple[int, int]]) -> int:
    ordered = sorted(spans)
    count = 0
    for i, (_, end) in enumerate(ordered):
        j = i + 1
        while j < len(ordered) and ordered[j][0] < end:
            count += 1
            j += 1
    return count


def workload(index: LayerIndex, reads: int, seed: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A start profile (the blocks of 30 random small files) and `reads` random file reads."""
    rnd = random.Random(seed)
    files = [index.entry(i) for i in range(len(index))
             if index.entry(i).type is EntryType.FILE and index.entry(i).size > 0]
    block = 1 << 20
    profile = sorted({e.uoff // block for e in rnd.sample(files, min(30, len(files)))})
    out = []
    for e in rnd.sample(files, min(reads, len(files))):
        length = min(e.size, rnd.choice([4096, 65536, 262144]))
        out.append((e.uoff + rnd.randrange(e.size - length + 1), length))
    return profile, out


async def scenario(layer: Layer, rp: ReadPath, profile: list[int],
                   reads: list[tuple[int, int]], background: bool) -> None:
    options = BackgroundFetchConfig(enabled=background, bytes_per_second=256 << 20,
                                    concurrency=2)
    fetch = BackgroundFetch(rp, options)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch.run, layer, StartProfile(profile))
        for i in range(0, len(reads), 5):  # five concurrent reads, then a pause
            async with trio.open_nursery() as batch:
                for uoff, length in reads[i : i + 5]:
                    batch.start_soon(rp.read, layer, uoff, length)
            await trio.sleep(0.05)


def measure(blob: Path, index: LayerIndex, reads: int, latency: float, workdir: Path,
            background: bool) -> None:
    source = Recorder(blob, latency)
    rp = ReadPath(None, MemoryTier(), ReadPolicy())
    cache = DiskCache(workdir).layer(index.blob_digest)
    layer = Layer("bench", index, source, cache)
    profile, work = workload(index, reads, 1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            rp.bind(nursery)
            await scenario(layer, rp, profile, work, background)
            nursery.cancel_scope.cancel()

    t0 = time.perf_counter()
    trio.run(main)
    secs = time.perf_counter() - t0
    size = blob.stat().st_size
    served = sum(e - s for s, e in source.spans)
    print(f"blob {blob.name}: {size / 1e6:.1f} MB, complete on disk: {cache.complete()}, "
          f"{secs:.1f} s")
    print(f"  served {served / 1e6:.2f} MB ({served / size:.3f}x blob), distinct "
          f"{distinct(source.spans) / 1e6:.2f} MB, {len(source.spans)} requests, "
          f"{overlapping_pairs(source.spans)} overlapping pairs; {len(profile)} profile blocks, "
          f"{len(work)} foreground reads, {rp.stats.inflated_bytes / 1e6:.1f} MB inflated")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--blob", type=Path, default=DEFAULT_BLOB, help="gzip layer blob")
    parser.add_argument("--reads", type=int, default=60, help="random foreground reads")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="source round trip")
    parser.add_argument("--background", action=argparse.BooleanOptionalAction, default=True,
                        help="fetch the rest of the layer (off: profile and reads only)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a tempdir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        out = Path(tmp) / "index"
        with open(args.blob, "rb") as f:
            build_index(f, out, IndexBuildOptions())
        index = LayerIndex.open(out)
        measure(args.blob, index, args.reads, args.latency_ms / 1000, Path(tmp) / "cache",
                args.background)


if __name__ == "__main__":
    main()
