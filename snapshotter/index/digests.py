"""File digests: a sha256 per verification chunk of every regular file's data.

The tar scanner reports each file's data as it passes, either whole (the file lies inside one
piece of the stream) or in parts followed by an end. ``Digests`` hashes at once, in the
caller's thread. ``DeferredDigests`` hands the same work to the build's ``SideWorker``: hashing
a layer's file data is about a third of a build's CPU and releases the GIL, so on a second
core it runs beside the tar parsing instead of after it. A piece's whole files go over as one
batch that ``_native.digest_files`` hashes through libcrypto's SHA256 with the GIL released
(tens of thousands of small files would otherwise cost an interpreter round trip each, and
hashlib holds the GIL for data under 2 KiB); without libcrypto, hashlib does it.

Digests are added to the member the scanner reported (``Member.digests``, the chunks' digests
concatenated); when a hardlink target is replaced, its heir takes over that very member (see
``Tree._remove``), so they only need to be complete once the worker is closed, before the index
is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
from typing import TYPE_CHECKING, Any, Protocol

from snapshotter.index import _native
from snapshotter.index.worker import SideWorker

if TYPE_CHECKING:  # the scanner imports this module
    from snapshotter.index.tarscan import Member


class Digester(Protocol):
    """What the tar scanner calls with file data, in stream order."""

    def whole(self, member: Member, data: memoryview) -> None: ...

    def part(self, member: Member, data: memoryview) -> None: ...

    def end(self, member: Member) -> None: ...


class Digests:
    """Hashes in the calling thread: one digest for a file up to ``chunk_size``, else one per
    ``chunk_size`` bytes (the last one shorter); none for an empty file."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk = chunk_size
        self._hash: Any = None  # the running chunk of a file reported in parts
        self._left = 0  # bytes still missing from that chunk

    def whole(self, member: Member, data: memoryview) -> None:
        size, chunk = len(data), self.chunk
        sha256 = hashlib.sha256
        member.digests += b"".join(
            sha256(data[p : p + chunk]).digest() for p in range(0, size, chunk)
        )

    def part(self, member: Member, data: memoryview) -> None:
        if self._hash is None:
            self._hash = hashlib.sha256()
            self._left = self.chunk
        if len(data) < self._left:  # the common case: no chunk boundary inside
            self._hash.update(data)
            self._left -= len(data)
            return
        while len(data):
            take = min(self._left, len(data))
            self._hash.update(data[:take])
            data = data[take:]
            self._left -= take
            if not self._left:
                member.digests += self._hash.digest()
                self._hash = hashlib.sha256()
                self._left = self.chunk

    def end(self, member: Member) -> None:
        if self._hash is not None and self._left != self.chunk:
            member.digests += self._hash.digest()
        self._hash = None


@functools.cache
def sha256_address() -> int | None:
    """The address of libcrypto's one-shot ``SHA256()`` (the OpenSSL that hashlib uses), or
    None when no libcrypto can be loaded."""
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            return ctypes.cast(ctypes.CDLL(name).SHA256, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


class DeferredDigests:
    """A digester whose work runs on a ``SideWorker``: calls for files split across pieces are
    recorded in stream order, whole files are collected and handed over per piece by
    ``flush``."""

    def __init__(self, chunk_size: int, worker: SideWorker) -> None:
        digests = Digests(chunk_size)
        self._chunk = chunk_size
        self._worker = worker
        self._whole_file = digests.whole
        self._part = digests.part
        self._end_file = digests.end
        self._sha256 = sha256_address()
        self._files: list[tuple[Member, memoryview]] = []
        self._record = worker.pending.append

    def whole(self, member: Member, data: memoryview) -> None:
        self._files.append((member, data))

    def part(self, member: Member, data: memoryview) -> None:
        self._record((self._part, member, data))

    def end(self, member: Member) -> None:
        self._record((self._end, member, None))

    def flush(self) -> None:
        """Hand this piece's whole files, and every call recorded, to the side thread."""
        if self._files:
            self._record((self._hash_files, self._files, None))
            self._files = []
        self._worker.flush()

    def _hash_files(self, files: list[tuple[Member, memoryview]], _unused: None) -> None:
        if self._sha256 is not None:
            _native.digest_files(files, self._chunk, self._sha256)
            return
        for member, data in files:
            self._whole_file(member, data)

    def _end(self, member: Member, _unused: None) -> None:
        self._end_file(member)
