"""A push-style tar parser: feed it the uncompressed stream in any slicing, get members out.

It never buffers file data (only 512-byte headers and PAX/GNU long-name payloads, which are
capped), so the builder's memory is bounded by the number of entries, not by the layer size.
File data goes to a digester as it passes (sha256 per verification chunk, see digests.py).
Formats: v7, ustar, GNU (long names/links, base-256 numbers) and PAX (local and global headers,
nanosecond mtime, ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``). Sparse and multi-volume
members are refused: serving them byte-for-byte from the stream would give a silently wrong
file.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from snapshotter.index import _native
from snapshotter.index.digests import Digester, Digests
from snapshotter.index.model import EntryType, IndexBuildOptions, LayerFormatError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
# name, mode, uid, gid, size, mtime, checksum, type, linkname, magic, (version, uname, gname
# skipped), devmajor, devminor, prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s66x8s8s155s12x")

_TYPES = {
    b"0": EntryType.FILE,
    b"\0": EntryType.FILE,
    b"7": EntryType.FILE,
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"D": EntryType.DIR,  # GNU dumpdir: a directory whose data lists its contents
    b"6": EntryType.FIFO,
}
_REFUSED = {
    b"S": "GNU sparse file",
    b"M": "multi-volume continuation",
    b"N": "old GNU long-name record",
}


@dataclass(slots=True)
class Member:
    """One complete tar member, with its path already normalised."""

    path: str
    raw_path: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: Mapping[str, bytes]
    uoff: int
    #: the sha256 of each verification chunk, concatenated (32 bytes each): one bytes object
    #: per file, not a list of them (a list and its slots cost ~90 bytes an entry)
    digests: bytes = b""


def normalise(raw: str, what: str = "layer entry") -> str:
    """``./a//b/`` -> ``a/b``; refuse absolute paths and paths that climb out of the root."""
    body = raw[2:] if raw.startswith("./") else raw
    if "/." not in body and "//" not in body and not body.startswith(("/", ".")):
        return body[:-1] if body.endswith("/") else body  # the common, already clean case
    if raw.startswith("/"):
        raise LayerFormatError(f"{what} {raw!r}: absolute path")
    parts: list[str] = []
    for comp in raw.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise LayerFormatError(f"{what} {raw!r}: path escapes the layer root")
            parts.pop()
        else:
            parts.append(comp)
    return "/".join(parts)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(block: bytes, start: int, length: int) -> bytes:
    raw = block[start : start + length]
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def _num(raw: bytes, what: str, where: int) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (high bit set)."""
    if raw[0] & 0x80:  # GNU base-256; 0xff marks a negative number
        value = int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:
            return value - (1 << (8 * (len(raw) - 1)))
        return value + ((raw[0] & 0x7F) << (8 * (len(raw) - 1)))
    try:
        return int(raw.rstrip(b"\0 ") or b"0", 8)  # int() itself skips leading spaces
    except ValueError:
        pass
    text = raw.split(b"\0", 1)[0].strip(b" ")  # some writers leave junk after a NUL
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise LayerFormatError(
            f"tar header at offset {where}: bad {what} field {raw!r}"
        ) from None


def _number(block: bytes, start: int, length: int, what: str, where: int) -> int:
    return _num(block[start : start + length], what, where)


def _signed_sum(block: bytes) -> int:
    """The header checksum as some old writers computed it, with signed chars."""
    return sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256


def _pax_time_ns(value: str, where: int) -> int:
    neg = value.startswith("-")
    body = value[1:] if neg else value
    whole, _, frac = body.partition(".")
    try:
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        raise LayerFormatError(f"PAX header at offset {where}: bad mtime {value!r}") from None
    return -ns if neg else ns


_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})
_MODES: dict[int, int] = {}


def _shared_mode(mode: int) -> int:
    """One int object per mode value (there are 4096), shared by every member with it: a
    layer's entries have a handful of modes, and an int each cost 32 bytes an entry."""
    return _MODES.setdefault(mode, mode)


#: typeflag byte -> EntryType for the headers the native scan takes (not GNU dumpdirs: their
#: data must be skipped, which only the general path does)
_PLAIN_TYPES = tuple(
    _TYPES.get(bytes([b])) if bytes([b]) != b"D" else None for b in range(256)
)
_FILE = EntryType.FILE  # a module global: cheaper than the enum attribute in the hot loop


def parse_pax(data: bytes, where: int) -> dict[str, bytes]:
    """Parse ``"<len> <key>=<value>\\n"`` records; values stay bytes (xattrs are binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding some writers leave
            break
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1] != 0x0A:
            raise LayerFormatError(f"PAX header at offset {where}: malformed record at byte {pos}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise LayerFormatError(f"PAX header at offset {where}: record without '='")
        out[_text(key)] = value
        pos = end
    return out


class TarScanner:
    """Feed the uncompressed tar stream with ``feed``; completed members go to ``on_member``.

    ``on_large_file(uoff, size)`` fires as soon as the header of a regular file of at least
    ``large_file_size`` bytes is parsed, before its data, so the builder can place a checkpoint
    near its start. ``files`` and ``file_chunks`` count the regular files and their digests so
    far (the builder's index-size estimate). Regular files' data goes to ``digester`` (by
    default hashed at once, in the calling thread); a member may reach ``on_member`` before its
    digests are in place.
    """

    def __init__(
        self,
        options: IndexBuildOptions,
        on_member: Callable[[Member], None],
        on_large_file: Callable[[int, int], None] | None = None,
        digester: Digester | None = None,
    ) -> None:
        self._opts = options
        self._on_member = on_member
        self._on_large_file = on_large_file
        self.files = 0
        self.file_chunks = 0
        self._digester = digester if digester is not None else Digests(options.chunk_size)
        self.pos = 0  # uncompressed offset of the next byte fed
        self._hdr = bytearray()
        self._state = "header"
        self._remaining = 0  # data bytes left in the current member
        self._pad = 0  # padding bytes left after it
        self._member: Member | None = None
        self._collect: bytearray | None = None
        self._collect_kind = b""
        self._collect_at = 0
        self._pax_global: dict[str, bytes] = {}
        self._pax_local: dict[str, bytes] = {}
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._hashing = False  # the current member's data goes to the digester

    # -- feeding -----------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        n = len(view)
        i = 0
        while i < n:
            if self._state == "header":
                if not self._hdr and n - i >= BLOCK:  # whole headers in this piece: no copy
                    i = self._members(view, i, n)
                    continue
                take = min(BLOCK - len(self._hdr), n - i)
                self._hdr += view[i : i + take]
                i += take
                self.pos += take
                if len(self._hdr) == BLOCK:
                    self._header(bytes(self._hdr), self.pos - BLOCK)
                    self._hdr.clear()
            elif self._state == "data":
                take = min(self._remaining, n - i)
                self._data(view[i : i + take])
                i += take
                self.pos += take
                self._remaining -= take
                if not self._remaining:
                    self._end_data()
                    pad = self._pad
                    if pad and pad <= n - i and self._state == "pad":  # skip padding inline
                        i += pad
                        self.pos += pad
                        self._pad = 0
                        self._state = "header"
            elif self._state == "pad":
                take = min(self._pad, n - i)
                i += take
                self.pos += take
                self._pad -= take
                if not self._pad:
                    self._state = "header"
            else:  # "end": everything after the end-of-archive marker is ignored
                self.pos += n - i
                i = n

    def _members(self, view: memoryview, i: int, n: int) -> int:
        """Consume whole members of ``view`` from ``i`` on, as long as headers are complete in
        it; returns where it stopped (``self.pos`` follows).

        Runs of plain ustar/GNU members (no PAX or long-name record before them, data and
        padding inside this piece) are read by the native ``scan_members`` and dispatched
        here with no state machine steps: the file's data handed to the digester in one call,
        padding skipped. The first header it leaves (PAX, long names, zero blocks, odd
        numbers, bad checksums, data crossing the piece end) goes through ``_header`` and the
        state machine, the general path.
        """
        base = self.pos - i
        on_member = self._on_member
        file_header = self._file_header
        digest_whole = self._digester.whole
        while n - i >= BLOCK and self._state == "header":
            if not (self._pax_local or self._pax_global or self._long_name is not None
                    or self._long_link is not None):
                run, i = _native.scan_members(view, i, base, Member, _PLAIN_TYPES, normalise,
                                              _NO_XATTRS)
                for member in run:
                    if member.type is _FILE:
                        file_header(member)
                        if member.size:
                            start = member.uoff - base
                            digest_whole(member, view[start : start + member.size])
                    on_member(member)
                if n - i < BLOCK:
                    break
            where = base + i
            i += BLOCK
            self.pos = base + i
            self._header(bytes(view[i - BLOCK : i]), where)
        self.pos = base + i
        return i

    def finish(self) -> None:
        """Check the stream ended on a member boundary."""
        if self._state == "end":
            return
        pending = self._pax_local or self._long_name is not None or self._long_link is not None
        if self._state == "header" and not self._hdr and not pending:
            return
        what = self._member.raw_path if self._member else f"tar header at offset {self.pos}"
        raise LayerFormatError(f"layer is truncated: {what!r} is cut off at offset {self.pos}")

    # -- headers -----------------------------------------------------------------------------

    def _header(self, block: bytes, where: int) -> None:
        if block == _ZERO_BLOCK:
            self._state = "end"
            return
        try:
            stored = _num(block[148:156], "checksum", where)
        except LayerFormatError:
            stored = -1
        if stored != sum(block[:148]) + 256 + sum(block[156:]) and stored != _signed_sum(block):
            raise LayerFormatError(f"tar header at offset {where}: checksum mismatch (not a tar?)")
        kind = block[156:157]
        size = _number(block, 124, 12, "size", where)
        if kind in (b"x", b"g", b"L", b"K"):
            self._start_collect(kind, size, where)
            return
        if kind in _REFUSED or kind == b"V":
            if kind == b"V":  # a volume label carries no file; skip it
                self._skip(size)
                return
            name = _text(_cstr(block, 0, 100))
            raise LayerFormatError(f"layer entry {name!r}: unsupported {_REFUSED[kind]}")
        self._member_header(block, kind, size, where)

    def _member_header(self, block: bytes, kind: bytes, size: int, where: int) -> None:
        pax = {**self._pax_global, **self._pax_local} if self._pax_local else self._pax_global
        self._pax_local = {}
        (name_b, mode_b, uid_b, gid_b, _size, mtime_b, _sum, _kind, link_b, magic, major_b,
         minor_b, prefix) = _HEADER.unpack_from(block)
        name_b = name_b.split(b"\0", 1)[0]
        if magic == b"ustar\0" and prefix[0]:
            name_b = prefix.split(b"\0", 1)[0] + b"/" + name_b
        if self._long_name is not None:
            name_b = self._long_name
        link_b = self._long_link if self._long_link is not None else link_b.split(b"\0", 1)[0]
        self._long_name = self._long_link = None
        raw_path = _text(pax["path"]) if "path" in pax else _text(name_b)
        etype = _TYPES.get(kind)
        if etype is None:
            raise LayerFormatError(
                f"layer entry {raw_path!r}: unsupported tar entry type {kind!r}"
            )
        if etype is EntryType.FILE and raw_path.endswith("/"):
            etype = EntryType.DIR  # pre-POSIX writers mark directories with a trailing slash
        member = Member(
            path=normalise(raw_path),
            raw_path=raw_path,
            type=etype,
            mode=_shared_mode(_num(mode_b, "mode", where) & 0o7777),
            uid=_num(uid_b, "uid", where),
            gid=_num(gid_b, "gid", where),
            size=size,
            mtime_ns=_num(mtime_b, "mtime", where) * 1_000_000_000,
            linkname=_text(link_b),
            devmajor=0,
            devminor=0,
            xattrs=_NO_XATTRS,
            uoff=where + BLOCK,
        )
        if etype is EntryType.CHAR or etype is EntryType.BLOCK:
            member.devmajor = _num(major_b, "devmajor", where)
            member.devminor = _num(minor_b, "devminor", where)
        if pax:
            self._apply_pax(member, pax, where)
        if member.size < 0:
            raise LayerFormatError(f"layer entry {raw_path!r}: negative size")
        data_size = member.size
        if etype is not EntryType.FILE:
            member.size = 0
            if kind != b"D":
                data_size = 0
        self._member = member
        if etype is EntryType.FILE:
            self._file_header(member)
            self._hashing = True
        self._begin_data(data_size)

    def _file_header(self, member: Member) -> None:
        """Count a regular file and its digests, and announce it when it is large: both paths
        call this as soon as the header is read, before the file's data."""
        size, chunk = member.size, self._opts.chunk_size
        self.files += 1
        self.file_chunks += (size + chunk - 1) // chunk or 1
        if size >= self._opts.large_file_size and self._on_large_file is not None:
            self._on_large_file(member.uoff, size)

    def _apply_pax(self, member: Member, pax: dict[str, bytes], where: int) -> None:
        if any(k.startswith("GNU.sparse.") for k in pax):
            raise LayerFormatError(
                f"layer entry {member.raw_path!r}: unsupported GNU sparse file"
            )
        for key, attr in (("uid", "uid"), ("gid", "gid"), ("size", "size"),
                          ("SCHILY.devmajor", "devmajor"), ("SCHILY.devminor", "devminor")):
            if key in pax:
                setattr(member, attr, self._pax_int(pax, key))
        if "mtime" in pax:
            member.mtime_ns = _pax_time_ns(_text(pax["mtime"]), where)
        if "linkpath" in pax:
            member.linkname = _text(pax["linkpath"])
        member.xattrs = self._xattrs(pax, member.raw_path)

    @staticmethod
    def _pax_int(pax: dict[str, bytes], key: str) -> int:
        try:
            return int(pax[key])
        except ValueError:
            raise LayerFormatError(f"PAX header: bad {key} value {pax[key]!r}") from None

    @staticmethod
    def _xattrs(pax: dict[str, bytes], raw_path: str) -> Mapping[str, bytes]:
        """The member's xattrs; the one shared empty mapping when it has none (a dict per
        member cost 2.7 MB building a 44,000-entry PAX layer)."""
        out: dict[str, bytes] = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                out[key[len("SCHILY.xattr.") :]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                try:
                    name = base64.b64decode(key[len("LIBARCHIVE.xattr.") :], altchars=b"-_")
                    out[_text(name)] = base64.b64decode(value)
                except (binascii.Error, ValueError):
                    raise LayerFormatError(
                        f"layer entry {raw_path!r}: bad LIBARCHIVE.xattr record {key!r}"
                    ) from None
        return out or _NO_XATTRS

    # -- member data -------------------------------------------------------------------------

    def _start_collect(self, kind: bytes, size: int, where: int) -> None:
        if size > self._opts.max_pax_size:
            what = "PAX header" if kind in (b"x", b"g") else "GNU long name"
            raise LayerFormatError(
                f"{what} at offset {where} is {size} bytes "
                f"(limit {self._opts.max_pax_size}): refusing the layer"
            )
        self._collect = bytearray()
        self._collect_kind = kind
        self._collect_at = where
        self._begin_data(size)

    def _skip(self, size: int) -> None:
        self._begin_data(size)

    def _begin_data(self, size: int) -> None:
        self._remaining = size
        self._pad = -size % BLOCK
        if size:
            self._state = "data"
        else:
            self._end_data()

    def _data(self, chunk: memoryview) -> None:
        if self._collect is not None:
            self._collect += chunk
        elif self._hashing:
            assert self._member is not None
            self._digester.part(self._member, chunk)

    def _end_data(self) -> None:
        self._state = "pad" if self._pad else "header"
        if self._collect is not None:
            self._finish_collect(bytes(self._collect))
            self._collect = None
            return
        member = self._member
        if member is None:
            return
        if self._hashing:
            self._digester.end(member)
            self._hashing = False
        self._member = None
        self._on_member(member)

    def _finish_collect(self, data: bytes) -> None:
        kind = self._collect_kind
        if kind == b"x":
            self._pax_local = parse_pax(data, self._collect_at)
        elif kind == b"g":
            self._pax_global.update(parse_pax(data, self._collect_at))
        elif kind == b"L":
            self._long_name = data.split(b"\0", 1)[0]
        else:
            self._long_link = data.split(b"\0", 1)[0]
