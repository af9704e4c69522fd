"""File digests: a sha256 per verification chunk of every regular file's data.

The tar scanner reports each file's data as it passes, either whole (the file lies inside one
piece of the stream) or in parts followed by an end. ``Digests`` hashes at once, in the
caller's thread. ``DeferredDigests`` records the same calls and hands them, a batch at a time,
to a thread of its own: hashing a layer's file data is about a third of a build's CPU, and it
releases the GIL, so on a second core it runs beside the tar parsing instead of after it.
Digests are appended to ``Member.digests`` in place (the tree may share that list between a
replaced hardlink target and its heir), so they only need to be complete once the deferred
hashing is closed, before the index is written.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Protocol

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
        if size <= chunk:
            if size:
                member.digests.append(sha256(data).digest())
            return
        member.digests.extend(sha256(data[p : p + chunk]).digest() for p in range(0, size, chunk))

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
                member.digests.append(self._hash.digest())
                self._hash = hashlib.sha256()
                self._left = self.chunk

    def end(self, member: Member) -> None:
        if self._hash is not None and self._left != self.chunk:
            member.digests.append(self._hash.digest())
        self._hash = None


class DeferredDigests:
    """A digester that runs ``Digests`` on a ``SideWorker``: the scanner's calls are recorded
    in stream order and hashed there."""

    def __init__(self, chunk_size: int, worker: SideWorker) -> None:
        digests = Digests(chunk_size)
        self._whole = digests.whole
        self._part = digests.part
        self._end_file = digests.end
        self._record = worker.pending.append  # one call per file on the hot path

    def whole(self, member: Member, data: memoryview) -> None:
        self._record((self._whole, member, data))

    def part(self, member: Member, data: memoryview) -> None:
        self._record((self._part, member, data))

    def end(self, member: Member) -> None:
        self._record((self._end, member, None))

    def _end(self, member: Member, _unused: None) -> None:
        self._end_file(member)
