"""Start profiles: the blocks a container read in its first seconds on the node that recorded
them, fetched first wherever the layer is attached next.

A start profile is a small JSON document stored next to the layer's index: in
`<root>/indexes/<hex>.profile`, in the ContentCache (under the index key of `profile_digest()`,
a digest derived from the layer digest, so no new key family is needed) and in the OCI
artifact `clip index push` publishes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

PROFILE_MEDIA_TYPE = "application/vnd.clip.start-profile.v1+json"
#: Blocks per background fetch (each is one flight through the read path).
RUN_BLOCKS = 4


def profile_digest(layer_digest: str) -> str:
    """The pseudo digest whose ContentCache index key holds the layer's start profile."""
    return "sha256:" + hashlib.sha256(f"clip:start-profile:v1:{layer_digest}".encode()).hexdigest()


def encode_profile(layer_digest: str, block_size: int, blocks: Iterable[int]) -> bytes:
    """The profile document; `blocks` in the order the container first read them (repeats
    dropped), which is the order the prefetch fetches them in."""
    doc = {"layer": layer_digest, "block_size": block_size, "blocks": list(dict.fromkeys(blocks))}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_profile(data: bytes, layer_digest: str, block_size: int) -> list[int] | None:
    """The profile's blocks in `block_size` units, in the recorded order, or None when it is
    malformed, for another layer, or recorded in blocks that are not a multiple of
    `block_size` (a profile of larger blocks, as published before blocks were 256 KiB, is read
    as their smaller ones; profiles written before the order was kept list blocks in stream
    order, which is read as the order)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("layer") != layer_digest:
        return None
    blocks, recorded = doc.get("blocks"), doc.get("block_size")
    if not isinstance(recorded, int) or recorded < block_size or recorded % block_size:
        return None
    if not isinstance(blocks, list):
        return None
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        return None
    split = recorded // block_size
    return list(dict.fromkeys(part for b in blocks for part in range(b * split, (b + 1) * split)))


def runs(blocks: Iterable[int], limit: int = RUN_BLOCKS) -> list[list[int]]:
    """Sorted blocks grouped into runs of consecutive numbers, at most `limit` long."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][-1] == b - 1 and len(out[-1]) < limit:
            out[-1].append(b)
        else:
            out.append([b])
    return out


def in_first_read_order(work: list[list[int]], profile: list[int]) -> list[list[int]]:
    """`work` (runs of profile blocks, possibly joined with blocks between) ordered by the
    earliest place in `profile` of a block each contains: the run the container needed first
    is fetched first."""
    rank: dict[int, int] = {}
    for i, b in enumerate(profile):
        rank.setdefault(b, i)
    last = len(profile)
    return sorted(work, key=lambda blocks: min((rank.get(b, last) for b in blocks), default=last))
