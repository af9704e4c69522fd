"""EROFS on-disk constants and record layouts clip's writer uses (see docs/erofs.md).

Every value here is a fact of the on-disk format as the kernel documents it
(Documentation/filesystems/erofs.rst, fs/erofs/erofs_fs.h); the choices clip makes among them
(block size, which inode layouts, where things go) are in writer.py.
"""

from __future__ import annotations

import struct
from typing import Final

MAGIC: Final = 0xE0F5E1E2
SUPER_OFFSET: Final = 1024
SUPER_SIZE: Final = 128
DEVT_SLOT_SIZE: Final = 128

BLKSZBITS: Final = 9
BLOCK: Final = 1 << BLKSZBITS

COMPAT_SB_CHKSUM: Final = 0x1
INCOMPAT_DEVICE_TABLE: Final = 0x8

# i_format: bit 0 = extended (64-byte) inode, bits 1-3 = data layout.
LAYOUT_FLAT_PLAIN: Final = 0
LAYOUT_FLAT_INLINE: Final = 2

NAME_LEN: Final = 255
NULL_ADDR: Final = 0xFFFFFFFF

# Directory entry file types (the generic FT_* values).
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7

# xattr name indexes: a name is stored as (index, suffix).
XATTR_PREFIXES: Final = (
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
)
XATTR_WHOLE_NAMES: Final = {
    b"system.posix_acl_access": 2,
    b"system.posix_acl_default": 3,
}
XATTR_NAMES_BY_INDEX: Final = {
    1: b"user.", 2: b"system.posix_acl_access", 3: b"system.posix_acl_default",
    4: b"trusted.", 6: b"security.",
}

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time (called
# epoch since kernel 6.15: the base of compact inodes' i_mtime), build_time_nsec (fixed_nsec:
# every compact inode's nanoseconds), blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name,
# feature_incompat, available_compr_algs, extra_devices, devt_slotoff, dirblkbits,
# xattr_prefix_count, xattr_prefix_start, packed_nid, reserved.
SUPER: Final = struct.Struct("<IIIBBHQqIIII16s16sIHHHBBIQ24x")
# tag, blocks, mapped_blkaddr (uniaddr since 6.15: where the device's blocks begin in the
# unified block address space; 0 = addressed by chunk indexes only), reserved
DEVICE_SLOT: Final = struct.Struct("<64sII56x")
# i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime, i_u, i_ino, i_uid, i_gid.
# i_mtime was i_reserved before kernel 6.15; 6.15+ present epoch + i_mtime seconds with
# fixed_nsec, older kernels the superblock's build_time whatever the field holds.
COMPACT_INODE: Final = struct.Struct("<HHHHIIIIHH4x")
# i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u, i_ino, i_uid, i_gid, i_mtime,
# i_mtime_nsec, i_nlink
EXTENDED_INODE: Final = struct.Struct("<HHHHQIIIIqII16x")
# h_name_filter, h_shared_count
XATTR_IBODY_HEADER: Final = struct.Struct("<IB7x")
# e_name_len, e_name_index, e_value_size
XATTR_ENTRY: Final = struct.Struct("<BBH")
# nid, nameoff, file_type, reserved
DIRENT: Final = struct.Struct("<QHBx")

assert SUPER.size == SUPER_SIZE
assert DEVICE_SLOT.size == DEVT_SLOT_SIZE
assert COMPACT_INODE.size == 32
assert EXTENDED_INODE.size == 64
assert XATTR_IBODY_HEADER.size == 12
assert DIRENT.size == 12


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c_raw(seed: int, data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected) from ``seed`` without the final inversion: the kernel's
    ``crc32c(~0, data, len)``, which is what the superblock checksum stores. Only ever run over
    one 512-byte block, so a table loop is fast enough."""
    crc = seed
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


def encode_rdev(major: int, minor: int) -> int:
    """The kernel's "new" 32-bit device encoding (12-bit major, 20-bit minor)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(value: int) -> tuple[int, int]:
    return (value & 0xFFF00) >> 8, (value & 0xFF) | ((value >> 12) & 0xFFF00)
