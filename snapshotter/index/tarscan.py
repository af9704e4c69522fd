"""A push-style tar parser: feed it the uncompressed stream in any slicing, get members out.

It never buffers file data (only 512-byte headers and PAX/GNU long-name payloads, which are
capped), so the builder's memory is bounded by the number of entries, not by the layer size.
File data is hashed as it passes (sha256 per verification chunk). Formats: v7, ustar, GNU (long
names/links, base-256 numbers) and PAX (local and global headers, nanosecond mtime,
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``). Sparse and multi-volume members are refused:
serving them byte-for-byte from the stream would give a silently wrong file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
    digests: list[bytes] = field(default_factory=list)


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


_FAST_TYPES = {k: v for k, v in _TYPES.items() if k != b"D"}
_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})
# enum members as module globals: ``EntryType.FILE`` is a class attribute lookup (~80 ns more)
# and the fast path tests types several times per member
_FILE, _SYMLINK, _HARDLINK, _CHAR, _BLOCK = (
    EntryType.FILE, EntryType.SYMLINK, EntryType.HARDLINK, EntryType.CHAR, EntryType.BLOCK)


def _plain_member(view: memoryview, i: int, where: int) -> Member | None:
    """The member of a plain ustar/GNU header at ``view[i:i+512]``, or None when anything about
    it needs the general path (which then also produces the right error).

    Same results as ``TarScanner._header`` for the headers it accepts; the checksum is summed
    with ``zlib.adler32`` (its low half is 1 + the byte sum, exact for 256 bytes or fewer)
    instead of a Python loop over 512 bytes.
    """
    (name_b, mode_b, uid_b, gid_b, size_b, mtime_b, chk_b, kind, link_b, magic, major_b,
     minor_b, prefix) = _HEADER.unpack_from(view, i)
    etype = _FAST_TYPES.get(kind)
    if etype is None or not name_b[0]:
        return None
    try:
        stored = int(chk_b.rstrip(b"\0 "), 8)
        mode = int(mode_b.rstrip(b"\0 "), 8)
        uid = int(uid_b.rstrip(b"\0 "), 8)
        gid = int(gid_b.rstrip(b"\0 "), 8)
        size = int(size_b.rstrip(b"\0 "), 8)
        mtime = int(mtime_b.rstrip(b"\0 "), 8)
        major = minor = 0
        if etype is _CHAR or etype is _BLOCK:
            major = int(major_b.rstrip(b"\0 "), 8)
            minor = int(minor_b.rstrip(b"\0 "), 8)
    except ValueError:
        return None
    summed = ((zlib.adler32(view[i : i + 256]) & 0xFFFF)
              + (zlib.adler32(view[i + 256 : i + BLOCK]) & 0xFFFF) + 254 - sum(chk_b))
    if stored != summed or size < 0:
        return None
    name_b = name_b.split(b"\0", 1)[0]
    if magic == b"ustar\0" and prefix[0]:
        name_b = prefix.split(b"\0", 1)[0] + b"/" + name_b
    raw_path = name_b.decode("utf-8", "surrogateescape")
    linkname = ""
    if etype is _FILE:
        if raw_path.endswith("/"):
            return None  # a pre-POSIX directory
    else:
        size = 0
        if etype is _SYMLINK or etype is _HARDLINK:
            linkname = link_b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return Member(normalise(raw_path), raw_path, etype, mode & 0o7777, uid, gid, size,
                  mtime * 1_000_000_000, linkname, major, minor, _NO_XATTRS, where + BLOCK)


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

    ``on_file_start(uoff, size)`` fires as soon as a regular file's header is parsed, before its
    data, so the builder can place a checkpoint near the start of large files.
    """

    def __init__(
        self,
        options: IndexBuildOptions,
        on_member: Callable[[Member], None],
        on_file_start: Callable[[int, int], None] | None = None,
    ) -> None:
        self._opts = options
        self._on_member = on_member
        self.on_file_start = on_file_start
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
        self._hash: Any = None
        self._chunk_left = 0

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

        The common member (a plain ustar/GNU header, no PAX or long-name record before it,
        its data inside this piece) is handled here in one pass: the header is read in place,
        the file hashed with one call per verification chunk, padding skipped, with no state
        machine steps. Everything else (PAX, long names, zero blocks, odd numbers, bad
        checksums, data crossing the piece end) goes through ``_header`` and the state
        machine, the general path.
        """
        base = self.pos - i
        chunk = self._opts.chunk_size
        on_member = self._on_member
        on_file_start = self.on_file_start
        sha256 = hashlib.sha256
        while n - i >= BLOCK and self._state == "header":
            where = base + i
            member = None
            if not (self._pax_local or self._pax_global or self._long_name is not None
                    or self._long_link is not None):
                member = _plain_member(view, i, where)
            i += BLOCK
            if member is None:
                self.pos = base + i
                self._header(bytes(view[i - BLOCK : i]), where)
                continue
            if member.type is not _FILE:
                on_member(member)
                continue
            size = member.size
            if on_file_start is not None:
                on_file_start(i + base, size)
            end = i + size
            if end > n:  # the data continues in the next piece: the general path
                self.pos = base + i
                self._member = member
                self._hash = sha256()
                self._chunk_left = chunk
                self._begin_data(size)
                return i
            if size <= chunk:
                if size:
                    member.digests.append(sha256(view[i:end]).digest())
            else:
                member.digests = [
                    sha256(view[p : min(p + chunk, end)]).digest() for p in range(i, end, chunk)
                ]
            on_member(member)
            i = end + (-size % BLOCK)
            if i > n:  # the padding crosses the piece end
                self._pad = i - n
                self._state = "pad"
                i = n
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
            mode=_num(mode_b, "mode", where) & 0o7777,
            uid=_num(uid_b, "uid", where),
            gid=_num(gid_b, "gid", where),
            size=size,
            mtime_ns=_num(mtime_b, "mtime", where) * 1_000_000_000,
            linkname=_text(link_b),
            devmajor=0,
            devminor=0,
            xattrs={},
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
            if self.on_file_start is not None:
                self.on_file_start(member.uoff, member.size)
            self._hash = hashlib.sha256()
            self._chunk_left = self._opts.chunk_size
        self._begin_data(data_size)

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
    def _xattrs(pax: dict[str, bytes], raw_path: str) -> dict[str, bytes]:
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
        return out

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
            return
        if self._hash is None:
            return
        if len(chunk) < self._chunk_left:  # the common case: no chunk boundary inside
            self._hash.update(chunk)
            self._chunk_left -= len(chunk)
            return
        while len(chunk):
            take = min(self._chunk_left, len(chunk))
            self._hash.update(chunk[:take])
            chunk = chunk[take:]
            self._chunk_left -= take
            if not self._chunk_left:
                assert self._member is not None
                self._member.digests.append(self._hash.digest())
                self._hash = hashlib.sha256()
                self._chunk_left = self._opts.chunk_size

    def _end_data(self) -> None:
        self._state = "pad" if self._pad else "header"
        if self._collect is not None:
            self._finish_collect(bytes(self._collect))
            self._collect = None
            return
        member = self._member
        if member is None:
            return
        if self._hash is not None and self._chunk_left != self._opts.chunk_size:
            member.digests.append(self._hash.digest())
        self._hash = None
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
