"""Planning a miss: which blocks one flight covers and where its inflation starts and stops.

A run of missing blocks is widened downwards to the place its fetch starts from (those bytes
are inflated anyway). When it continues blocks already present (a sequential reader), it is also
widened upwards to the next checkpoint, and the bytes between the last block boundary and that
checkpoint are kept as a *fragment*: the reader's next miss then starts fetching exactly at the
checkpoint, so a sequential read fetches and inflates each compressed byte about once. Random
reads do not pay for that look-ahead. Runs are capped at `max_run` bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from snapshotter.readpath.layer import Layer


@dataclass(frozen=True, slots=True)
class Plan:
    """What one flight covers: blocks first..last, inflating on to `tail` (a checkpoint) when
    set, starting after `fragment` (bytes of block `first` a previous flight already made)."""

    first: int
    last: int
    tail: int | None
    fragment: bytes


def runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block numbers -> inclusive (first, last) runs of consecutive blocks."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b - 1:
            out[-1] = (out[-1][0], b)
        else:
            out.append((b, b))
    return out


def plan(
    layer: Layer, first: int, last: int, max_run: int, fragment: bytes,
    free: Callable[[int], bool],
) -> Plan:
    """Grow the missing run first..last to what its fetch should cover (see the module doc).

    `free(block)`: the block is neither on disk nor in flight.
    """
    bs = layer.cache.block_size
    limit = max(1, max_run // bs)
    sequential = first > 0 and not free(first - 1)
    if layer.index.compression == "none":
        return Plan(first, last, None, fragment)
    if not fragment:
        floor = layer.best_start(first * bs).uoff
        while first > 0 and (first - 1) * bs >= floor and last - first + 1 < limit:
            if not free(first - 1):
                break
            first -= 1
    if not sequential:
        return Plan(first, last, None, fragment)
    ceiling = next_checkpoint(layer, (last + 1) * bs)
    nblocks = layer.nblocks()
    while last + 1 < nblocks and last - first + 1 < limit:
        if min((last + 2) * bs, layer.size) > ceiling or not free(last + 1):
            break
        last += 1
    end = min((last + 1) * bs, layer.size)
    tail = ceiling if end < ceiling < end + bs and free(last + 1) else None
    return Plan(first, last, tail, fragment)


def next_checkpoint(layer: Layer, uoff: int) -> int:
    """Stream offset of the first checkpoint at or after uoff (the stream end if none)."""
    index = layer.index
    cp = index.checkpoint_before(uoff)
    if cp.uoff >= uoff:
        return int(cp.uoff)
    following = cp.number + 1
    if following < index.checkpoint_count:
        return int(index.checkpoint(following).uoff)
    return layer.size
