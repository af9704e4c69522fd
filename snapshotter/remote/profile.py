"""Start profiles: the blocks a container read in its first seconds on the node that recorded
them, fetched first wherever the layer is attached next.

A start profile is a small JSON document stored next to the layer's index: in
`<root>/indexes/<hex>.profile`, in the ContentCache (under the index key of `profile_digest()`,
a digest derived from the layer digest, so no new key family is needed) and in the OCI
artifact `clip index push` publishes.

It may carry *restart points*: for profile runs that start far (at least `MIN_GAIN`
compressed bytes) past the index checkpoint before them and past the previous run's bytes,
the deflate block boundary just before the run with its 32 KiB window (zstd-compressed, as
the index stores checkpoint windows). The recording node takes the window from its disk
cache; another node starts the run's fetch there instead of at the checkpoint, so it fetches
the run's bytes and not the interval before it (scipy's lazy start: 47.6 MB from the
registry instead of 59.3). A point is used only where it is exactly a block boundary the
node's own index records; its window is as trusted as the index's own checkpoint windows
(both come from the same stores), and a fetch from it that fails to inflate or verify makes
the layer drop the published points.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeGuard

from snapshotter.index import Checkpoint, LayerIndex
from snapshotter.index.resume import WINDOW, RestartPoint
from snapshotter.index.writer import compressor
from snapshotter.readpath.plan import runs as consecutive

PROFILE_MEDIA_TYPE = "application/vnd.clip.start-profile.v1+json"
#: Blocks per background fetch (each is one flight through the read path).
RUN_BLOCKS = 4
#: A run gets a restart point only if it saves at least this many compressed bytes (a
#: window costs 8-16 KiB in the document).
MIN_GAIN = 64 << 10
#: At most this many points per layer (the largest gains): bounds the document (~2 MB) and
#: what a node keeps of it.
MAX_POINTS = 128


def profile_digest(layer_digest: str) -> str:
    """The pseudo digest whose ContentCache index key holds the layer's start profile."""
    return "sha256:" + hashlib.sha256(f"clip:start-profile:v1:{layer_digest}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StartProfile:
    """A layer's start profile as this node reads it.

    `blocks` in the order the recording container first read them; `read_at[i]`: when it first
    read `blocks[i]` (the recording node's wall clock, seconds since the epoch), or None for a
    profile recorded before those times were kept. The layers of an image are recorded during
    one container start, so their times are one timeline: the prefetch of all of them shares
    the link in the order the container read their blocks. (Times relative to each layer's
    attach are not: a node that builds the indexes attaches each layer after its build, seconds
    apart.)"""

    blocks: list[int]
    read_at: list[float] | None = None
    points: tuple[RestartPoint, ...] = ()


def encode_profile(layer_digest: str, block_size: int, first_reads: Mapping[int, float],
                   started: float, points: Iterable[RestartPoint] = ()) -> bytes:
    """The profile document of `first_reads` (block -> seconds after `started`, the wall-clock
    time the recording started, when it was first read), blocks in the order they were first
    read: the order the prefetch fetches them in; `points` as `[uoff, coff, bits, base64 of
    the window's zstd frame]`."""
    doc: dict[str, object] = {
        "layer": layer_digest,
        "block_size": block_size,
        "blocks": list(first_reads),
        "started": round(started, 3),
        "ms": [round(seconds * 1000) for seconds in first_reads.values()],
    }
    encoded = [[p.uoff, p.coff, p.bits, base64.b64encode(p.packed).decode()] for p in points]
    if encoded:
        doc["points"] = encoded
    return json.dumps(doc, separators=(",", ":")).encode()


def restart_points(index: LayerIndex, blocks: Iterable[int], block_size: int,
                   window_at: Callable[[int, int], bytes | None]) -> list[RestartPoint]:
    """The restart points worth publishing for a profile of `blocks` (see the module doc):
    per run of consecutive blocks, the boundary before it when it lies `MIN_GAIN` past both
    the checkpoint before the run and the previous run's compressed end, and `window_at(uoff,
    length)` (the stream bytes before it, None when this node lacks them) has its window."""
    gains: list[tuple[int, Checkpoint]] = []
    reach = 0  # compressed end of the runs so far: a node fetches those bytes anyway
    for first, last in consecutive(sorted(set(blocks))):
        start = first * block_size
        end = min((last + 1) * block_size, int(index.uncompressed_size))
        mark = index.boundary_before(start)
        if mark is not None:
            gain = mark.coff - max(index.checkpoint_before(start).coff, reach)
            if gain >= MIN_GAIN:
                gains.append((gain, mark))
        reach = max(reach, index.compressed_range(start, end - start)[1])
    cctx = compressor()  # as the index compresses its checkpoint windows
    out = []
    for _gain, mark in heapq.nlargest(MAX_POINTS, gains, key=lambda item: item[0]):
        length = min(WINDOW, mark.uoff)
        window = window_at(mark.uoff - length, length)
        if window is not None and len(window) == length:
            out.append(RestartPoint(mark.coff, mark.bits, mark.uoff, cctx.compress(window)))
    return sorted(out, key=lambda p: p.uoff)


def decode_profile(data: bytes, layer_digest: str, block_size: int) -> StartProfile | None:
    """The profile in `block_size` units, or None when it is malformed, for another layer, or
    recorded in blocks that are not a multiple of `block_size` (a profile of larger blocks, as
    published before blocks were 256 KiB, is read as their smaller ones, each part at its
    block's time; profiles written before the order was kept list blocks in stream order,
    which is read as the order; those written before times were kept have none)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("layer") != layer_digest:
        return None
    blocks, recorded = doc.get("blocks"), doc.get("block_size")
    started, ms = doc.get("started"), doc.get("ms")
    if not isinstance(recorded, int) or recorded < block_size or recorded % block_size:
        return None
    if not _naturals(blocks):
        return None
    timed = ms is not None or started is not None
    if not timed:
        times = [0.0] * len(blocks)
    elif (_naturals(ms) and len(ms) == len(blocks) and isinstance(started, int | float)
          and not isinstance(started, bool)):
        times = [started + t / 1000 for t in ms]
    else:
        return None
    split = recorded // block_size
    first: dict[int, float] = {}
    for b, t in zip(blocks, times, strict=True):
        for part in range(b * split, (b + 1) * split):
            first.setdefault(part, t)
    return StartProfile(list(first), list(first.values()) if timed else None,
                        _points(doc.get("points")))


def _points(value: object) -> tuple[RestartPoint, ...]:
    """The document's restart points; none at all when any is malformed (a profile without
    points still names the blocks to prefetch)."""
    if not isinstance(value, list) or len(value) > MAX_POINTS:
        return ()
    out = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 4 and _naturals(item[:3])
                and isinstance(item[3], str) and item[2] < 8):
            return ()
        try:
            packed = base64.b64decode(item[3], validate=True)
        except (binascii.Error, ValueError):
            return ()
        out.append(RestartPoint(item[1], item[2], item[0], packed))
    return tuple(out)


def _naturals(value: object) -> TypeGuard[list[int]]:
    """Whether `value` is a JSON list of non-negative integers."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def runs(blocks: Iterable[int], limit: int = RUN_BLOCKS) -> list[list[int]]:
    """Sorted blocks grouped into runs of consecutive numbers, at most `limit` long."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][-1] == b - 1 and len(out[-1]) < limit:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def in_first_read_order(work: list[list[int]], profile: StartProfile, untimed: float,
                        ) -> list[tuple[float, list[int]]]:
    """`work` (runs of profile blocks, possibly joined with blocks between), each with the time
    its earliest block was first read (`untimed` for a profile without times), ordered by that
    time and then by the block's place in the profile: the run the container needed first is
    fetched first."""
    times = profile.read_at if profile.read_at is not None else [untimed] * len(profile.blocks)
    first: dict[int, tuple[float, int]] = {}
    for place, (b, seconds) in enumerate(zip(profile.blocks, times, strict=True)):
        first.setdefault(b, (seconds, place))
    never = (math.inf, len(profile.blocks))
    keyed = sorted(((min((first.get(b, never) for b in blocks), default=never), blocks)
                    for blocks in work), key=lambda item: item[0])
    return [(key[0], blocks) for key, blocks in keyed]
