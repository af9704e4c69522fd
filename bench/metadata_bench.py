"""Benchmark of clip's metadata path over the real socket (not a test: it prints numbers).

Starts ``clip serve`` on a temporary root, then measures from a grpc.aio client:
Prepare+Commit pairs per second, Stat per second, and p50/p99 latency of Prepare, Commit and
Stat (sequential calls, so latency is per call, not hidden by concurrency). Targets from the
issue: Prepare p50 <= 5 ms, Stat p50 <= 1 ms.

    .venv/bin/python bench/metadata_bench.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

MD = (("containerd-namespace", "bench"),)


def start_daemon(work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = work / "clip.sock"
    args = ["serve", "--root", str(work / "root"), "--address", str(sock), "--log-level", "info"]
    proc = subprocess.Popen([sys.executable, "-m", "snapshotter", *args], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(sock))
            return proc, sock
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    proc.kill()
    raise SystemExit("clip serve did not start")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def run(sock: Path, n: int) -> None:
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        s = pb_grpc.SnapshotsStub(ch)
        labels = {"containerd.io/snapshot.ref": "sha256:" + "0" * 64}
        prep: list[float] = []
        commit: list[float] = []
        parent = ""
        t0 = time.perf_counter()
        for i in range(n):
            a = time.perf_counter()
            await s.Prepare(
                pb.PrepareSnapshotRequest(key=f"bench/{i}/extract", parent=parent, labels=labels),
                metadata=MD,
            )
            b = time.perf_counter()
            # a chain of 100 layers at most, like real images, then start a new one
            name = f"bench/{i}/layer"
            await s.Commit(
                pb.CommitSnapshotRequest(key=f"bench/{i}/extract", name=name), metadata=MD
            )
            c = time.perf_counter()
            prep.append(b - a)
            commit.append(c - b)
            parent = name if i % 100 != 99 else ""
        pairs = n / (time.perf_counter() - t0)
        stat: list[float] = []
        t0 = time.perf_counter()
        for i in range(n):
            a = time.perf_counter()
            await s.Stat(pb.StatSnapshotRequest(key=f"bench/{i}/layer"), metadata=MD)
            stat.append(time.perf_counter() - a)
        stats = n / (time.perf_counter() - t0)
    print(f"snapshots: {n} (chains of 100)")
    print(f"Prepare+Commit: {pairs:8.0f} pairs/s")
    print(f"Stat:           {stats:8.0f} calls/s")
    for name, values in (("Prepare", prep), ("Commit", commit), ("Stat", stat)):
        print(
            f"{name:8} p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):6.2f} ms"
            f"  mean {statistics.fmean(values) * 1000:6.2f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="snapshots to create (default 2000)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clip-bench-", dir="/tmp"))
    proc, sock = start_daemon(work)
    try:
        asyncio.run(run(sock, args.n))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
