"""Mounting an EROFS image file-backed (kernel 6.12+: the image file itself is the source, no
loop device) with the layer's tar stream as its extra device."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from snapshotter.erofs.probe import ProbeLayer, probe_layer
from snapshotter.errors import ClipError, FailedPrecondition

MNT_DETACH = 2
EINVAL_HINT = "not an EROFS image this kernel reads, or a device that does not match it"


class MountError(FailedPrecondition):
    """mount(2) or umount2(2) of an EROFS image failed; the message names the errno."""


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                              ctypes.c_ulong, ctypes.c_char_p]
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc = lib
    return _libc


def _describe(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


def mount_image(image: Path, device: Path, target: Path, *, direct_io: bool = False) -> None:
    """mount -t erofs -o ro,device=DEVICE[,directio] IMAGE TARGET, file-backed, read-only.

    ``direct_io`` (kernel 6.13+) reads file data from the device with direct I/O instead of
    through the device file's page cache: a byte is then cached once (in the layer's files)
    rather than twice, and the device file's readahead no longer pulls in its neighbours'
    bytes. Metadata reads of the image stay buffered (measured: its pages stay cached)."""
    if b"," in os.fsencode(device):
        raise MountError(f"erofs: cannot mount {image} at {target}: device path {device} "
                         "contains a comma (mount options are comma separated)")
    options = b"device=" + os.fsencode(os.path.abspath(device))
    if direct_io:
        options += b",directio"
    flags = os.ST_RDONLY  # MS_RDONLY, nothing else: setuid and devices work as on overlayfs
    rc = _lib().mount(os.fsencode(os.path.abspath(image)), os.fsencode(target), b"erofs",
                      flags, options)
    if rc != 0:
        err = ctypes.get_errno()
        hint = f" ({EINVAL_HINT})" if err == errno.EINVAL else ""
        raise MountError(f"erofs: cannot mount {image} (device {device}) at {target}: "
                         f"{_describe(err)}{hint}")


def unmount(target: Path) -> None:
    """Unmount ``target``; a busy mount is detached lazily; not mounted is not an error."""
    path = os.fsencode(target)
    if _lib().umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point / gone
        return
    if err == errno.EBUSY and _lib().umount2(path, MNT_DETACH) == 0:
        return
    err = ctypes.get_errno() if err == errno.EBUSY else err
    raise MountError(f"erofs: cannot unmount {target}: {_describe(err)}")


@dataclass(frozen=True)
class Probe:
    """What the kernel here does with clip's images."""

    #: None when file-backed EROFS with an extra device works, else one line saying why not
    #: (what ``[fs] mode = "auto"`` logs when it falls back to the FUSE tree).
    unusable: str | None
    #: Whether compact inodes' own mtimes are shown (kernel 6.15+); images may then be written
    #: with ``compact_mtime=True``.
    compact_mtime: bool
    #: Whether mounts over files in the device directory may read with direct I/O: the kernel
    #: takes ``directio`` (6.13+) and that filesystem serves direct reads at the 512-byte
    #: alignment of file data inside a tar stream (not every one does: 4 KiB-sector disks).
    direct_io: bool = False


def probe_file_backed(workdir: Path, device_dir: Path | None = None) -> Probe:
    """Mount a tiny generated image over a tiny device file (in ``device_dir``, by default
    ``workdir``), read a file through the device mapping and stat a compact inode with a time
    of its own; then the same read with direct I/O. Leaves nothing behind."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="erofs-probe.", dir=workdir) as tmp:
        root = Path(tmp)
        try:
            if device_dir is not None:
                device_dir.mkdir(parents=True, exist_ok=True)
            layer = probe_layer(root, device_dir)
        except (ClipError, OSError) as exc:
            return Probe(f"erofs probe: cannot build the probe image: {exc}", False)
        try:
            return _probe_mounts(layer, root / "mnt")
        finally:
            layer.device.unlink(missing_ok=True)


def _probe_mounts(layer: ProbeLayer, mnt: Path) -> Probe:
    mnt.mkdir()
    try:
        mount_image(layer.image, layer.device, mnt)
    except MountError as exc:
        return Probe(str(exc), False)
    try:
        got = (mnt / "probe").read_bytes()
        stamp = os.stat(mnt / "stamp").st_mtime_ns
    except OSError as exc:
        return Probe(f"erofs probe: reading through the mount failed: {exc.strerror}", False)
    finally:
        unmount(mnt)
    if got != layer.data:
        return Probe("erofs probe: the mounted image returned wrong bytes", False)
    return Probe(None, stamp == layer.stamp_mtime_ns, _reads_direct(layer, mnt))


def _reads_direct(layer: ProbeLayer, mnt: Path) -> bool:
    """Whether a ``directio`` mount of the probe reads its file right (the file's data sits
    at offset 512 of the device: a direct read there needs 512-byte alignment)."""
    try:
        mount_image(layer.image, layer.device, mnt, direct_io=True)
    except MountError:
        return False  # a kernel without the option refuses it
    try:
        return (mnt / "probe").read_bytes() == layer.data
    except OSError:
        return False
    finally:
        unmount(mnt)
