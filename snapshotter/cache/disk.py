"""Disk tier: decompressed layer bytes, one sparse file per layer digest plus a presence record.

Layout under `<root>/cache/<digest hex>/`:

- `data`    — sparse file; byte `u` is byte `u` of the layer's uncompressed tar stream.
- `present` — which fixed-size blocks of `data` hold valid bytes (see `_Record`).
- `lock`    — held with a shared flock by every process that has the layer open (the daemon);
  `clip cache prune` and eviction remove a layer only under an exclusive, non-blocking flock,
  so a layer in use is never removed underneath its reader. Its mtime is the layer's last use.

The unit of presence is an aligned block of `block_size` bytes (256 KiB by default) of the
uncompressed stream; the last block ends at the stream end. A record written with a larger
block size that is a multiple of this one (1 MiB before 2026-12) is read as its smaller blocks.
Crash safety rests on ordering: a block's bit is persisted only by `flush()`, which snapshots
the bitmap, `fdatasync`s the data file and only then atomically replaces the record (write temp,
fsync, rename, fsync dir). A crash can therefore lose the knowledge that a block is present (it
is fetched again), never claim a block whose bytes are not on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from snapshotter.errors import InvalidArgument

if TYPE_CHECKING:
    from snapshotter.cache.budget import DiskBudget

log = logging.getLogger(__name__)

#: A lazy start fetches whole blocks: 1 MiB blocks made a scipy start fetch 1.38x the compressed
#: bytes of the files it read, 256 KiB blocks 1.31x (1.19-1.20x with start profiles recorded
#: under a narrow readahead; see docs/fs.md, "Block size").
BLOCK_SIZE = 256 << 10
_MAGIC = b"CLIPBM01"
_HEADER = struct.Struct("<8sIIQQI")  # magic, block_size, flags, size, nblocks, crc32(bitmap)
_SIZE_KNOWN = 1
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_FLUSH_INTERVAL = 1.0
_PREFILL_FLUSH_BYTES = 64 << 20


def digest_hex(digest: str) -> str:
    """The directory name for a layer digest; rejects anything that is not sha256:<64 hex>."""
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise InvalidArgument(f"cache: not a sha256 layer digest: {digest!r}")
    return m.group(1)


class CacheFull(OSError):
    """The disk cache may not take these bytes: over `limit_bytes` or the filesystem is full,
    and evicting unused layers did not make room. The bytes are not written (and the blocks
    not marked); the layer stays served lazily."""

    def __init__(self, digest: str, why: str) -> None:
        super().__init__(errno.ENOSPC, f"cache {digest}: {why}")


class CacheClosed(OSError):
    """A write to a layer cache after its file was closed (a bug the owner scopes prevent)."""

    def __init__(self, digest: str) -> None:
        super().__init__(errno.EBADF, f"cache {digest}: closed")


class _Record:
    """The persisted presence bitmap: a fixed header with a CRC, then one bit per block."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.size: int | None = None
        self.bits = bytearray()

    def test(self, block: int) -> bool:
        byte = block >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (block & 7)))

    def set(self, block: int) -> None:
        byte = block >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        self.bits[byte] |= 1 << (block & 7)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def encode(self) -> bytes:
        flags = _SIZE_KNOWN if self.size is not None else 0
        bits = bytes(self.bits)
        head = _HEADER.pack(
            _MAGIC, self.block_size, flags, self.size or 0, len(bits) * 8, zlib.crc32(bits)
        )
        return head + bits

    @classmethod
    def decode(cls, data: bytes, block_size: int) -> _Record | None:
        """Parse a record; None when it is damaged or its block size is not this one or a
        multiple of it (the blocks of a larger one are split into this size's)."""
        if len(data) < _HEADER.size:
            return None
        magic, bsize, flags, size, nblocks, crc = _HEADER.unpack_from(data)
        bits = data[_HEADER.size :]
        if magic != _MAGIC or bsize < block_size or bsize % block_size or len(bits) * 8 != nblocks:
            return None
        if zlib.crc32(bits) != crc:
            return None
        rec = cls(block_size)
        rec.size = size if flags & _SIZE_KNOWN else None
        if bsize == block_size:
            rec.bits = bytearray(bits)
        else:
            split = bsize // block_size
            end = -(-rec.size // block_size) if rec.size is not None else nblocks * split
            old = cls(bsize)
            old.bits = bytearray(bits)
            for block in range(nblocks):
                if old.test(block):
                    for part in range(block * split, min((block + 1) * split, end)):
                        rec.set(part)
        return rec


class LayerCache:
    """Cached decompressed bytes of one layer. Thread-safe: the FUSE loop reads, worker threads
    and the layer provider write."""

    def __init__(
        self,
        directory: Path,
        digest: str,
        block_size: int = BLOCK_SIZE,
        budget: DiskBudget | None = None,
    ) -> None:
        self.digest = digest
        self.directory = directory
        self.block_size = block_size
        self.budget = budget
        self._lockfd = _open_shared(directory)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._record = self._load()
        self._fd = os.open(directory / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._dirty = False
        self._last_flush = time.monotonic()

    def _load(self) -> _Record:
        path = self.directory / "present"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return _Record(self.block_size)
        rec = _Record.decode(data, self.block_size)
        if rec is None:
            log.warning("cache: damaged presence record %s, starting empty", path)
            return _Record(self.block_size)
        return rec

    # --- queries ------------------------------------------------------------------------------

    @property
    def size(self) -> int | None:
        """Uncompressed stream size, once known."""
        return self._record.size

    def block_range(self, uoff: int, length: int) -> range:
        """Blocks covering stream bytes [uoff, uoff+length)."""
        if length <= 0:
            return range(0)
        bs = self.block_size
        return range(uoff // bs, (uoff + length - 1) // bs + 1)

    def has(self, block: int) -> bool:
        return self._record.test(block)

    def has_range(self, uoff: int, length: int) -> bool:
        rec = self._record
        return all(rec.test(b) for b in self.block_range(uoff, length))

    def nblocks(self) -> int | None:
        size = self._record.size
        return None if size is None else -(-size // self.block_size)

    def present_blocks(self) -> int:
        with self._lock:
            return self._record.count()

    def complete(self) -> bool:
        """Whether every byte of the layer's uncompressed stream is cached."""
        n = self.nblocks()
        if n is None:
            return False
        rec = self._record
        return all(rec.test(b) for b in range(n))

    def read(self, uoff: int, length: int) -> bytes:
        """Read cached bytes (the caller checked presence). A plain pread: page-cache fast."""
        return os.pread(self._fd, length, uoff)

    # --- updates ------------------------------------------------------------------------------

    def set_size(self, size: int) -> None:
        """Record the stream size; a different size than recorded means the cache is stale."""
        with self._lock:
            if self._record.size == size:
                return
            if self._record.size is not None:
                log.warning("cache %s: size changed %d -> %d, dropping", self.digest,
                            self._record.size, size)
                # forget the blocks durably before their bytes go away
                self._record = _Record(self.block_size)
                _atomic_write(self.directory / "present", self._record.encode())
                os.ftruncate(self._fd, 0)
            self._record.size = size
            self._dirty = True

    def _block_end(self, block: int) -> int | None:
        """End offset of a block, or None when it is the unknown-length tail."""
        end = (block + 1) * self.block_size
        size = self._record.size
        if size is None:
            return end
        return min(end, size)

    def store(self, uoff: int, data: bytes | memoryview) -> int:
        """Write every complete block inside [uoff, uoff+len(data)); returns how many.

        Bytes of partial blocks at either edge are ignored: a block is only ever marked when all
        its bytes were written. The new bytes are charged to the budget first; CacheFull when
        they do not fit (nothing written).
        """
        view = memoryview(data)
        end = uoff + len(view)
        spans: list[tuple[int, int, int]] = []
        for block in self.block_range(uoff, len(view)):
            start = block * self.block_size
            bend = self._block_end(block)
            if bend is None or start < uoff or bend > end or bend <= start:
                continue
            if not self._record.test(block):
                spans.append((block, start, bend))
        if not spans:
            return 0
        self._charge(sum(bend - start for _, start, bend in spans))
        for _, start, bend in spans:
            self._pwrite(view[start - uoff : bend - uoff], start)
        self._mark([block for block, _, _ in spans])
        return len(spans)

    def _charge(self, nbytes: int) -> None:
        if self.budget is not None and not self.budget.charge(nbytes):
            raise CacheFull(self.digest, "disk cache is at its limit and nothing is evictable")

    def _mark(self, blocks: list[int]) -> None:
        if not blocks:
            return
        with self._lock:
            for b in blocks:
                self._record.set(b)
            self._dirty = True
        if time.monotonic() - self._last_flush >= _FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        """Make every block marked so far durable (data first, then the record)."""
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return
                snapshot = self._record.encode()
                self._dirty = False
            try:
                os.fdatasync(self._fd)
                _atomic_write(self.directory / "present", snapshot)
            except OSError as exc:
                with self._lock:
                    self._dirty = True
                if exc.errno == errno.ENOSPC and self.budget is not None:
                    self.budget.disk_full()
                raise
            self._last_flush = time.monotonic()

    def touch(self) -> None:
        """Record a use now (the LRU order of eviction and `clip cache ls`)."""
        with contextlib.suppress(OSError):
            os.utime(self._lockfd)

    def writer(self) -> SequentialWriter:
        """A fast in-order writer for prefilling the whole layer while it streams."""
        return SequentialWriter(self)

    def close(self) -> None:
        """Flush and close (blocking: fdatasync). Every writer of this layer must be done."""
        if self._fd < 0:
            return
        try:
            self.flush()
        except OSError as exc:  # e.g. ENOSPC: the record stays older (safe: blocks refetch)
            log.warning("cache %s: final flush failed: %s", self.digest, exc)
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)
            os.close(self._lockfd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _pwrite(self, data: memoryview, uoff: int) -> None:
        """Every write of the data file, all of `data` or an error (a nearly full filesystem
        writes short before it says ENOSPC); ENOSPC tells the budget the filesystem is full."""
        fd = self._fd
        if fd < 0:
            raise CacheClosed(self.digest)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], uoff + done)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and self.budget is not None:
                self.budget.disk_full()
            raise


class SequentialWriter:
    """Receives the uncompressed stream in order (`build_index(on_data=writer.write)`), writes it
    straight into the data file and marks each block as soon as the stream has passed its end.

    The record is made durable every 64 MiB and by `finish()`, which also marks the final partial
    block once the total size is known. When the budget refuses more bytes (or the filesystem is
    full) the writer stops caching: the stream goes on (the index build needs it), the prefix
    written so far stays cached and the rest of the layer is served lazily.
    """

    def __init__(self, cache: LayerCache) -> None:
        self._cache = cache
        self.position = 0
        self._marked = 0  # blocks [0, _marked) are marked
        self._since_flush = 0
        #: Why caching stopped (None while every byte is written).
        self.stopped: OSError | None = None

    def write(self, uoff: int, data: bytes | memoryview) -> None:
        if uoff != self.position:
            raise InvalidArgument(
                f"cache {self._cache.digest}: prefill out of order at {uoff}, "
                f"expected {self.position}"
            )
        view = memoryview(data)
        if self.stopped is None:
            self._put(view, uoff)
        self.position += len(view)
        if self.stopped is not None:
            return
        self._since_flush += len(view)
        full = self.position // self._cache.block_size
        if full > self._marked:
            self._mark_upto(full)
        if self._since_flush >= _PREFILL_FLUSH_BYTES:
            self._flush()
            self._since_flush = 0

    def _put(self, view: memoryview, uoff: int) -> None:
        """Charge and write; on ENOSPC evict (through the budget) and try once more, then stop
        caching for good."""
        for attempt in range(2):
            try:
                self._cache._charge(len(view))
                self._cache._pwrite(view, uoff)
                return
            except OSError as exc:
                if isinstance(exc, CacheClosed) or exc.errno != errno.ENOSPC:
                    raise
                if isinstance(exc, CacheFull) or attempt == 1:
                    self.stopped = exc
                    log.warning("cache %s: caching stopped at %d bytes while building: %s",
                                self._cache.digest, uoff, exc.strerror or exc)

    def _mark_upto(self, blocks: int) -> None:
        cache = self._cache
        with cache._lock:
            for b in range(self._marked, blocks):
                cache._record.set(b)
            cache._dirty = True
        self._marked = blocks

    def finish(self, size: int | None = None) -> None:
        """End of stream: record the size (default: bytes seen), mark the tail, flush."""
        size = self.position if size is None else size
        if size != self.position:
            raise InvalidArgument(
                f"cache {self._cache.digest}: prefill ended at {self.position}, expected {size}"
            )
        self._cache.set_size(size)
        if self.stopped is None:
            self._mark_upto(-(-size // self._cache.block_size))
        self._flush()

    def _flush(self) -> None:
        """Flush the record; a full filesystem stops caching (what is marked stays unflushed:
        it is fetched again after a crash) instead of failing the build."""
        try:
            self._cache.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            if self.stopped is None:
                self.stopped = exc
                log.warning("cache %s: caching stopped at %d bytes while building: %s",
                            self._cache.digest, self.position, exc.strerror or exc)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _open_shared(directory: Path) -> int:
    """Create the layer directory and hold its lock shared (retrying if a prune removed the
    directory between our mkdir and our flock)."""
    for _ in range(8):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink > 0:
            return fd
        os.close(fd)
    raise OSError(f"cache {directory}: removed repeatedly while opening")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One layer's disk cache as `clip cache ls` shows it."""

    digest: str
    bytes_cached: int
    size: int | None
    complete: bool
    in_use: bool
    last_used: float


def scan(directory: Path, block_size: int = BLOCK_SIZE) -> list[CacheEntry]:
    """Every layer cache under `directory`, without opening (or locking) any of them."""
    out = []
    for path in sorted(directory.glob("[0-9a-f]" * 4 + "*")):
        if not _DIGEST_RE.match("sha256:" + path.name):
            continue
        out.append(_entry(path, block_size))
    return out


def _entry(path: Path, block_size: int) -> CacheEntry:
    try:
        record = _Record.decode((path / "present").read_bytes(), block_size)
    except OSError:
        record = None
    try:
        data_bytes = os.stat(path / "data").st_blocks * 512
    except OSError:
        data_bytes = 0
    size = record.size if record is not None else None
    complete = False
    if record is not None and size is not None:
        complete = all(record.test(b) for b in range(-(-size // block_size)))
    stamps = [0.0]
    for name in ("lock", "present", "data"):
        with contextlib.suppress(OSError):
            stamps.append(os.stat(path / name).st_mtime)
    with _exclusive(path) as free:
        in_use = not free
    return CacheEntry("sha256:" + path.name, data_bytes, size, complete, in_use, max(stamps))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Try the layer's lock exclusively without waiting; yields whether we got it."""
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_if_unused(path: Path) -> bool:
    """Remove a layer cache directory unless some process has it open; True when removed."""
    with _exclusive(path) as free:
        if not free:
            return False
        # unlink the lock first: an opener that raced us sees nlink 0 and starts over
        (path / "lock").unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        return True


def prune(
    directory: Path, limit: int | None, keep: Collection[str] = (), block_size: int = BLOCK_SIZE
) -> list[CacheEntry]:
    """Remove caches of layers not in use and not in `keep`, least recently used first.

    `limit` None removes every such layer; otherwise only until the total is at most `limit`.
    Returns what was removed.
    """
    entries = scan(directory, block_size)
    total = sum(e.bytes_cached for e in entries)
    removed = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if limit is not None and total <= limit:
            break
        if entry.in_use or entry.digest in keep:
            continue
        if remove_if_unused(directory / entry.digest.removeprefix("sha256:")):
            total -= entry.bytes_cached
            removed.append(entry)
    return removed


class DiskCache:
    """All layers' caches under `<root>/cache` (or `directory`); one LayerCache per digest."""

    def __init__(
        self,
        root: os.PathLike[str] | str,
        block_size: int = BLOCK_SIZE,
        directory: os.PathLike[str] | str | None = None,
        budget: DiskBudget | None = None,
    ) -> None:
        self.directory = Path(directory) if directory else Path(root) / "cache"
        self.block_size = block_size
        #: Charged by every write into any of this cache's layers (None: unbounded).
        self.budget = budget
        self._layers: dict[str, LayerCache] = {}
        self._lock = threading.Lock()

    def layer(self, digest: str) -> LayerCache:
        hexd = digest_hex(digest)
        with self._lock:
            cache = self._layers.get(hexd)
            if cache is None:
                cache = LayerCache(self.directory / hexd, digest, self.block_size, self.budget)
                self._layers[hexd] = cache
            return cache

    def is_complete(self, digest: str, size: int) -> bool:
        """Whether the layer's whole uncompressed stream of `size` bytes is on disk."""
        cache = self.layer(digest)
        return cache.size == size and cache.complete()

    def peek(self, digest: str) -> tuple[int | None, list[int]]:
        """(stream size, present blocks) of a layer, without opening (and so locking) one
        that is not open: its presence record is read from disk then. Blocking."""
        hexd = digest_hex(digest)
        with self._lock:
            cache = self._layers.get(hexd)
        if cache is not None:
            with cache._lock:
                record = cache._record
                return record.size, [b for b in range(len(record.bits) * 8) if record.test(b)]
        try:
            data = (self.directory / hexd / "present").read_bytes()
        except OSError:
            return None, []
        found = _Record.decode(data, self.block_size)
        if found is None:
            return None, []
        return found.size, [b for b in range(len(found.bits) * 8) if found.test(b)]

    def peek_complete(self, digest: str, size: int) -> bool:
        """Like `is_complete`, without opening (and so locking) a layer that is not open."""
        known, blocks = self.peek(digest)
        return known == size and set(range(-(-size // self.block_size))) <= set(blocks)

    def remove(self, digest: str) -> None:
        """Drop a layer's cached bytes (garbage collection of an unused layer)."""
        hexd = digest_hex(digest)
        with self._lock:
            cache = self._layers.pop(hexd, None)
        if cache is not None:
            cache.close()
        shutil.rmtree(self.directory / hexd, ignore_errors=True)

    def release(self, digest: str) -> None:
        """Close a layer's cache (keeping its files) so it may be evicted or pruned."""
        with self._lock:
            cache = self._layers.pop(digest_hex(digest), None)
        if cache is not None:
            cache.touch()
            cache.close()

    def evict(self, limit: int, keep: Collection[str]) -> list[CacheEntry]:
        """Bring the cache under `limit` bytes by removing layers not in `keep`, LRU first.

        Layers this process has open are locked and therefore kept too: callers `release()`
        a layer when its last user goes, which is what makes it evictable.
        """
        return prune(self.directory, limit, keep, self.block_size)

    def close(self) -> None:
        with self._lock:
            layers = list(self._layers.values())
            self._layers.clear()
        for cache in layers:
            cache.close()
