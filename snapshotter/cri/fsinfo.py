"""clip's own storage in the CRI ``ImageFsInfo`` answer, so kubelet's image GC sees it.

What kubelet does with the answer (its CRI stats provider, used for containerd): it reads
only the *first* ``image_filesystems`` entry, asks the node for the capacity and free space
of the filesystem holding ``fs_id.mountpoint``, and garbage-collects images when that
filesystem's occupancy passes ``imageGCHighThresholdPercent``; ``used_bytes`` and
``inodes_used`` are what the summary API reports as the images' usage. So:

* containerd 1.6 reports, for a proxy snapshotter, ``<containerd root>/io.containerd.
  snapshotter.v1.clip``, a directory that does not exist: kubelet then gets no capacity and
  image GC cannot run. When the reported mountpoint does not exist, clip puts its own root
  there (that filesystem holds the images' bytes).
* When the first entry's filesystem is the one holding clip's root, clip adds its storage
  (layer caches, indexes, EROFS images) to that entry's used bytes and inodes: the
  occupancy kubelet acts on already includes them, and now the reported usage does too.
* When clip's root is on another filesystem, clip appends an entry of its own: CRI clients
  (``crictl imagefsinfo``, monitoring) see it, kubelet's GC does not (first entry only);
  ``[disk_cache] limit_bytes`` bounds that filesystem instead (docs/deploy.md).

containerd's own numbers (the snapshots' Usage, i.e. writable layers and non-lazy layers) are
kept: clip's storage is disjoint from them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from snapshotter.api.cri.runtime.v1 import api_pb2
from snapshotter.config import Config

# Directories under the root holding what clip stores besides containerd's snapshots.
ROOT_STORAGE = ("indexes", "erofs")


@dataclass(frozen=True)
class Usage:
    bytes: int
    inodes: int


def storage_dirs(config: Config) -> list[Path]:
    """The disk cache and the per-layer artifacts clip keeps under its root."""
    root = Path(config.daemon.root)
    return [config.cache_dir(), *(root / name for name in ROOT_STORAGE)]


def storage_usage(dirs: list[Path]) -> Usage:
    """Allocated bytes (sparse cache files count what they hold) and inodes under ``dirs``;
    hard links are counted once; mount points below are not entered."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in dirs:
        try:
            dev = top.stat().st_dev
        except OSError:
            continue
        stack = [str(top)]
        while stack:
            total += _scan(stack, dev, seen)
    return Usage(bytes=total, inodes=len(seen))


def _scan(stack: list[str], dev: int, seen: set[tuple[int, int]]) -> int:
    path = stack.pop()
    allocated = 0
    try:
        st = os.lstat(path)
        entries = list(os.scandir(path))
    except OSError:  # removed while we walk (eviction, layer removal): not there any more
        return 0
    if (st.st_dev, st.st_ino) not in seen:
        seen.add((st.st_dev, st.st_ino))
        allocated += st.st_blocks * 512
    for entry in entries:
        try:
            est = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.is_dir(follow_symlinks=False):
            if est.st_dev == dev:
                stack.append(entry.path)
            continue
        if (est.st_dev, est.st_ino) not in seen:
            seen.add((est.st_dev, est.st_ino))
            allocated += est.st_blocks * 512
    return allocated


def add_clip_storage(response: api_pb2.ImageFsInfoResponse, root: Path, usage: Usage) -> None:
    """Fold clip's ``usage`` into containerd's answer as the module docstring explains."""
    now = time.time_ns()
    root_dev = root.stat().st_dev
    if response.image_filesystems:
        first = response.image_filesystems[0]
        try:
            same = Path(first.fs_id.mountpoint).stat().st_dev == root_dev
        except OSError:  # containerd's path for a proxy snapshotter: not on this node
            first.fs_id.mountpoint = str(root)
            same = True
        if same:
            first.used_bytes.value += usage.bytes
            first.inodes_used.value += usage.inodes
            first.timestamp = now
            return
    entry = response.image_filesystems.add()
    entry.timestamp = now
    entry.fs_id.mountpoint = str(root)
    entry.used_bytes.value = usage.bytes
    entry.inodes_used.value = usage.inodes
