"""Perform the mounts a snapshotter returns, as containerd's ``mount.All`` does, and undo them.

Overlay options longer than a page are compacted the way containerd does it: the mount runs
in a child whose working directory is the lowerdirs' common parent, with relative lowerdirs.
Every mount is recorded so a test's teardown can unmount it by path even after a failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

PAGE = os.sysconf("SC_PAGESIZE")


class MountLike(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def options(self) -> tuple[str, ...]: ...


def _compact(options: list[str]) -> tuple[list[str], str | None]:
    """Rewrite lowerdir=... relative to the lowerdirs' common parent when too long."""
    if len(",".join(options)) < PAGE - 512:
        return options, None
    idx = next(i for i, o in enumerate(options) if o.startswith("lowerdir="))
    lowers = options[idx][len("lowerdir=") :].split(":")
    common = os.path.commonpath(lowers)
    if common in lowers:
        common = os.path.dirname(common)
    rel = [os.path.relpath(p, common) for p in lowers]
    return [*options[:idx], "lowerdir=" + ":".join(rel), *options[idx + 1 :]], common


class Mounter:
    """Mounts performed by one test, unmounted in reverse order by ``unmount_all``."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount_all(self, mounts: Sequence[MountLike], target: Path) -> None:
        for m in mounts:
            self.mount(m, target)

    def mount(self, m: MountLike, target: Path) -> None:
        options = list(m.options)
        cwd = None
        if m.type == "bind":
            args = ["mount", "-o", ",".join(options), m.source, str(target)]
        else:
            options, cwd = _compact(options)
            args = ["mount", "-t", m.type, "-o", ",".join(options), m.source, str(target)]
        result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{' '.join(args)[:300]}: {result.stderr.strip()}")
        self.mounted.append(target)

    def unmount(self, target: Path) -> None:
        while target in self.mounted:
            subprocess.run(["umount", str(target)], check=True, capture_output=True)
            self.mounted.remove(target)

    def unmount_all(self) -> None:
        errors = []
        for target in reversed(list(self.mounted)):
            result = subprocess.run(["umount", str(target)], capture_output=True, text=True)
            if result.returncode != 0:
                result = subprocess.run(
                    ["umount", "-l", str(target)], capture_output=True, text=True
                )
            if result.returncode != 0:
                errors.append(f"{target}: {result.stderr.strip()}")
        self.mounted.clear()
        if errors:
            raise OSError("unmount failed: " + "; ".join(errors))
