"""Blob server vs pyfuse3: requests and throughput of a cold sequential read (prints only).

One blob of --size-mib MiB whose read callback answers from memory, served by
- `blobserver`: snapshotter.fs.blobserver (own FUSE protocol on /dev/fuse, 1 MiB requests,
  readahead raised to 1 MiB);
- `pyfuse3`: a minimal pyfuse3/libfuse file system serving the same bytes the same way, with the
  kernel's default readahead (what the existing snapshotter.fs mount gets);
- `pyfuse3-ra1m`: the same with the connection's readahead raised to 1 MiB in sysfs, to separate
  the protocol library from the readahead window.
Each server runs in its own process on a fresh mount (cold page cache); this process reads the
file with 1 MiB read(2) calls and reports the wall time, MB/s and the number of READ requests the
server saw (and their mean size).

Then the failover gap: a server is killed (SIGKILL) while a read waits in it, a new one is started
at once; reported are the seconds from the kill until the new server serves and until the waiting
read returns (Python start-up dominates).

Run as root: `PYTHONPATH=$PWD .venv/bin/python bench/blobserver_bench.py [--size-mib 256]`.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from snapshotter.fs import holder
from snapshotter.fs.fuseproto import device_of_mount
from snapshotter.fs.mounts import lazy_unmount

MiB = 1 << 20
IMPLS = ("blobserver", "pyfuse3", "pyfuse3-ra1m")


def blob_bytes(size: int) -> bytes:
    block = bytes(range(256)) * (MiB // 256)
    return (block * (size // MiB + 1))[:size]


# --- servers (child processes) ------------------------------------------------------------------


def serve_blobserver(
    mnt: Path, size: int, report: Callable[[int, int], None], stall_from: int | None = None
) -> None:
    from snapshotter.fs.blobserver import BlobServer

    data = blob_bytes(size)
    counts = [0, 0]

    async def read(name: str, offset: int, length: int) -> bytes:
        if stall_from is not None and offset + length > stall_from:
            print("stalled", flush=True)
            await trio.sleep_forever()
        counts[0] += 1
        counts[1] += length
        return data[offset : offset + length]

    async def main() -> None:
        server = BlobServer(mnt, mnt.parent / "holder.sock")
        server.add("blob", size, read)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                print("ready", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
        if stall_from is None:
            server.unmount()

    trio.run(main)
    report(*counts)


def serve_pyfuse3(mnt: Path, size: int, report: Callable[[int, int], None], ra_kib: int) -> None:
    import pyfuse3

    from snapshotter.fs.fuseproto import set_readahead

    data = blob_bytes(size)
    counts = [0, 0]
    ino = pyfuse3.ROOT_INODE + 1

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.st_mode = (stat.S_IFDIR | 0o555) if inode == pyfuse3.ROOT_INODE else (
                stat.S_IFREG | 0o444)
            attr.st_size = 0 if inode == pyfuse3.ROOT_INODE else size
            attr.entry_timeout = attr.attr_timeout = 3600
            return attr

        async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            return self._attr(inode)

        async def lookup(
            self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
        ) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name != b"blob":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(ino)

        async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, offset: int, length: int) -> bytes:
            counts[0] += 1
            counts[1] += min(length, max(0, size - offset))
            return data[offset : offset + length]

    pyfuse3.init(Ops(), os.fspath(mnt), {"fsname=benchfuse", "ro", "allow_other"})
    try:
        if ra_kib:
            # from the mount table: a stat of the root would wait for this very server
            found = device_of_mount(mnt)
            assert found is not None
            set_readahead(found[1], ra_kib)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pyfuse3.main)
                print("ready", flush=True)
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
    report(*counts)


def child(impl: str, mnt: Path, size: int, stall_from: int | None) -> None:
    def report(requests: int, nbytes: int) -> None:
        print(f"requests {requests} {nbytes}", flush=True)

    if impl == "blobserver":
        serve_blobserver(mnt, size, report, stall_from)
    else:
        serve_pyfuse3(mnt, size, report, 1024 if impl.endswith("ra1m") else 0)


# --- the measurement ---------------------------------------------------------------------------


def measure(impl: str, size: int, work: Path) -> tuple[float, int, int]:
    mnt = work / impl / "mnt"
    mnt.mkdir(parents=True)
    proc = start_server(impl, mnt, size)
    assert proc.stdout is not None
    try:
        path = mnt / "blob" if impl != "blobserver" else mnt / "blobs" / "blob"
        fd = os.open(path, os.O_RDONLY)
        start = time.perf_counter()
        total = 0
        while chunk := os.read(fd, MiB):
            total += len(chunk)
        elapsed = time.perf_counter() - start
        os.close(fd)
        if total != size:
            raise SystemExit(f"{impl}: read {total} bytes, expected {size}")
        proc.send_signal(signal.SIGTERM)
        _, requests, nbytes = proc.stdout.readline().split()
        return elapsed, int(requests), int(nbytes)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def start_server(impl: str, mnt: Path, size: int, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, os.fspath(Path(__file__).resolve()), "--serve", impl, "--mnt",
         os.fspath(mnt), "--size-mib", str(size // MiB), *extra],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"{impl}: server did not start")
    return proc


def measure_failover(size: int, work: Path) -> tuple[float, float]:
    """SIGKILL the server while a read waits in it; (seconds until the new server serves,
    seconds until the waiting read returned), both from the kill."""
    mnt = work / "failover" / "mnt"
    mnt.mkdir(parents=True)
    stall = size // 2
    old = start_server("blobserver", mnt, size, "--stall-from", str(stall))
    new: subprocess.Popen[str] | None = None
    # The reader is a process of its own: this one forks servers, and a fork's close of an
    # inherited FUSE file is a FLUSH that would wait for the very server being started.
    reader = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "os.pread(fd, 1 << 20, int(sys.argv[2])); print('done', flush=True)",
         os.fspath(mnt / "blobs" / "blob"), str(stall)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert old.stdout is not None and reader.stdout is not None
        if old.stdout.readline().strip() != "stalled":
            raise SystemExit("failover: the read did not reach the server")
        killed = time.perf_counter()
        old.kill()
        old.wait()
        new = start_server("blobserver", mnt, size)
        serving = time.perf_counter()
        if reader.stdout.readline().strip() != "done":
            raise SystemExit("failover: the waiting read failed")
        answered = time.perf_counter()
        reader.wait()
        return serving - killed, answered - killed
    finally:
        for proc in (old, new, reader):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        if device_of_mount(mnt) is not None:  # a failed run: shut the session down for real
            holder.release(mnt.parent / "holder.sock")
            lazy_unmount(mnt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--mnt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stall-from", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size_mib * MiB
    if args.serve:
        child(args.serve, args.mnt, size, args.stall_from)
        return
    print(f"cold sequential read of a {args.size_mib} MiB blob answered from memory, "
          f"1 MiB read(2) calls, best of {args.runs}")
    print(f"{'server':<14} {'MB/s':>8} {'seconds':>8} {'requests':>9} {'mean KiB':>9}")
    for impl in IMPLS:
        results = []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="blobbench-") as tmp:
                results.append(measure(impl, size, Path(tmp) / str(run)))
        elapsed, requests, nbytes = min(results)
        print(f"{impl:<14} {size / elapsed / 1e6:8.0f} {elapsed:8.3f} {requests:9d} "
              f"{nbytes / max(requests, 1) / 1024:9.0f}")
    gaps = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="blobbench-") as tmp:
            gaps.append(measure_failover(size, Path(tmp) / str(run)))
    serving, answered = min(gaps, key=lambda g: g[1])
    print(f"failover (SIGKILL while a read waits, best of {args.runs}): new server serving "
          f"{serving:.3f} s after the kill, the waiting read answered {answered:.3f} s after it")


if __name__ == "__main__":
    main()
