"""Benchmark of the clip index (issue #2): prints numbers, asserts nothing.

    .venv/bin/python bench/index_bench.py [--blob LAYER.tar.gz] [--workdir DIR] [--skip-engines]

Without --blob it tars real system directories (>= 200 MB uncompressed) and gzips them. It
reports: bare inflate speed of every candidate engine on that blob, build throughput next to
the chosen engine's bare speed (wall and CPU time, calling thread vs pipeline threads), index
size as a share of the uncompressed layer, the time to open a 100k-entry index, compressed
bytes read per random 4 KiB read, and the CPU cost of entry(), names() and lookup().
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from snapshotter.index import EntryType, LayerIndex, build_index, builder, inflate_range
from snapshotter.index import inflate as engine

SOURCES = ["usr/lib/python3", "usr/share/doc", "usr/share/locale", "usr/share/perl",
           "usr/lib/x86_64-linux-gnu/perl-base", "usr/share/man"]
MIN_LAYER = 200 << 20


def make_layer(work: Path) -> Path:
    paths = [p for p in SOURCES if Path("/", p).exists()]
    tar = work / "layer.tar"
    subprocess.run(["tar", "-C", "/", "-cf", str(tar), *paths], check=False,
                   stderr=subprocess.DEVNULL)
    if tar.stat().st_size < MIN_LAYER:
        subprocess.run(["tar", "-C", "/", "-rf", str(tar), "usr/bin"], check=False,
                       stderr=subprocess.DEVNULL)
    subprocess.run(["gzip", "-6", "-k", "-f", str(tar)], check=True)
    tar.unlink()
    return work / "layer.tar.gz"


def best_of(n: int, fn: Callable[[], int]) -> tuple[float, float, int]:
    """Fastest wall and CPU time of n runs (the box is shared: the minimum is the least
    disturbed run; CPU time counts every thread of the process)."""
    walls, cpus = [], []
    produced = 0
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        produced = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), produced


THREAD_CPU: dict[str, float] = {}


def _count_thread_cpu(cls: type[threading.Thread]) -> None:
    """Record the CPU time of the builder's pipeline threads (bench-only instrumentation)."""
    run = cls.run

    def timed(self: threading.Thread) -> None:
        start = time.thread_time()
        try:
            run(self)
        finally:
            THREAD_CPU[self.name] = time.thread_time() - start

    cls.run = timed  # type: ignore[method-assign]


_count_thread_cpu(builder._Reading)
_count_thread_cpu(builder._Decoding)


def timed_build(blob: Path, out: Path) -> tuple[float, float, dict[str, float], int]:
    """(wall, CPU of all threads, CPU per thread, uncompressed size) of one build.

    The calling thread parses tar headers, hashes file data and serialises; the reading
    thread hashes the blob; the decoding thread inflates.
    """
    w, c, t = time.perf_counter(), time.process_time(), time.thread_time()
    with open(blob, "rb") as f:
        size = build_index(f, out).uncompressed_size
    threads = {"calling": time.thread_time() - t, **THREAD_CPU}
    return time.perf_counter() - w, time.process_time() - c, threads, size


def _module_inflate(mod: object, data: bytes) -> Callable[[], int]:
    def run() -> int:
        d = mod.decompressobj(31)  # type: ignore[attr-defined]
        n = 0
        for i in range(0, len(data), 1 << 20):
            n += len(d.decompress(data[i : i + (1 << 20)]))
        return n

    return run


def _ctypes_inflate(data: bytes) -> Callable[[], int]:
    def run() -> int:
        inf = engine.Inflater(engine.GZIP)
        n = 0
        for i in range(0, len(data), 1 << 20):
            inf.feed(data[i : i + (1 << 20)])
            while True:
                rc, out = inf.run(engine.Z_NO_FLUSH)
                n += len(out)
                if rc != engine.Z_OK or (not inf.avail_in and not len(out)):
                    break
        inf.close()
        return n

    return run


def bare_inflate(blob: Path, data: bytes) -> dict[str, float]:
    results: dict[str, float] = {}
    cands: dict[str, Callable[[], int]] = {"stdlib zlib": _module_inflate(zlib, data)}
    try:
        import isal.isal_zlib as isal_zlib

        cands["isal (python module)"] = _module_inflate(isal_zlib, data)
    except ImportError:
        pass
    try:
        import zlib_ng.zlib_ng as zng

        cands["zlib-ng (python module)"] = _module_inflate(zng, data)
    except ImportError:
        pass
    cands[f"clip ctypes engine ({engine.ENGINE})"] = _ctypes_inflate(data)
    try:
        import rapidgzip

        def rg() -> int:
            with rapidgzip.open(str(blob), parallelization=1) as f:
                return sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))

        cands["rapidgzip (1 thread)"] = rg
    except ImportError:
        pass
    try:
        import indexed_gzip

        def ig() -> int:
            with indexed_gzip.IndexedGzipFile(str(blob), spacing=2 << 20) as f:
                return sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))

        cands["indexed_gzip (builds its index)"] = ig
    except ImportError:
        pass
    for name, fn in cands.items():
        wall, cpu, produced = best_of(3, fn)
        results[name] = produced / wall / 1e6
        print(f"  {name:34s} {results[name]:7.0f} MB/s uncompressed "
              f"({produced / cpu / 1e6:.0f} MB/s per CPU second)")
    return results


def many_entries_index(work: Path, count: int) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"d{i % 300:03d}/sub{i % 7}/file-{i:06d}.txt")
            payload = b"x" * (i % 50)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    out = work / "many.idx"
    build_index(io.BytesIO(buf.getvalue()), out)
    return out


def random_reads(index: LayerIndex, data: bytes, reads: int) -> None:
    rnd = random.Random(42)
    files = [i for i in range(len(index)) if index.entry(i).type is EntryType.FILE
             and index.entry(i).size >= 4096]
    costs, seconds = [], []
    for _ in range(reads):
        e = index.entry(rnd.choice(files))
        uoff = e.uoff + rnd.randrange(0, e.size - 4096 + 1)
        c0, c1 = index.compressed_range(uoff, 4096)
        t = time.perf_counter()
        got = inflate_range(index, c0, data[c0:c1], uoff, 4096)
        seconds.append(time.perf_counter() - t)
        assert len(got) == 4096
        costs.append(c1 - c0)
    gaps = [index.checkpoint(i + 1).coff - index.checkpoint(i).coff
            for i in range(index.checkpoint_count - 1)]
    print(f"  compressed bytes per random 4 KiB read: mean {statistics.mean(costs) / 1024:.0f}"
          f" KiB, median {statistics.median(costs) / 1024:.0f} KiB, max "
          f"{max(costs) / 1024:.0f} KiB (checkpoint interval: max {max(gaps) / 1024:.0f} KiB)")
    print(f"  inflate time per random 4 KiB read: median "
          f"{statistics.median(seconds) * 1e3:.1f} ms")


def entry_costs(index: LayerIndex) -> None:
    """CPU per decoded entry, per listed name and per path lookup (what getattr, readdir and
    lookup in the FUSE layer pay)."""
    n = len(index)
    t = time.process_time()
    for i in range(n):
        index.entry(i)
    per_entry = (time.process_time() - t) / n
    dirs = [i for i in range(n) if len(index.children(i))]
    listed = sum(len(index.children(d)) for d in dirs)
    t = time.process_time()
    for d in dirs:
        index.names(d)
    per_name = (time.process_time() - t) / max(listed, 1)
    rnd = random.Random(1)
    paths = [index.entry(rnd.randrange(n)).path for _ in range(5000)]
    t = time.process_time()
    for p in paths:
        index.lookup(p)
    per_lookup = (time.process_time() - t) / len(paths)
    print(f"  entry(): {per_entry * 1e6:.2f} us CPU each; names(): {per_name * 1e6:.2f} us per "
          f"child; lookup(path): {per_lookup * 1e6:.1f} us (mean depth "
          f"{statistics.mean(p.count('/') + 1 for p in paths):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob", type=Path, help="gzip layer blob (default: made from /usr)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a tempdir)")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--skip-engines", action="store_true",
                        help="do not measure the other inflate engines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        blob = args.blob or make_layer(work)
        data = blob.read_bytes()
        print(f"layer: {blob} ({len(data) / 1e6:.0f} MB compressed)")
        if not args.skip_engines:
            print("bare inflate, same blob, best of 3:")
            bare_inflate(blob, data)

        # build and bare inflate alternate, so both see the same load on a shared machine
        bare_fn = _ctypes_inflate(data)
        rounds = [(timed_build(blob, work / "layer.idx"), best_of(1, bare_fn)) for _ in range(5)]
        b_wall = min(r[0][0] for r in rounds)
        b_cpu = min(r[0][1] for r in rounds)
        i_wall = min(r[1][0] for r in rounds)
        i_cpu = min(r[1][1] for r in rounds)
        usize = rounds[0][0][3]
        threads = min((r[0][2] for r in rounds), key=lambda t: sum(t.values()))
        print(f"build: {usize / 1e6:.0f} MB uncompressed in {b_wall:.2f} s = "
              f"{usize / b_wall / 1e6:.0f} MB/s wall = {100 * i_wall / b_wall:.0f}% of bare "
              f"{engine.ENGINE} inflate measured alongside ({usize / i_wall / 1e6:.0f} MB/s; "
              "target >= 60%)")
        b_median = statistics.median(r[0][0] for r in rounds)
        i_median = statistics.median(r[1][0] for r in rounds)
        print(f"       (best of {len(rounds)} each; medians: build {b_median:.2f} s, bare inflate "
              f"{i_median:.2f} s = {100 * i_median / b_median:.0f}%)")
        # On two free cores the pipeline's wall time tends to the longest thread or half the
        # total CPU, whichever is larger: that is what the build would take on an idle box.
        bound = max(max(threads.values()), b_cpu / 2)
        print(f"       CPU: build {b_cpu:.2f} s (all threads) vs bare inflate {i_cpu:.2f} s = "
              f"{100 * i_cpu / b_cpu:.0f}%; per thread: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in threads.items())
              + f"; estimate for two free cores: ~{bound:.2f} s = "
              f"{100 * i_cpu / bound:.0f}% of bare")
        print(f"       cores seen by this process: {len(os.sched_getaffinity(0))}, "
              f"load average {os.getloadavg()[0]:.1f}")
        index = LayerIndex.open(work / "layer.idx")
        isize = os.path.getsize(work / "layer.idx")
        print(f"index: {len(index)} entries, {index.checkpoint_count} checkpoints, "
              f"{isize / 1e6:.2f} MB = {100 * isize / usize:.2f}% of uncompressed "
              "(target <= 1%)")
        random_reads(index, data, 300)
        entry_costs(index)
        many = many_entries_index(work, args.entries)
        opens = []
        for _ in range(10):
            t = time.perf_counter()
            big = LayerIndex.open(many)
            big.lookup("d150/sub3/file-050000.txt")
            opens.append(time.perf_counter() - t)
        print(f"open + one lookup, {len(big)}-entry index ({os.path.getsize(many) / 1e6:.1f} MB)"
              f": median {statistics.median(opens) * 1e3:.1f} ms (target <= 100 ms)")


if __name__ == "__main__":
    main()
