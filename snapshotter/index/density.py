"""Adaptive gzip checkpoint density: as many checkpoints as the index-size budget allows.

A random read costs, on average, half a checkpoint interval of compressed bytes, so denser
checkpoints make lazy reads cheaper; each checkpoint costs its 32 KiB window in the index
(zstd-compressed about as well as the layer's own data compresses). The fixed rules of the
builder (a checkpoint every ``checkpoint_spacing`` compressed bytes, every ``max_span``
uncompressed bytes, at large file starts) stay; on top of them a block boundary becomes a
checkpoint when

* the compressed distance from the last checkpoint is at least ``min_checkpoint_spacing``
  (256 KiB: closer checkpoints save little per read and cost a window each),
* the window's expected size — 32 KiB times the compression ratio of the interval since the
  last checkpoint, times a margin for zstd compressing one window alone — is at most
  ``window_share`` (0.8%) of that interval's uncompressed size, and
* the index as estimated so far (windows of all kept checkpoints, plus entry records, digests
  and block marks at their measured compressed cost) stays within ``index_share`` (1%) of the
  uncompressed bytes seen so far.

The local rule spends windows where data compresses well (text: a checkpoint every ~1.5 MB of
output instead of ~7 MB); the running budget keeps metadata-heavy layers (many small files,
whose digests and records already take most of the 1%) near the target. A streaming build
cannot know what metadata is still to come, so once the index is serialised and found over
``index_share``, ``prune`` drops dense checkpoints (smallest merged interval first, never
making an interval exceed the fixed spacing) until it fits, and the builder serialises again.
Everything depends on the stream alone, so the build stays deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW = 32768
#: zstd compresses one 32 KiB window alone somewhat worse than gzip does the stream around it
WINDOW_MARGIN = 1.25
#: measured compressed index bytes per regular file (record, path, marks share) and per digest
PER_FILE = 40
PER_DIGEST = 32
PER_MARK = 8


@dataclass(frozen=True, slots=True)
class DensityRule:
    """The dense-checkpoint rule's knobs (IndexBuildOptions carries them into a build)."""

    min_checkpoint_spacing: int = 256 << 10
    window_share: float = 0.008
    index_share: float = 0.01


class DensityBudget:
    """Running estimate of the index size; decides whether a block boundary is worth a
    checkpoint beyond the fixed spacing rules."""

    def __init__(self, rule: DensityRule) -> None:
        self.rule = rule
        self.file_meta = 0  # estimated compressed bytes of file records and digests so far
        self.mark_meta = 0  # estimated compressed bytes of block marks so far
        self.windows = 0  # estimated compressed bytes of the kept checkpoints' windows

    def on_files(self, files: int, chunks: int) -> None:
        """The regular files and digest chunks seen so far (counted by the tar scanner)."""
        self.file_meta = PER_FILE * files + PER_DIGEST * chunks

    def on_mark(self) -> None:
        self.mark_meta += PER_MARK

    @staticmethod
    def window_cost(uoff: int, du: int, dc: int) -> float:
        """Expected compressed size of the window at ``uoff`` (ratio of the last interval)."""
        return min(WINDOW, uoff) * (dc / du if du > 0 else 1.0) * WINDOW_MARGIN

    def due(self, uoff: int, du: int, dc: int) -> bool:
        """Whether a boundary ``du``/``dc`` bytes after the last checkpoint should be one."""
        rule = self.rule
        if dc < rule.min_checkpoint_spacing or du <= 0:
            return False
        cost = self.window_cost(uoff, du, dc)
        return (
            cost <= rule.window_share * du
            and self.file_meta + self.mark_meta + self.windows + cost <= rule.index_share * uoff
        )

    def kept(self, uoff: int, du: int, dc: int) -> None:
        """Account for a checkpoint kept by any rule."""
        self.windows += int(self.window_cost(uoff, du, dc))


@dataclass(frozen=True, slots=True)
class Kept:
    """What ``prune`` needs of a kept checkpoint: where it is, whether only the density rule
    wanted it, and what dropping it saves (its compressed window plus its record)."""

    coff: int
    uoff: int
    dense: bool
    saving: int


def prune(kept: Sequence[Kept], overshoot: int, max_coff_gap: int, max_ugap: int) -> set[int]:
    """Positions of dense checkpoints to drop so the index shrinks by ``overshoot`` bytes.

    Candidates go in order of the interval their removal would create (smallest first, ties by
    position), re-checked against their current neighbours: a drop never makes an interval
    exceed ``max_coff_gap`` compressed or ``max_ugap`` uncompressed bytes.
    """
    n = len(kept)
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))

    def gap(i: int) -> tuple[int, int]:
        after = kept[nxt[i]] if nxt[i] < n else None
        end_c = after.coff if after else kept[i].coff
        end_u = after.uoff if after else kept[i].uoff
        before = kept[prev[i]]
        return end_c - before.coff, end_u - before.uoff

    heap = [(gap(i)[0], i) for i in range(1, n) if kept[i].dense]
    heapq.heapify(heap)
    dropped: set[int] = set()
    saved = 0
    while heap and saved < overshoot:
        size, i = heapq.heappop(heap)
        dc, du = gap(i)
        if dc != size:  # a neighbour went: re-queue with the current interval
            heapq.heappush(heap, (dc, i))
            continue
        if dc > max_coff_gap or du > max_ugap:
            continue
        dropped.add(i)
        saved += kept[i].saving
        nxt[prev[i]] = nxt[i]
        if nxt[i] < n:
            prev[nxt[i]] = prev[i]
    return dropped
