"""On-disk layout of ordinary snapshots and the mounts containerd performs on them.

Directories are named by numeric snapshot id, never by key (keys are opaque strings from
containerd and may contain anything), so a key can never steer a path outside the root and
overlay option strings stay short: a 128-layer lowerdir fits in one page.

Crash safety: a new snapshot's directories are built under ``snapshots/new-*`` and renamed to
``snapshots/<id>`` inside the database transaction that inserts its row; a removed snapshot's
row is deleted first and its directory second. Whatever a ``kill -9`` leaves behind is a
directory that is not a live id, which Cleanup removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from snapshotter.snapshots.store import Kind, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    """A mount as containerd's ``types.Mount`` carries it."""

    type: str
    source: str
    options: tuple[str, ...]


def _overlay_index_supported() -> bool:
    """containerd passes ``index=off`` when the kernel knows the option; so do we."""
    return Path("/sys/module/overlay/parameters/index").exists()


class Layout:
    """``<root>/snapshots/<id>/{fs,work}`` for every snapshot record."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.index_off = _overlay_index_supported()

    def dir(self, rid: int) -> Path:
        return self.snapshots / str(rid)

    def fs(self, rid: int) -> Path:
        return self.snapshots / str(rid) / "fs"

    def work(self, rid: int) -> Path:
        return self.snapshots / str(rid) / "work"

    def lowerdir(self, record: Record) -> str:
        """Where a committed snapshot's tree is: its fs dir, or a remote layer's directory."""
        return record.remote_dir if record.remote_dir else str(self.fs(record.id))

    def stage(self, kind: Kind, owner_of: str | None) -> Path:
        """Build a new snapshot's directories in a staging dir; ``owner_of`` gives fs's owner.

        Like containerd's overlay snapshotter, the new fs dir takes the uid/gid of the parent's
        tree so a container that chowned its root keeps that owner in the next layer.
        """
        staging = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots))
        try:
            (staging / "fs").mkdir(mode=0o755)
            if kind is Kind.ACTIVE:
                (staging / "work").mkdir(mode=0o711)
            if owner_of is not None:
                st = os.stat(owner_of)
                os.lchown(staging / "fs", st.st_uid, st.st_gid)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def install(self, staging: Path, rid: int) -> None:
        """Move a staged snapshot to its id (called inside the inserting transaction)."""
        target = self.dir(rid)
        if target.exists():  # left by a crash before its row was committed
            shutil.rmtree(target)
        staging.rename(target)

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def trash(self, rid: int) -> Path | None:
        """Move a removed snapshot's directory aside (instant); delete it with ``discard``.

        Called after its row is gone; if anything fails, Cleanup reclaims the leftovers.
        """
        target = self.dir(rid)
        trash = self.snapshots / f"rm-{rid}"
        try:
            target.rename(trash)
        except OSError as exc:
            log.warning("leaving %s for cleanup: %s", target, exc)
            return None
        return trash

    def orphans(self, live: set[int]) -> list[Path]:
        """Every entry under snapshots/ that is not a live snapshot id."""
        return sorted(
            Path(entry.path)
            for entry in os.scandir(self.snapshots)
            if not (entry.name.isdigit() and int(entry.name) in live)
        )

    def discard_all(self, paths: list[Path]) -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    def mounts(self, record: Record, ancestors: list[Record]) -> list[Mount]:
        """The mounts containerd's overlayfs snapshotter would return for this snapshot."""
        if not ancestors:
            flag = "ro" if record.kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs(record.id)), (flag, "rbind"))]
        options: list[str] = ["index=off"] if self.index_off else []
        if record.kind is Kind.ACTIVE:
            options += [f"workdir={self.work(record.id)}", f"upperdir={self.fs(record.id)}"]
        elif len(ancestors) == 1:
            return [Mount("bind", self.lowerdir(ancestors[0]), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self.lowerdir(a) for a in ancestors))
        return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(path: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes under ``path``, hard links counted once."""
    seen: set[int] = set()
    size = 0
    stack = [str(path)]
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        size += st.st_blocks * 512
        if os.path.isdir(current) and not os.path.islink(current):
            stack.extend(entry.path for entry in os.scandir(current))
    return size, len(seen)
