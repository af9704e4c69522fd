"""The subset of the kernel's FUSE wire protocol the blob server speaks, and the mount call.

Written from the kernel's `include/uapi/linux/fuse.h` (protocol 7.44) and
Documentation/filesystems/fuse.rst: every message read from `/dev/fuse` starts with a
`fuse_in_header`, every reply written to it with a `fuse_out_header` whose `unique` echoes the
request's; an out header with `unique == 0` is a notification whose `error` field is the
notification code. All integers are native-endian; this module assumes little-endian x86-64/arm64
like the rest of clip. libfuse is not used because it cannot resume a session it did not INIT
(see docs/restarts.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

KERNEL_MAJOR = 7
# The highest minor whose structures this module knows (fuse_init_out with request_timeout).
KERNEL_MINOR = 44
ROOT_ID = 1

# --- opcodes (enum fuse_opcode) ---------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
RENAME2 = 45
COPY_FILE_RANGE = 47
TMPFILE = 51

# Requests that would modify the tree: answered EROFS (the kernel refuses most of them itself on
# a read-only mount, this keeps the answer right if one gets through).
WRITE_OPS = frozenset(
    {SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR, REMOVEXATTR,
     CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE}
)

# --- notification codes (enum fuse_notify_code) -----------------------------------------------
NOTIFY_INVAL_ENTRY = 3
NOTIFY_RESEND = 7

# --- INIT flags (64 bits: `flags` is the low word, `flags2` the high word with FUSE_INIT_EXT) ---
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
HAS_RESEND = 1 << 39

# Set in `unique` of a request the kernel re-queued after FUSE_NOTIFY_RESEND.
UNIQUE_RESEND = 1 << 63

# --- OPEN reply flags --------------------------------------------------------------------------
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5  # 7.35: no FLUSH on close (a close never waits for the server)

# --- struct layouts ----------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
INIT_IN_FLAGS2 = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev
# blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec x2)
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
ACCESS_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
# blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8 bytes
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags, then name and NUL

# Smallest buffer the kernel accepts for a read of /dev/fuse (FUSE_MIN_READ_BUFFER).
MIN_READ_BUFFER = 8192


@dataclass(frozen=True)
class Request:
    """One message read from /dev/fuse: its header fields and the bytes after the header."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview


def parse_request(buf: bytes) -> Request:
    """Split a message read from /dev/fuse into header fields and body (one read = one message)."""
    if len(buf) < IN_HEADER.size:
        raise ValueError(f"fuse: short request of {len(buf)} bytes")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
    if length != len(buf):
        raise ValueError(f"fuse: request says {length} bytes, read {len(buf)}")
    return Request(opcode, unique, nodeid, uid, gid, pid, memoryview(buf)[IN_HEADER.size :])


def reply_header(unique: int, error: int, payload: int) -> bytes:
    """Out header for a reply of `payload` bytes; `error` is 0 or a positive errno."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload, -error, unique)


def notify_header(code: int, payload: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + payload, code, 0)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One fuse_dirent record, padded to 8 bytes; `off` is the cookie of the next entry."""
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + bytes(-len(rec) % 8)


@dataclass(frozen=True)
class InitParams:
    """What INIT settled, kept by the holder so a new server knows the session without INIT."""

    minor: int
    kernel_flags: int  # what the kernel offered (FUSE_HAS_RESEND lives here)
    flags: int  # what we answered
    max_readahead: int
    max_write: int
    max_pages: int
    max_background: int
    congestion_threshold: int

    @property
    def can_resend(self) -> bool:
        return bool(self.kernel_flags & HAS_RESEND)

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, int]) -> InitParams:
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})


# Our INIT answer: reads arrive async (several in flight per file) and up to max_pages pages
# each; lookups and readdirs may run in parallel. No writeback, no readdirplus, no passthrough,
# no export support, no request timeout (a timeout would abort the connection while a restarted
# daemon is on its way).
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | PARALLEL_DIROPS | MAX_PAGES
MAX_PAGES_WANTED = 256  # 1 MiB with 4 KiB pages: the kernel caps this at fs.fuse.max_pages_limit
MAX_WRITE = 4096  # nothing is ever written; the smallest value keeps the read buffer small
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48


def negotiate(body: memoryview) -> tuple[InitParams, bytes]:
    """Our INIT reply to the kernel's fuse_init_in: (settled parameters, reply payload)."""
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
    if major != KERNEL_MAJOR:
        raise ValueError(f"fuse: kernel speaks protocol {major}.{minor}, need 7.x")
    if flags & INIT_EXT and len(body) >= INIT_IN.size + INIT_IN_FLAGS2.size:
        flags |= INIT_IN_FLAGS2.unpack_from(body, INIT_IN.size)[0] << 32
    settled = InitParams(
        minor=min(minor, KERNEL_MINOR),
        kernel_flags=flags,
        flags=WANTED_FLAGS & flags,
        max_readahead=max_readahead,
        max_write=MAX_WRITE,
        max_pages=MAX_PAGES_WANTED,
        max_background=MAX_BACKGROUND,
        congestion_threshold=CONGESTION_THRESHOLD,
    )
    payload = INIT_OUT.pack(
        KERNEL_MAJOR, settled.minor, settled.max_readahead, settled.flags & 0xFFFFFFFF,
        settled.max_background, settled.congestion_threshold, settled.max_write, 1,
        settled.max_pages, 0, settled.flags >> 32, 0, 0,
    )
    return settled, payload


def read_buffer_size(params: InitParams | None) -> int:
    """Size of each read of /dev/fuse: the kernel refuses reads smaller than header + max_write."""
    write = params.max_write if params is not None else MAX_WRITE
    return max(MIN_READ_BUFFER, IN_HEADER.size + READ_IN.size + write) * 8


# --- mounting ----------------------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
FSTYPE = "fuse.clip"
SOURCE = "clip"


def mount(fd: int, mountpoint: Path) -> None:
    """mount(2) a FUSE file system served on `fd` at `mountpoint`, read-only, for every user."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    rc = libc.mount(
        SOURCE.encode(), os.fsencode(mountpoint), FSTYPE.encode(),
        ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV), data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(mountpoint))


def connection_of_fd(fd: int) -> int | None:
    """The FUSE connection id (the superblock's device number) an open /dev/fuse fd serves."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "fuse_connection":
                kdev = int(value.strip())  # the kernel's dev_t: major << 20 | minor
                return os.makedev(kdev >> 20, kdev & 0xFFFFF)
    return None


def device_of_mount(mountpoint: Path) -> tuple[str, int] | None:
    """(fstype, device number) of the topmost mount at `mountpoint`, from mountinfo.

    Read from the mount table rather than stat(2): a stat of a FUSE root whose server is not
    answering yet would wait for that server.
    """
    target = os.fspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != target:
                continue
            major, minor = (int(x) for x in fields[2].split(":"))
            fstype = fields[fields.index("-") + 1]
            found = (fstype, os.makedev(major, minor))
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_readahead(dev: int, kib: int) -> None:
    """Raise the connection's readahead window so large sequential reads become large requests.

    The kernel only ever lowers readahead from INIT's answer (it starts at the 128 KiB default),
    so a bigger window is set on the connection's backing device in sysfs.
    """
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    path.write_text(f"{kib}\n", encoding="ascii")
