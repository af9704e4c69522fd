"""BlobServer: the FUSE mount that serves each layer's tar stream as one read-only file.

In EROFS mode the kernel serves every layer's tree from an EROFS image whose extra device is the
layer's uncompressed tar stream; the only files clip serves itself are those streams, as
`<mountpoint>/blobs/<name>`. This server speaks the kernel's FUSE protocol on /dev/fuse directly
(snapshotter.fs.fuseproto) on trio, so that the session survives the daemon:

- the /dev/fuse descriptor is kept by a holder process (snapshotter.fs.holder) detached from the
  daemon; a restarted daemon takes a duplicate from it, skips INIT, and sends
  FUSE_NOTIFY_RESEND so the kernel re-queues every request the dead daemon had read but not
  answered (reads block in the kernel in between; nothing fails);
- nothing a request refers to lives only in this process: a blob's inode number is derived from
  its name, a file handle is the inode number, a directory offset is a position in the sorted
  name list.

Reads are answered by the caller's async callback, each in its own task, so a slow read never
holds up another request; FUSE_INTERRUPT cancels the read's task. A restarted daemon must `add`
every blob it still serves before `run`: a lookup of a name it does not know answers ENOENT, a
request on an inode it does not know ESTALE (see docs/restarts.md).

EROFS reads a small file as its own few pages of the stream, so a container's start sends one
small read per file it opens. With ``warm_span`` set, the server brings the rest of each answered
read's aligned span (and ranges the caller names with `warm`) into the kernel's page cache with
`posix_fadvise(WILLNEED)` on its own descriptor of the blob: one large readahead request, served
from what the read path already holds, instead of one request per later file. A blob's
`warmable` callback keeps warming to the parts that need no fetch (the read path's unit is
smaller than the span: warming must not widen what a lazy start fetches); its `warm_around`
turns warming around answered reads off while the caller names what to warm itself (a layer
whose start profile is being prefetched). Unlike pushing the bytes (FUSE_NOTIFY_STORE, which
waits uninterruptibly on page locks that unanswered reads hold, so a killed daemon could never
exit), readahead only waits killably. Blob files are opened with FOPEN_NOFLUSH, so closing one
(by the server, by EROFS at unmount, or by the kernel when a process dies) never waits for an
answer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import trio

from snapshotter.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snapshotter.fs import fuseproto as fp
from snapshotter.fs import holder
from snapshotter.fs.mounts import lazy_unmount
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

ReadFn = Callable[[str, int, int], Awaitable[bytes]]
"""`read(name, offset, size)`: exactly `size` bytes of blob `name` at `offset` (never past the
end: the server clamps requests to the blob's size). Raise OSError to fail one read with that
errno."""
WarmableFn = Callable[[int, int], list[tuple[int, int]]]
"""`warmable(start, end)`: the sorted, disjoint parts of `[start, end)` worth warming (those a
READ can answer without fetching anything; serving thread)."""
WarmAroundFn = Callable[[], bool]
"""`warm_around()`: whether an answered read of the blob warms the rest of its span now
(serving thread)."""

BLOBS_DIR = "blobs"
BLOBS_INO = 2
# Directory entries and attributes of immutable blobs can be cached for long: a removal is
# pushed to the kernel with FUSE_NOTIFY_INVAL_ENTRY. Directory attributes change with the table.
_BLOB_VALID = 3600
_DIR_VALID = 1
_READAHEAD_KIB = 1024
#: Readahead of the stream files opened inside `narrow_readahead` (see there): one read-path
#: block.
NARROW_READAHEAD_KIB = 256
#: `clip_fuse_requests_total{op}` labels, as the FUSE-tree mode's handlers name them.
_OP_NAMES = {
    fp.LOOKUP: "lookup", fp.GETATTR: "getattr", fp.OPEN: "open", fp.READ: "read",
    fp.RELEASE: "release", fp.OPENDIR: "opendir", fp.READDIR: "readdir",
    fp.RELEASEDIR: "releasedir", fp.STATFS: "statfs", fp.GETXATTR: "getxattr",
    fp.LISTXATTR: "listxattr", fp.ACCESS: "access", fp.FLUSH: "flush", fp.FORGET: "forget",
    fp.BATCH_FORGET: "forget", fp.INTERRUPT: "interrupt", fp.INIT: "init",
}
#: How long a read of an unknown inode waits for a restarting daemon's `restored()` (seconds).
RESTORE_WAIT = 60.0
_BATCH = 64  # requests read per wake-up before letting started reads run
_WARM_QUEUE = 1024  # spans waiting to be warmed; more are dropped (warming is an optimisation)
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:+-]{0,254}$")


def blob_inode(name: str) -> int:
    """A stable inode number for `name`: the same in every daemon, never a directory's."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, person=b"clipblob").digest()
    return (int.from_bytes(digest, "little") >> 1) | (1 << 32)


@dataclass(frozen=True)
class Blob:
    name: str
    ino: int
    size: int
    read: ReadFn
    warmable: WarmableFn | None = None
    warm_around: WarmAroundFn | None = None


class _Errno(Exception):
    """A request's answer is this errno."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.code = code


class BlobServer:
    """Serves `<mountpoint>/blobs/<name>`; the session outlives the process through the holder."""

    def __init__(
        self,
        mountpoint: os.PathLike[str] | str,
        holder_socket: os.PathLike[str] | str,
        holder_pidfile: os.PathLike[str] | str | None = None,
        *,
        wait_for_restore: bool = False,
        warm_span: int = 0,
    ) -> None:
        """``wait_for_restore``: a read of an inode this server does not know (a blob a
        restarted daemon has not re-added yet) waits for `restored()` — at most
        ``RESTORE_WAIT`` seconds — before it answers ESTALE, so reads the kernel resends
        after a restart do not fail while the daemon is still restoring its layers.
        ``warm_span``: bytes (a multiple of 4 KiB) of the aligned span around each answered
        read to bring into the page cache; 0 warms nothing (see the module doc)."""
        if warm_span < 0 or warm_span % 4096:
            raise InvalidArgument(f"blob server: warm span {warm_span} is not a multiple of 4096")
        # Resolve the parent only: resolving the mount point itself would stat the FUSE root,
        # which waits for a server that may be this very process.
        given = Path(mountpoint)
        self.mountpoint = Path(os.path.realpath(given.parent)) / given.name
        self.holder_socket = Path(holder_socket)
        self.holder_pidfile = (
            Path(holder_pidfile) if holder_pidfile is not None
            else self.holder_socket.with_suffix(".pid")
        )
        self.resumed = False  # whether the last run() took over a live session
        self.resent = 0  # requests the kernel resent to this server (read by a dead one)
        self.params: fp.InitParams | None = None
        self._lock = threading.Lock()
        self._by_name: dict[str, Blob] = {}
        self._by_ino: dict[int, Blob] = {}
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._serving_thread: int | None = None
        self._epoch = 0
        self._inflight: dict[int, trio.CancelScope] = {}
        self._ready = trio.Event()
        self._failure: str | None = None
        self._wait_for_restore = wait_for_restore
        self._restored = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self.warm_span = warm_span
        #: Per blob: the spans (by index) already asked to be warmed, and the descriptor
        #: readahead is asked through (opened by the warming task, closed on `remove`).
        self._warmed: dict[str, set[int]] = {}
        self._warm_fds: dict[str, int] = {}
        self._warm_send: trio.MemorySendChannel[tuple[str, int, int]] | None = None
        self._narrowed = 0
        self._narrow_lock = threading.Lock()

    # --- the blob table ---------------------------------------------------------------------------

    def add(self, name: str, size: int, read: ReadFn, warmable: WarmableFn | None = None,
            warm_around: WarmAroundFn | None = None) -> Path:
        """Serve `size` bytes answered by `read` as `<mountpoint>/blobs/<name>` (returned).
        ``warmable`` limits warming to the parts it names (default: any part);
        ``warm_around`` turns warming around answered reads off while it says False (default:
        always on), for a caller that names what to warm itself with `warm`."""
        if not _NAME_RE.match(name):
            raise InvalidArgument(f"blob server: invalid blob name {name!r}")
        if size < 0:
            raise InvalidArgument(f"blob server: blob {name} has a negative size {size}")
        blob = Blob(name, blob_inode(name), size, read, warmable, warm_around)
        with self._lock:
            if name in self._by_name:
                raise AlreadyExists(f"blob server: blob {name} is already served")
            if blob.ino in self._by_ino:
                other = self._by_ino[blob.ino].name
                raise AlreadyExists(f"blob server: blob {name} collides with {other}")
            self._by_name[name] = blob
            self._by_ino[blob.ino] = blob
            self._warmed[name] = set()
        return self.path(name)

    def remove(self, name: str) -> None:
        """Stop serving `name`: later lookups answer ENOENT, open files ESTALE.

        The kernel's cached entry is dropped with FUSE_NOTIFY_INVAL_ENTRY. That write waits for
        the directory's lock, which a lookup waiting for this server may hold, so on the serving
        thread it is made from a helper thread; from any other thread `remove` returns after the
        kernel dropped the entry.
        """
        with self._lock:
            blob = self._by_name.pop(name, None)
            if blob is not None:
                del self._by_ino[blob.ino]
            self._warmed.pop(name, None)
            warm_fd = self._warm_fds.pop(name, None)
        if blob is None:
            raise NotFound(f"blob server: blob {name} is not served")
        if warm_fd is not None:
            os.close(warm_fd)  # never waits: blob files are opened FOPEN_NOFLUSH
        if self._fd is None:
            return
        if threading.get_ident() == self._serving_thread:
            threading.Thread(target=self._invalidate, args=(name,), daemon=True).start()
        else:
            self._invalidate(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def path(self, name: str) -> Path:
        return self.mountpoint / BLOBS_DIR / name

    def _invalidate(self, name: str) -> None:
        # A duplicate of the descriptor: run() may close its own meanwhile, and a write to a
        # closed number could land in whatever file reused it.
        with self._fd_lock:
            if self._fd is None:
                return
            fd = os.dup(self._fd)
        raw = name.encode()
        body = fp.NOTIFY_INVAL_ENTRY_OUT.pack(BLOBS_INO, len(raw), 0) + raw + b"\0"
        try:
            os.writev(fd, [fp.notify_header(fp.NOTIFY_INVAL_ENTRY, len(body)), body])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("blob server: cannot invalidate %s: %s", name, exc)
        finally:
            os.close(fd)

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or until the mount is gone). Takes over the holder's session if
        there is one, else mounts afresh; `task_status.started()` once requests are answered.

        Cancellation leaves the mount and the holder alone: the next run, in this process or a
        new one, resumes the session. `unmount()` is the real shutdown.
        """
        self._restored = trio.Event()
        if not self._wait_for_restore:
            self._restored.set()
        self._token = trio.lowlevel.current_trio_token()
        fd = await trio.to_thread.run_sync(self._open_session)
        self._fd = fd
        self._serving_thread = threading.get_ident()
        self._ready = trio.Event()
        self._failure = None
        try:
            async with trio.open_nursery() as nursery:
                if self.warm_span:
                    self._warm_send, receive = trio.open_memory_channel(_WARM_QUEUE)
                    nursery.start_soon(self._warm_worker, receive)
                if self.resumed:
                    # An INIT the previous daemon never answered comes back with the rest.
                    self._resend()
                    self._ready.set()
                nursery.start_soon(self._serve, fd, nursery)
                await self._ready.wait()
                if self._failure is not None:
                    raise Unavailable(self._failure)
                task_status.started()
        finally:
            self._warm_send = None
            self._close_warm_files()
            with self._fd_lock:
                self._fd = None
            self._serving_thread = None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    # --- readahead --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def narrow_readahead(self) -> Iterator[None]:
        """Stream files opened in the body read ahead at most `NARROW_READAHEAD_KIB` for as long
        as they stay open (the kernel copies the window into each file when it is opened).

        For the EROFS mount of a layer recording its start profile: the profile is the blocks
        the container's reads touch, and a 1 MiB window adds the kernel's guesses beyond them
        (measured: a scipy start profile of 66 MB with 1 MiB, 59 MB with 256 KiB, against 51 MB
        of files read). Files opened meanwhile by anyone get the narrow window too, which costs
        only more, smaller READs. Nested and concurrent uses share one narrowing."""
        with self._narrow_lock:
            self._narrowed += 1
            if self._narrowed == 1:
                self._set_readahead(NARROW_READAHEAD_KIB)
        try:
            yield
        finally:
            with self._narrow_lock:
                self._narrowed -= 1
                if self._narrowed == 0:
                    self._set_readahead(_READAHEAD_KIB)

    def _set_readahead(self, kib: int) -> None:
        """The connection's readahead window (sysfs); a failure only costs speed, so logged."""
        fd = self._fd
        try:
            dev = fp.connection_of_fd(fd) if fd is not None else None
            if dev is not None:
                fp.set_readahead(dev, kib)
        except OSError as exc:
            log.warning("blob server: cannot set readahead to %d KiB: %s", kib, exc)

    # --- warming the page cache (see the module doc) ---------------------------------------------

    def warm(self, name: str, offset: int, length: int) -> None:
        """Bring ``[offset, offset + length)`` of blob `name`, widened to whole warm spans, into
        the kernel's page cache soon, as much of it as the blob's `warmable` allows (serving
        thread only; nothing when warming is off or its queue is full). Whole spans: the kernel
        asks for a span in one READ, where the part of one left out would cost a READ of its
        own when the container reads it (docs/restarts.md has the measurement)."""
        blob = self._by_name.get(name)
        if blob is not None and length > 0:
            self._warm_parts(blob, offset, offset + length)

    def _warm_parts(self, blob: Blob, start: int, end: int) -> None:
        """Queue the warmable parts of the whole spans ``[start, end)`` touches, cut at
        `warm_span` boundaries; a span queued whole is remembered and never queued again."""
        span, send, warmed = self.warm_span, self._warm_send, self._warmed.get(blob.name)
        end = min(end, blob.size)
        if not span or send is None or warmed is None or start >= end:
            return
        start, end = start // span * span, min(-(-end // span) * span, blob.size)
        parts = blob.warmable(start, end) if blob.warmable is not None else [(start, end)]
        for part_start, part_end in parts:
            for index in range(part_start // span, -(-part_end // span)):
                lo = max(part_start, index * span)
                hi = min(part_end, (index + 1) * span, blob.size)
                whole = lo == index * span and hi == min((index + 1) * span, blob.size)
                if index in warmed:
                    continue
                try:
                    send.send_nowait((blob.name, lo, hi - lo))
                except trio.WouldBlock:
                    return
                if whole:
                    warmed.add(index)

    def _after_read(self, blob: Blob, offset: int, size: int) -> None:
        """A read was answered: warm the rest of its span(s); a read that covered its span
        whole needs none (the kernel cached those pages as it took the answer)."""
        span = self.warm_span
        warmed = self._warmed.get(blob.name)
        if not span or warmed is None or (blob.warm_around is not None and not blob.warm_around()):
            return
        first, last = offset // span, (offset + size - 1) // span
        if first == last and offset == first * span and offset + size >= min(
            offset + span, blob.size
        ):
            warmed.add(first)
            return
        self._warm_parts(blob, offset, offset + size)

    async def _warm_worker(self, receive: trio.MemoryReceiveChannel[tuple[str, int, int]],
                           ) -> None:
        async with receive:
            async for name, start, length in receive:
                try:
                    await trio.to_thread.run_sync(self._readahead, name, start, length,
                                                  abandon_on_cancel=True)
                except OSError as exc:
                    log.debug("blob server: cannot warm %s at %d+%d: %s", name, start, length,
                              exc)

    def _readahead(self, name: str, start: int, length: int) -> None:
        """Worker thread: ask the kernel to read `[start, start + length)` of blob `name` ahead
        (the requests come back to this server as READs; the call does not wait for them)."""
        fd = self._warm_fd(name)
        if fd is None:
            return
        try:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def _warm_fd(self, name: str) -> int | None:
        """Worker thread: a duplicate of the blob's warming descriptor (opened on first use), or
        None once the blob is removed. A duplicate, so `remove` may close the original
        meanwhile."""
        with self._lock:
            held = self._warm_fds.get(name)
            if held is not None:
                return os.dup(held)
            if name not in self._by_name:
                return None
        opened = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if name in self._by_name and name not in self._warm_fds:
                self._warm_fds[name] = opened
                return os.dup(opened)
        os.close(opened)
        return None

    def _close_warm_files(self) -> None:
        with self._lock:
            fds = list(self._warm_fds.values())
            self._warm_fds.clear()
        for fd in fds:
            os.close(fd)  # never waits: blob files are opened FOPEN_NOFLUSH

    def restored(self) -> None:
        """Every blob of a restart is added again: unknown inodes answer ESTALE from now on.
        Any thread but the serving one (which may set ``_restored`` itself)."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._restored.set, trio_token=token)

    def unmount(self) -> None:
        """The real shutdown: detach the mount and let the holder go (open files then fail)."""
        holder.release(self.holder_socket)
        current = fp.device_of_mount(self.mountpoint)
        if current is not None and current[0] == fp.FSTYPE:
            lazy_unmount(self.mountpoint)

    def _open_session(self) -> int:
        """The /dev/fuse descriptor to serve: the holder's if it serves our mount, else new."""
        held = holder.get(self.holder_socket)
        if held is not None:
            fd, state = held
            if self._same_session(fd, state):
                init = state.get("init")
                self.params = fp.InitParams.from_json(init) if init else None
                self._epoch = int(state.get("mounted", 0))
                self.resumed = True
                log.info("blob server: resuming the session at %s", self.mountpoint)
                return fd
            log.warning("blob server: the held session is not the mount at %s; remounting",
                        self.mountpoint)
            os.close(fd)
            holder.release(self.holder_socket)
        self.resumed = False
        self.params = None
        return self._mount_fresh()

    def _same_session(self, fd: int, state: dict[str, Any]) -> bool:
        if state.get("mountpoint") != os.fspath(self.mountpoint):
            return False
        current = fp.device_of_mount(self.mountpoint)
        return current == (fp.FSTYPE, fp.connection_of_fd(fd))

    def _mount_fresh(self) -> int:
        current = fp.device_of_mount(self.mountpoint)
        if current is not None:
            if current[0] != fp.FSTYPE:
                raise Unavailable(f"blob server: {self.mountpoint} is already a {current[0]} mount")
            log.warning("blob server: clearing a stale mount at %s", self.mountpoint)
            lazy_unmount(self.mountpoint)
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise Unavailable(f"blob server: cannot mount at {self.mountpoint}: {exc}") from exc
        try:
            holder.spawn(self.holder_socket, self.holder_pidfile)
        except BaseException:
            os.close(fd)
            raise
        try:
            fp.mount(fd, self.mountpoint)
            self._epoch = int(time.time())
            # Handed over before INIT: a daemon dying from here on leaves a session to resume.
            holder.put(self.holder_socket, fd, self._state())
        except OSError as exc:
            os.close(fd)
            raise Unavailable(f"blob server: cannot mount {self.mountpoint}: {exc}") from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _state(self) -> dict[str, Any]:
        return {
            "mountpoint": os.fspath(self.mountpoint),
            "mounted": self._epoch,
            "init": self.params.to_json() if self.params is not None else None,
        }

    def _resend(self) -> None:
        """Ask the kernel to queue again every request the previous server read but never
        answered (kernel 6.9+, FUSE_HAS_RESEND); they come back with UNIQUE_RESEND set."""
        try:
            self._write([fp.notify_header(fp.NOTIFY_RESEND, 0)])
        except OSError as exc:
            log.warning("blob server: the kernel cannot resend lost requests (%s); reads the "
                        "previous daemon had taken stay blocked", exc)

    # --- the request loop -----------------------------------------------------------------------

    async def _serve(self, fd: int, nursery: trio.Nursery) -> None:
        size = fp.read_buffer_size(self.params)
        while True:
            await trio.lowlevel.wait_readable(fd)
            for _ in range(_BATCH):
                try:
                    buf = os.read(fd, size)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOENT:  # the request was interrupted meanwhile
                        continue
                    if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                        log.info("blob server: %s was unmounted", self.mountpoint)
                        if not self._ready.is_set():
                            self._failure = f"blob server: {self.mountpoint} went away"
                            self._ready.set()
                        nursery.cancel_scope.cancel()
                        return
                    raise
                self._dispatch(fp.parse_request(buf), nursery)

    def _dispatch(self, req: fp.Request, nursery: trio.Nursery) -> None:
        op = req.opcode
        TELEMETRY.fuse_request(_OP_NAMES.get(op, "other"))
        if req.unique & fp.UNIQUE_RESEND:
            self.resent += 1
        if op == fp.READ:
            nursery.start_soon(self._read, req)
        elif op in (fp.FORGET, fp.BATCH_FORGET):
            return  # nothing is counted: every inode is derived from its name
        elif op == fp.INTERRUPT:
            (target,) = fp.INTERRUPT_IN.unpack_from(req.body)
            scope = self._inflight.get(target)
            if scope is not None:
                scope.cancel()
        elif op == fp.INIT:
            self._init(req, nursery)
        else:
            handler = self._handlers.get(op)
            try:
                if op in fp.WRITE_OPS:
                    raise _Errno(errno.EROFS)
                if handler is None:
                    raise _Errno(errno.ENOSYS)
                self._reply(req.unique, 0, handler(self, req))
            except _Errno as exc:
                self._reply(req.unique, exc.code, b"")

    def _reply(self, unique: int, error: int, payload: bytes | memoryview) -> None:
        try:
            self._write([fp.reply_header(unique, error, len(payload)), payload])
        except OSError as exc:
            # ENOENT: the kernel gave up on the request (interrupted, aborted); ENODEV: unmounted.
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("blob server: cannot answer request %d: %s", unique, exc)

    def _write(self, parts: list[bytes | memoryview]) -> None:
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, "blob server: not serving")
        os.writev(fd, parts)

    def _init(self, req: fp.Request, nursery: trio.Nursery) -> None:
        try:
            params, payload = fp.negotiate(req.body)
        except ValueError as exc:
            self._reply(req.unique, errno.EPROTO, b"")
            self._failure = f"blob server: cannot mount {self.mountpoint}: {exc}"
            self._ready.set()
            return
        self._reply(req.unique, 0, payload)
        self.params = params
        fd = self._fd
        if fd is not None:
            with self._narrow_lock:
                self._set_readahead(NARROW_READAHEAD_KIB if self._narrowed else _READAHEAD_KIB)
            nursery.start_soon(self._save_state, fd)
        log.info("blob server: mounted %s (protocol 7.%d, %d pages per read, resend %s)",
                 self.mountpoint, params.minor, params.max_pages,
                 "supported" if params.can_resend else "unsupported")

    async def _save_state(self, fd: int) -> None:
        try:
            await trio.to_thread.run_sync(holder.put, self.holder_socket, fd, self._state())
        except Unavailable as exc:
            log.error("blob server: the holder did not take the session: %s", exc)
        self._ready.set()

    async def _read(self, req: fp.Request) -> None:
        _fh, offset, size, *_ = fp.READ_IN.unpack_from(req.body)
        blob = self._by_ino.get(req.nodeid)
        if blob is None and not self._restored.is_set():
            with trio.move_on_after(RESTORE_WAIT):
                await self._restored.wait()
            blob = self._by_ino.get(req.nodeid)
        if blob is None:
            self._reply(req.unique, errno.ESTALE, b"")
            return
        size = max(0, min(size, blob.size - offset))
        if size == 0:
            self._reply(req.unique, 0, b"")
            return
        data: bytes | None = None
        error = 0
        with trio.CancelScope() as scope:
            self._inflight[req.unique] = scope
            try:
                data = await blob.read(blob.name, offset, size)
            except OSError as exc:
                error = exc.errno or errno.EIO
                log.warning("blob server: read of %s at %d+%d failed: %s", blob.name, offset,
                            size, exc)
            except Exception:
                error = errno.EIO
                log.exception("blob server: read of %s at %d+%d failed", blob.name, offset, size)
            finally:
                del self._inflight[req.unique]
        if scope.cancelled_caught:
            error = errno.EINTR
        elif data is not None and len(data) != size:
            log.error("blob server: read of %s at %d+%d returned %d bytes", blob.name, offset,
                      size, len(data))
            error = errno.EIO
        self._reply(req.unique, error, b"" if error or data is None else data)
        if not error:
            self._after_read(blob, offset, size)

    # --- metadata requests (answered inline: they never wait) ----------------------------------

    def _attr(self, ino: int) -> bytes:
        t = self._epoch
        if ino in (fp.ROOT_ID, BLOBS_INO):
            nlink = 3 if ino == fp.ROOT_ID else 2
            return fp.ATTR.pack(ino, 0, 0, t, t, t, 0, 0, 0, stat.S_IFDIR | 0o555, nlink,
                                0, 0, 0, 4096, 0)
        blob = self._by_ino.get(ino)
        if blob is None:
            raise _Errno(errno.ESTALE)
        return fp.ATTR.pack(ino, blob.size, (blob.size + 511) // 512, t, t, t, 0, 0, 0,
                            stat.S_IFREG | 0o444, 1, 0, 0, 0, 4096, 0)

    def _entry(self, ino: int, valid: int) -> bytes:
        return fp.ENTRY_OUT.pack(ino, 0, valid, valid, 0, 0) + self._attr(ino)

    def _lookup(self, req: fp.Request) -> bytes:
        name = bytes(req.body).split(b"\0", 1)[0].decode(errors="surrogateescape")
        if req.nodeid == fp.ROOT_ID and name == BLOBS_DIR:
            return self._entry(BLOBS_INO, _BLOB_VALID)
        if req.nodeid == BLOBS_INO:
            blob = self._by_name.get(name)
            if blob is not None:
                return self._entry(blob.ino, _BLOB_VALID)
        raise _Errno(errno.ENOENT)

    def _getattr(self, req: fp.Request) -> bytes:
        valid = _DIR_VALID if req.nodeid in (fp.ROOT_ID, BLOBS_INO) else _BLOB_VALID
        return fp.ATTR_OUT.pack(valid, 0, 0) + self._attr(req.nodeid)

    def _open(self, req: fp.Request) -> bytes:
        flags, _ = fp.OPEN_IN.unpack_from(req.body)
        if req.nodeid not in self._by_ino:
            raise _Errno(errno.EISDIR if req.nodeid in (fp.ROOT_ID, BLOBS_INO) else errno.ESTALE)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise _Errno(errno.EROFS)
        return fp.OPEN_OUT.pack(req.nodeid, fp.FOPEN_KEEP_CACHE | fp.FOPEN_NOFLUSH, 0)

    def _opendir(self, req: fp.Request) -> bytes:
        if req.nodeid not in (fp.ROOT_ID, BLOBS_INO):
            raise _Errno(errno.ENOTDIR if req.nodeid in self._by_ino else errno.ESTALE)
        return fp.OPEN_OUT.pack(0, 0, 0)

    def _readdir(self, req: fp.Request) -> bytes:
        _fh, offset, size, *_ = fp.READ_IN.unpack_from(req.body)
        entries: list[tuple[bytes, int, int]] = [(b".", req.nodeid, stat.S_IFDIR),
                                                  (b"..", fp.ROOT_ID, stat.S_IFDIR)]
        if req.nodeid == fp.ROOT_ID:
            entries.append((BLOBS_DIR.encode(), BLOBS_INO, stat.S_IFDIR))
        elif req.nodeid == BLOBS_INO:
            entries += [(n.encode(), b.ino, stat.S_IFREG)
                        for n, b in sorted(self._by_name.items())]
        else:
            raise _Errno(errno.ENOTDIR)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, mode = entries[index]
            rec = fp.dirent(ino, index + 1, name, mode >> 12)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def _statfs(self, req: fp.Request) -> bytes:
        blocks = sum((b.size + 4095) // 4096 for b in list(self._by_ino.values()))
        return fp.STATFS_OUT.pack(blocks, 0, 0, len(self._by_ino) + 2, 0, 4096, 255, 4096, 0)

    def _getxattr(self, req: fp.Request) -> bytes:
        raise _Errno(errno.ENODATA)

    def _listxattr(self, req: fp.Request) -> bytes:
        size, _ = fp.GETXATTR_IN.unpack_from(req.body)
        return fp.GETXATTR_OUT.pack(0, 0) if size == 0 else b""

    def _access(self, req: fp.Request) -> bytes:
        mask, _ = fp.ACCESS_IN.unpack_from(req.body)
        if mask & os.W_OK:
            raise _Errno(errno.EROFS)
        return b""

    def _empty(self, req: fp.Request) -> bytes:
        return b""

    _handlers: ClassVar[dict[int, Callable[[BlobServer, fp.Request], bytes]]] = {
        fp.LOOKUP: _lookup,
        fp.GETATTR: _getattr,
        fp.OPEN: _open,
        fp.OPENDIR: _opendir,
        fp.READDIR: _readdir,
        fp.STATFS: _statfs,
        fp.GETXATTR: _getxattr,
        fp.LISTXATTR: _listxattr,
        fp.ACCESS: _access,
        fp.RELEASE: _empty,
        fp.RELEASEDIR: _empty,
        fp.FLUSH: _empty,
        fp.DESTROY: _empty,
    }
