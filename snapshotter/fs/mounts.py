"""The mount table, as clip's FUSE and EROFS code needs it: what is mounted where, and detaching
a mount even when its FUSE server is gone."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
from pathlib import Path

from snapshotter.errors import Unavailable

log = logging.getLogger(__name__)

_MNT_DETACH = 2


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: Path) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at `path` in this namespace, or None."""
    target = os.fspath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                tail = fields[fields.index("-") + 1 :]
                found = (tail[0], _unescape(tail[1]))
    return found


def is_mounted(path: Path) -> bool:
    return mount_at(path) is not None


def lazy_unmount(path: Path) -> None:
    """umount2(path, MNT_DETACH): works even when the FUSE server is gone."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise Unavailable(f"fuse: cannot unmount {path}: {os.strerror(err)}")


def clear_stale_mount(path: Path) -> None:
    """Detach a clip FUSE mount left at `path` by a crashed predecessor.

    Anything else mounted there is an operator's mount: refuse instead of removing it.
    """
    for _ in range(8):
        current = mount_at(path)
        if current is None:
            return
        if current != ("fuse", "clip"):
            raise Unavailable(f"fuse: {path} is already a {current[0]} mount of {current[1]}")
        log.warning("fuse: clearing a stale clip mount at %s", path)
        lazy_unmount(path)
    raise Unavailable(f"fuse: cannot clear the stale mount at {path}")
