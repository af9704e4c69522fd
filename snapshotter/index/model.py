"""The value types of the clip index: entries, checkpoints, build options and results.

These are the names the FUSE layer and the read path code against (see
docs/index-format.md); they carry no behaviour beyond validation.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from snapshotter.errors import InvalidArgument


class IndexFormatError(InvalidArgument):
    """An index file is corrupt, truncated or of a version this code does not read."""


class LayerFormatError(InvalidArgument):
    """A layer blob is not a valid (gzip/zstd/plain) tar, or holds an entry clip refuses."""


class EntryType(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2
    HARDLINK = 3
    CHAR = 4
    BLOCK = 5
    FIFO = 6


@dataclass(frozen=True, slots=True)
class Entry:
    """One tar entry as the filesystem layer needs it (see the field notes in the contract)."""

    ordinal: int
    path: str
    name: str
    parent: int
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    link_target: int
    nlink: int
    devmajor: int
    devminor: int
    xattrs: Mapping[str, bytes]
    uoff: int


# Entry's frozen __init__ sets each of its 17 fields with object.__setattr__ (about 1.8 us per
# entry, two thirds of decoding one). The reader decodes entries for every getattr and readdir,
# so it builds them with ``make_entry``, which stores into the slots through their descriptors
# directly: the same object (eq, hash, repr, pickling are the dataclass's), about 0.8 us.
_FIELDS = ("ordinal", "path", "name", "parent", "type", "mode", "uid", "gid", "size",
           "mtime_ns", "linkname", "link_target", "nlink", "devmajor", "devminor", "xattrs",
           "uoff")
assert tuple(Entry.__dataclass_fields__) == _FIELDS
(_s_ordinal, _s_path, _s_name, _s_parent, _s_type, _s_mode, _s_uid, _s_gid, _s_size,
 _s_mtime_ns, _s_linkname, _s_link_target, _s_nlink, _s_devmajor, _s_devminor, _s_xattrs,
 _s_uoff) = (Entry.__dict__[name].__set__ for name in _FIELDS)
_new = object.__new__


def make_entry(
    ordinal: int, path: str, name: str, parent: int, etype: EntryType, mode: int, uid: int,
    gid: int, size: int, mtime_ns: int, linkname: str, link_target: int, nlink: int,
    devmajor: int, devminor: int, xattrs: Mapping[str, bytes], uoff: int,
) -> Entry:
    """``Entry(...)`` with positional fields, without the frozen ``__init__``'s overhead."""
    e: Entry = _new(Entry)
    _s_ordinal(e, ordinal)
    _s_path(e, path)
    _s_name(e, name)
    _s_parent(e, parent)
    _s_type(e, etype)
    _s_mode(e, mode)
    _s_uid(e, uid)
    _s_gid(e, gid)
    _s_size(e, size)
    _s_mtime_ns(e, mtime_ns)
    _s_linkname(e, linkname)
    _s_link_target(e, link_target)
    _s_nlink(e, nlink)
    _s_devmajor(e, devmajor)
    _s_devminor(e, devminor)
    _s_xattrs(e, xattrs)
    _s_uoff(e, uoff)
    return e


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A place where inflation can restart.

    For gzip: ``coff`` is the first compressed byte to read; when ``bits`` is non-zero the deflate
    block starts ``bits`` bits before the end of byte ``coff`` (those high bits are primed into
    the inflater and inflation continues at ``coff + 1``). For zstd ``coff`` is a frame start and
    ``bits`` is 0. ``uoff`` is the uncompressed offset produced from there; the window (the 32 KiB
    of output before ``uoff``) is fetched with ``LayerIndex.window(checkpoint)``.
    """

    number: int
    coff: int
    bits: int
    uoff: int


@dataclass(frozen=True, slots=True)
class IndexBuildOptions:
    """Tunables of a build; all of them are recorded in (or implied by) the index bytes.

    checkpoint_spacing: compressed bytes between gzip checkpoints (a random read costs at most
        this much compressed input plus the range).
    max_span: uncompressed bytes between gzip checkpoints, whatever the compressed distance, so
        that highly compressible data (a file of zeros) does not make one read inflate GBs.
    large_file_size: regular files at least this large also get a checkpoint at (the deflate
        block boundary just before) their first byte, so reading them does not pull in the
        previous file's tail.
    chunk_size: verification chunk for file digests; files up to this size get one whole-file
        digest.
    max_pax_size: PAX extended headers and GNU long names larger than this are refused (a
        hostile blob must not make the builder allocate without bound).
    min_checkpoint_spacing, window_share, index_share: the adaptive density rule
        (snapshotter/index/density.py): beyond the fixed spacing, a gzip block boundary at least
        ``min_checkpoint_spacing`` compressed bytes after the last checkpoint becomes one when
        its window's expected size is at most ``window_share`` of the uncompressed distance and
        the estimated index stays within ``index_share`` of the layer. ``window_share=0`` turns
        the rule off.
    """

    checkpoint_spacing: int = 2 << 20
    max_span: int = 8 << 20
    large_file_size: int = 4 << 20
    chunk_size: int = 1 << 20
    max_pax_size: int = 1 << 20
    min_checkpoint_spacing: int = 256 << 10
    window_share: float = 0.008
    index_share: float = 0.01

    def __post_init__(self) -> None:
        names = ("checkpoint_spacing", "max_span", "large_file_size", "chunk_size",
                 "max_pax_size", "min_checkpoint_spacing")
        for name in names:
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"index build option {name} must be positive")
        for name in ("window_share", "index_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidArgument(f"index build option {name} must be between 0 and 1")
        if self.chunk_size % 512:
            raise InvalidArgument("index build option chunk_size must be a multiple of 512")


@dataclass(frozen=True, slots=True)
class BuildResult:
    entries: int
    uncompressed_size: int
    compressed_size: int
    index_size: int
    checkpoints: int
    seconds: float
    blob_digest: str
    index_digest: str
    compression: str = field(default="none")
