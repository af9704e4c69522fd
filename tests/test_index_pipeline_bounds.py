"""The index builder's pipeline reads a bounded amount ahead of a slow consumer.

Memory of a streaming build is what its threads hold: the chunk the reading thread has read,
QUEUE_CHUNKS queued chunks, the decoder's input and output, QUEUE_BATCHES queued batches and
the batch the calling thread is on. With the consumer (``on_data``) held on its very first
call, the pipeline fills every slot and stops: the blob sees an exact number of reads and no
more until the consumer goes on.
"""

from __future__ import annotations

import io
import os
import queue
import tarfile
import threading
from typing import Any, BinaryIO, cast

import pytest

from snapshotter.index import build_index
from snapshotter.index import builder as b

MIB = 1 << 20


def plain_tar(size: int) -> bytes:
    """An uncompressed tar holding one file of ``size`` random bytes (the blob is the stream,
    so the plain decoder hands on every chunk it reads as it is)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return out.getvalue()


class CountingBlob(io.RawIOBase):
    """Counts read calls and says when read number ``full_at`` has been made."""

    def __init__(self, data: bytes, full_at: int) -> None:
        super().__init__()
        self.data = data
        self._file = io.BytesIO(data)
        self.calls = 0
        self.full_at = full_at
        self.filled = threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        data = self._file.read(size)
        if self.calls == self.full_at:
            self.filled.set()
        return data


def wait_full(q: queue.Queue[Any]) -> bool:
    """True once ``q`` is full (woken by every put); False if it never fills."""
    with q.not_empty:  # holds the queue's mutex: read its deque, not q.full() (locks again)
        return q.not_empty.wait_for(lambda: 0 < q.maxsize <= len(q.queue), timeout=60)


def test_a_held_consumer_stops_the_reading_thread_after_the_pipeline_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the head read; the first batch (the head and one chunk: a batch is >= BATCH_BYTES),
    # QUEUE_BATCHES queued batches, the decoder's batch waiting for room, QUEUE_CHUNKS queued
    # chunks and the chunk the reading thread waits to queue
    assert b.READ_SIZE == b.BATCH_BYTES  # one chunk per batch after the first
    full_at = 1 + 1 + b.QUEUE_BATCHES + 1 + b.QUEUE_CHUNKS + 1
    blob = CountingBlob(plain_tar((full_at + 4) * b.READ_SIZE), full_at)
    stages: list[b._Stage] = []
    stage_init = b._Stage.__init__

    def recording_init(self: b._Stage, *args: Any) -> None:
        stage_init(self, *args)
        stages.append(self)

    monkeypatch.setattr(b._Stage, "__init__", recording_init)
    held: list[tuple[int, int, bool, bool]] = []

    def on_data(uoff: int, view: memoryview) -> None:
        if not held:
            # (the waits are bounds against a hang only: a bounded pipeline always fills)
            filled = blob.filled.wait(60)
            queues_full = all(wait_full(stage.queue) for stage in stages)
            held.append((uoff, blob.calls, filled, queues_full))

    result = build_index(cast(BinaryIO, blob), io.BytesIO(), on_data=on_data)

    assert len(stages) == 2
    # every slot full, every thread waiting for room: no read past the bound
    assert held == [(0, full_at, True, True)]
    assert result.compression == "none"
    assert result.uncompressed_size == len(blob.data)
    # what a held consumer makes the builder hold, compressed side and uncompressed side
    assert full_at * b.READ_SIZE <= 10 * MIB
