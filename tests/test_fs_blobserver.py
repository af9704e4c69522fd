"""BlobServer on a real /dev/fuse mount, served in this process: the bytes of each blob through
normal file I/O, large reads arriving as large requests, slow reads not holding up others,
removal, read-only answers, read errors, and a second run() taking over its own session.

File I/O runs in worker threads (trio.to_thread) while the server answers on the trio thread;
synchronisation is on events set by the read callbacks, never on sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import select
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
import trio
import trio.testing
from fs_layers import M, index_layer, pread, write_layer

from snapshotter.erofs import write_image
from snapshotter.erofs.mount import mount_image, unmount
from snapshotter.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snapshotter.fs import fuseproto as fp
from snapshotter.fs import holder
from snapshotter.fs.blobserver import NARROW_READAHEAD_KIB, BlobServer, ReadFn, blob_inode
from snapshotter.fs.mounts import lazy_unmount

KiB = 1 << 10
MiB = 1 << 20


@dataclass
class Paths:
    mnt: Path
    sock: Path

    @property
    def pidfile(self) -> Path:
        return self.sock.with_suffix(".pid")


def _wait_exit(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    p = Paths(tmp_path / "mnt", tmp_path / "holder.sock")
    try:
        yield p
    finally:
        holder.release(p.sock)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(p.pidfile.read_text())
            if b"snapshotter.fs.holder" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                _wait_exit(pid)
        if fp.device_of_mount(p.mnt) is not None:
            lazy_unmount(p.mnt)
    assert fp.device_of_mount(p.mnt) is None


def memory(data: bytes, sizes: list[int] | None = None) -> ReadFn:
    async def read(name: str, offset: int, size: int) -> bytes:
        if sizes is not None:
            sizes.append(size)
        return data[offset : offset + size]

    return read


@contextlib.asynccontextmanager
async def serving(server: BlobServer) -> AsyncIterator[BlobServer]:
    """Run `server` for the body, then shut down for real and check nothing is left."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
    pid = int(server.holder_pidfile.read_text())
    server.unmount()
    await trio.to_thread.run_sync(_wait_exit, pid)
    assert fp.device_of_mount(server.mountpoint) is None


def read_all(path: Path, chunk: int = MiB) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(chunk):
            out += block
    return bytes(out)


def test_serves_blobs_in_large_reads(paths: Paths) -> None:
    data = os.urandom(32 * MiB)
    small = os.urandom(5000)
    sizes: list[int] = []

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        path = server.add("sha256-aa", len(data), memory(data, sizes))
        server.add("small", len(small), memory(small))
        async with serving(server):
            await trio.to_thread.run_sync(check, path)
            assert server.params is not None and server.params.max_pages == 256

    def check(path: Path) -> None:
        assert path == paths.mnt / "blobs" / "sha256-aa"
        assert read_all(path) == data
        assert read_all(paths.mnt / "blobs" / "small") == small
        assert sorted(os.listdir(paths.mnt)) == ["blobs"]
        assert sorted(os.listdir(paths.mnt / "blobs")) == ["sha256-aa", "small"]
        st = path.stat()
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_size) == (
            stat.S_IFREG | 0o444, 0, 0, len(data))
        assert st.st_ino == blob_inode("sha256-aa")

    reads_before = _counted("read")
    trio.run(main)
    # the sequential read arrived as large requests: nearly every byte in reads >= 512 KiB
    assert sum(sizes) == len(data)
    assert _counted("read") - reads_before == len(sizes) + 1  # + the small blob's one read
    assert sum(s for s in sizes if s >= 512 * KiB) >= 0.9 * len(data), sizes
    assert len(sizes) <= 40, sizes


def test_a_read_warms_the_rest_of_its_span(paths: Paths) -> None:
    """With `warm_span`, a small read brings the rest of its aligned span into the page cache
    (the kernel asks for it as readahead, served by the same callback), so later reads in the
    span send no request; a span is warmed once; the server's descriptor is opened once and
    closing a blob file sends no FLUSH (FOPEN_NOFLUSH: a close never waits for a server)."""
    data = os.urandom(4 * MiB)
    reads: list[tuple[int, int]] = []
    span_served = trio.Event()

    async def read(name: str, offset: int, size: int) -> bytes:
        reads.append((offset, size))
        if sum(n for o, n in reads if MiB <= o < 2 * MiB) >= MiB:
            span_served.set()
        return data[offset : offset + size]

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock, warm_span=MiB)
        path = server.add("blob", len(data), read)
        async with serving(server):
            flushes, opens = _counted("flush"), _counted("open")
            got = await trio.to_thread.run_sync(pread, path, MiB + 8192, 4096)
            assert got == data[MiB + 8192 : MiB + 12288]
            await span_served.wait()  # only the warming asks for the rest of span 1
            assert reads[0] == (MiB + 8192, 4096)
            served = len(reads)
            assert served <= 3  # the read, then the rest of the span in one or two requests
            got = await trio.to_thread.run_sync(pread, path, MiB, MiB)
            assert got == data[MiB : 2 * MiB]
            assert len(reads) == served  # the whole span came from the page cache
            got = await trio.to_thread.run_sync(pread, path, MiB + 700_000, 100)
            assert got == data[MiB + 700_000 : MiB + 700_100] and len(reads) == served
            assert _counted("flush") == flushes  # three closes, no FLUSH
            assert _counted("open") == opens + 3 + 1  # the test's three, the server's one
            server.remove("blob")  # closes the server's descriptor (no FLUSH either)
            assert _counted("flush") == flushes

    trio.run(main)


def test_warming_asks_only_for_what_the_blob_says_is_held(paths: Paths) -> None:
    """A blob's `warmable` limits warming: a lazy layer's read-path blocks are smaller than the
    span, and warming must not make the read path fetch the blocks it does not hold."""
    data = os.urandom(4 * MiB)
    held = [(MiB, MiB + 256 * KiB), (MiB + 768 * KiB, 2 * MiB)]
    reads: list[tuple[int, int]] = []
    warmed = trio.Event()
    asked: list[tuple[int, int]] = []

    def warmable(start: int, end: int) -> list[tuple[int, int]]:
        asked.append((start, end))
        return [(max(lo, start), min(hi, end)) for lo, hi in held if lo < end and start < hi]

    def covered(lo: int, hi: int) -> int:
        return sum(max(0, min(o + n, hi) - max(o, lo)) for o, n in reads)

    async def read(name: str, offset: int, size: int) -> bytes:
        reads.append((offset, size))
        if all(covered(lo, hi) >= hi - lo for lo, hi in held):
            warmed.set()
        return data[offset : offset + size]

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock, warm_span=MiB)
        path = server.add("blob", len(data), read, warmable)
        async with serving(server):
            got = await trio.to_thread.run_sync(pread, path, MiB + 8192, 4096)
            assert got == data[MiB + 8192 : MiB + 12288]
            await warmed.wait()
            assert set(asked) == {(MiB, 2 * MiB)}  # the read's span (and its warming reads')
            assert covered(MiB + 256 * KiB, MiB + 768 * KiB) == 0  # the part not held
            server.warm("blob", 3 * MiB, MiB)  # a caller's range: nothing of it is held
            assert asked[-1] == (3 * MiB, 4 * MiB)

    trio.run(main)
    assert all(not (3 * MiB <= o < 4 * MiB) for o, _ in reads)


def test_warm_takes_whole_spans_and_warming_around_reads_can_be_off(paths: Paths) -> None:
    """`warm` widens its range to whole spans (the kernel asks for each in one READ; a part
    left out would cost the container a READ of its own); while a blob's `warm_around` says
    False (its layer's start profile is prefetched and warmed run by run), an answered read
    warms nothing around itself, and once it says True again it does."""
    data = os.urandom(4 * MiB)
    reads: list[tuple[int, int]] = []
    around = False
    warmed = {2: trio.Event(), 3: trio.Event()}

    def covered(span: int) -> int:
        lo, hi = span * MiB, (span + 1) * MiB
        return sum(max(0, min(o + n, hi) - max(o, lo)) for o, n in reads)

    async def read(name: str, offset: int, size: int) -> bytes:
        reads.append((offset, size))
        for span, event in warmed.items():
            if covered(span) >= MiB:
                event.set()
        return data[offset : offset + size]

    async def main() -> None:
        nonlocal around
        server = BlobServer(paths.mnt, paths.sock, warm_span=MiB)
        path = server.add("blob", len(data), read, warm_around=lambda: around)
        async with serving(server):
            got = await trio.to_thread.run_sync(pread, path, 8192, 4096)
            assert got == data[8192:12288]
            # Queued after the read was answered: had the read warmed span 0, those READs
            # would have reached the server first (one warming worker, one request queue).
            server.warm("blob", 2 * MiB + 300 * KiB, 100 * KiB)
            await warmed[2].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert covered(0) == 4096
            assert covered(1) == 0 and covered(2) == MiB
            around = True
            got = await trio.to_thread.run_sync(pread, path, 3 * MiB + 8192, 4096)
            assert got == data[3 * MiB + 8192 : 3 * MiB + 12288]
            await warmed[3].wait()

    trio.run(main)


def test_files_opened_in_narrow_readahead_keep_a_small_window(paths: Paths) -> None:
    """A stream file opened inside `narrow_readahead` (as EROFS opens a recording layer's
    device) reads ahead at most NARROW_READAHEAD_KIB for as long as it is open; one opened
    afterwards gets large reads again."""
    data = os.urandom(16 * MiB)

    def open_unbuffered(path: Path) -> BinaryIO:
        return open(path, "rb", buffering=0)  # the caller closes it

    def sequential(f: BinaryIO, sizes: list[int]) -> None:
        sizes.clear()
        while f.read(64 * KiB):
            pass

    async def main() -> None:
        sizes: list[int] = []
        server = BlobServer(paths.mnt, paths.sock)
        path = server.add("blob", len(data), memory(data, sizes))
        async with serving(server):
            with server.narrow_readahead():  # opens go to this thread's server: not here
                narrow = await trio.to_thread.run_sync(open_unbuffered, path)
            wide = await trio.to_thread.run_sync(open_unbuffered, path)
            with narrow, wide:
                await trio.to_thread.run_sync(sequential, narrow, sizes)
                assert sum(sizes) == len(data)
                assert max(sizes) <= NARROW_READAHEAD_KIB * KiB, sizes
                await trio.to_thread.run_sync(os.posix_fadvise, wide.fileno(), 0, 0,
                                              os.POSIX_FADV_DONTNEED)
                wide.seek(0)
                await trio.to_thread.run_sync(sequential, wide, sizes)
                assert max(sizes) >= 512 * KiB, sizes

    trio.run(main)


def test_slow_reads_do_not_hold_up_a_fast_one(paths: Paths) -> None:
    slow_data = os.urandom(32 * MiB)
    fast_data = os.urandom(4 * MiB)

    async def main() -> None:
        release = trio.Event()
        both_waiting = trio.Event()
        waiting: set[int] = set()

        async def slow(name: str, offset: int, size: int) -> bytes:
            waiting.add(offset // (16 * MiB))
            if len(waiting) == 2:
                both_waiting.set()
            await release.wait()
            return slow_data[offset : offset + size]


        server = BlobServer(paths.mnt, paths.sock)
        slow_path = server.add("slow", len(slow_data), slow)
        fast_path = server.add("fast", len(fast_data), memory(fast_data))
        results: dict[int, bytes] = {}

        async def slow_reader(offset: int) -> None:
            results[offset] = await trio.to_thread.run_sync(pread, slow_path, offset, MiB)

        async with serving(server), trio.open_nursery() as readers:
            for offset in (0, 16 * MiB):
                readers.start_soon(slow_reader, offset)
            await both_waiting.wait()  # two reads of the slow blob are in the callback
            assert await trio.to_thread.run_sync(read_all, fast_path) == fast_data
            assert not results  # the fast blob was read while both slow reads waited
            release.set()
        assert results == {0: slow_data[:MiB], 16 * MiB: slow_data[16 * MiB : 17 * MiB]}

    trio.run(main)


def test_remove_answers_enoent(paths: Paths) -> None:
    data = os.urandom(2 * MiB)

    kept = paths.mnt / "blobs" / "kept"

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        gone = server.add("gone", len(data), memory(data))
        server.add("kept", len(data), memory(data))
        with pytest.raises(AlreadyExists):
            server.add("kept", 1, memory(data))
        with pytest.raises(InvalidArgument):
            server.add("../escape", 1, memory(data))
        async with serving(server):
            await trio.to_thread.run_sync(check, server, gone)
            with pytest.raises(NotFound):
                server.remove("gone")
            # on the serving thread the invalidation is handed to a helper thread
            server.remove("kept")
            assert server.names() == []
            with pytest.raises(OSError) as err:
                await trio.to_thread.run_sync(os.pread, kept_fd[0], 4096, 0)
            assert err.value.errno == errno.ESTALE
            await trio.to_thread.run_sync(os.close, kept_fd[0])  # a close is a FLUSH request

    def check(server: BlobServer, gone: Path) -> None:
        kept_fd.append(os.open(kept, os.O_RDONLY))
        fd = os.open(gone, os.O_RDONLY)
        try:
            assert gone.stat().st_size == len(data)
            # from another thread remove() returns once the kernel dropped its entry
            server.remove("gone")
            with pytest.raises(FileNotFoundError):
                gone.stat()
            assert os.listdir(paths.mnt / "blobs") == ["kept"]
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, MiB)
            assert err.value.errno == errno.ESTALE  # a file opened before the removal
        finally:
            os.close(fd)

    kept_fd: list[int] = []
    trio.run(main)


def test_read_only_and_no_xattrs(paths: Paths) -> None:
    data = os.urandom(MiB)

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        path = server.add("blob", len(data), memory(data))
        async with serving(server):
            await trio.to_thread.run_sync(check, path)

    def check(path: Path) -> None:
        with pytest.raises(OSError) as err:
            os.open(path, os.O_WRONLY)
        assert err.value.errno == errno.EROFS
        with pytest.raises(OSError) as err:
            os.mkdir(paths.mnt / "blobs" / "new")
        assert err.value.errno == errno.EROFS
        assert os.listxattr(path) == []
        with pytest.raises(OSError) as err:
            os.getxattr(path, "user.x")
        assert err.value.errno == errno.ENODATA
        vfs = os.statvfs(paths.mnt)
        assert vfs.f_blocks == len(data) // 4096 and vfs.f_namemax == 255
        assert os.access(path, os.R_OK) and not os.access(path, os.W_OK)

    trio.run(main)


def test_read_errors_reach_the_reader(paths: Paths) -> None:
    async def failing(name: str, offset: int, size: int) -> bytes:
        raise OSError(errno.EHOSTUNREACH, "registry unreachable")

    async def short(name: str, offset: int, size: int) -> bytes:
        return b"x"

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        bad = server.add("bad", MiB, failing)
        trunc = server.add("short", MiB, short)
        async with serving(server):
            for path in (bad, trunc):
                with pytest.raises(OSError):
                    await trio.to_thread.run_sync(read_all, path)

    trio.run(main)


def test_second_run_takes_over_the_session(paths: Paths) -> None:
    data = os.urandom(4 * MiB)

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        path = server.add("blob", len(data), memory(data))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            assert not server.resumed
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
            nursery.cancel_scope.cancel()
        # the mount outlived run(); a new server object (as after a restart) takes it over
        again = BlobServer(paths.mnt, paths.sock)
        again.add("blob", len(data), memory(data))
        async with serving(again):
            assert again.resumed
            assert await trio.to_thread.run_sync(os.pread, fd, MiB, 2 * MiB) == data[
                2 * MiB : 3 * MiB]
            assert await trio.to_thread.run_sync(read_all, path) == data
            await trio.to_thread.run_sync(os.close, fd)

    trio.run(main)


# A reader whose SIGUSR1 handler raises, so the interrupted read is not retried (PEP 475).
INTERRUPTED_READER = """
import os, signal, sys
class Stop(Exception):
    pass
def stop(signum, frame):
    raise Stop()
signal.signal(signal.SIGUSR1, stop)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)  # direct: a synchronous READ request
try:
    os.pread(fd, 65536, 0)
    print("read", flush=True)
except Stop:
    print("interrupted", flush=True)
except OSError as exc:
    print(f"error {exc.errno}", flush=True)
"""


def test_interrupt_cancels_the_read(paths: Paths) -> None:
    async def main() -> None:
        entered = trio.Event()
        cancelled = trio.Event()

        async def stuck(name: str, offset: int, size: int) -> bytes:
            entered.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()
            raise AssertionError("unreachable")

        server = BlobServer(paths.mnt, paths.sock)
        path = server.add("stuck", MiB, stuck)
        async with serving(server):
            reader = await trio.lowlevel.open_process(
                [sys.executable, "-c", INTERRUPTED_READER, os.fspath(path)],
                stdout=subprocess.PIPE,
            )
            try:
                await entered.wait()  # the reader's READ is in the callback
                reader.send_signal(signal.SIGUSR1)  # -> FUSE_INTERRUPT for that request
                await cancelled.wait()  # the server cancelled the callback's task
                assert reader.stdout is not None
                out = await reader.stdout.receive_some()
                assert out.decode().strip() == "interrupted"  # the read returned EINTR
                assert await reader.wait() == 0
            finally:
                if reader.returncode is None:
                    reader.kill()
                    await reader.wait()

    trio.run(main)


def test_a_mount_point_that_is_a_file_is_refused(paths: Paths) -> None:
    paths.mnt.write_text("not a directory")

    async def main() -> None:
        server = BlobServer(paths.mnt, paths.sock)
        with pytest.raises(Unavailable) as err:
            await server.run()
        assert str(paths.mnt) in str(err.value)

    trio.run(main)
    assert not paths.sock.exists()  # no holder was left behind


def test_an_erofs_image_reads_its_chunks_from_a_blob(paths: Paths, tmp_path: Path) -> None:
    """The use the blob files exist for: clip's EROFS image of a layer, mounted file-backed,
    whose files point into the layer's tar stream served as a blob on this mount (`device=`)."""
    big = os.urandom(3 * MiB + 123)
    layer = write_layer(tmp_path / "layer.tgz", [
        M("sub", kind=tarfile.DIRTYPE, mode=0o755),
        M("big", data=big),
        M("sub/small", data=b"hello\n"),
    ])
    image = tmp_path / "image.erofs"
    write_image(index_layer(layer, tmp_path / "layer.idx"), image)
    blob = gzip.decompress(layer.read_bytes())
    sizes: list[int] = []
    target = tmp_path / "erofs"
    target.mkdir()

    def mount_and_read(device: Path) -> tuple[bytes, str]:
        mount_image(image, device, target)
        try:
            return (target / "big").read_bytes(), (target / "sub" / "small").read_text()
        finally:
            unmount(target)

    async def main() -> tuple[bytes, str]:
        server = BlobServer(paths.mnt, paths.sock)
        device = server.add("layer", len(blob), memory(blob, sizes))
        async with serving(server):
            return await trio.to_thread.run_sync(mount_and_read, device)

    assert trio.run(main) == (big, "hello\n")
    assert sizes and sum(sizes) <= len(blob)  # the file data came through the blob server


def _counted(op: str) -> float:
    """`clip_fuse_requests_total{op}` so far (the blob server counts what it serves)."""
    from snapshotter.telemetry import TELEMETRY

    return TELEMETRY.registry.get_sample_value("clip_fuse_requests_total", {"op": op}) or 0.0
