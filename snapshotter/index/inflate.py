"""A ctypes binding to the inflate half of the zlib API, with the calls Python's zlib hides.

Restarting inflation in the middle of a gzip stream needs three things the stdlib ``zlib``
module does not expose: ``inflate(..., Z_BLOCK)`` plus the stream's ``data_type`` bits (to find
deflate block boundaries while building), ``inflatePrime`` (to feed the few bits of a block that
begins mid-byte) and ``inflateSetDictionary`` on a raw deflate stream (to restore the 32 KiB
window). We bind zlib-ng's native API (``zng_*``), which the ``zlib-ng`` wheel's extension module
exports, because it inflates markedly faster than classic zlib (numbers in docs/index-format.md);
the system's classic ``libz.so.1`` is the fallback. ``zng_stream`` and ``z_stream`` have the same
layout on LP64 up to ``data_type``; they only differ in the width of ``adler``, which we never
read, and ``zng_stream`` is never larger, so one struct definition with the larger layout serves
both.

Every call releases the GIL (ctypes does so for CDLL functions), so worker threads inflate in
parallel. The index build's loop over deflate blocks runs in C (``_native.c``, handed the
stream's and ``inflate``'s addresses), so a whole input buffer costs one GIL round trip, not one
per block.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import glob
import os
from typing import Any, Final

from snapshotter.index import _native

Z_OK: Final = 0
Z_STREAM_END: Final = 1
Z_BUF_ERROR: Final = -5
Z_NO_FLUSH: Final = 0
Z_BLOCK: Final = 5

#: ``windowBits`` for a raw deflate stream and for a gzip-wrapped one.
RAW: Final = -15
GZIP: Final = 31

WINDOW_SIZE: Final = 32768


class _Stream(ctypes.Structure):
    # Field types follow zlib.h / zlib-ng.h on LP64 (uLong and size_t are both 64-bit).
    _fields_ = (
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint32),
        ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint32),
        ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    )


class _Api:
    """The resolved inflate entry points of one library."""

    def __init__(self, lib: ctypes.CDLL, name: str, prefix: str, native: bool) -> None:
        self.name = name
        self.lib = lib
        sp = ctypes.POINTER(_Stream)
        if native:
            self._init2 = lib[prefix + "inflateInit2"]
            self._init2.argtypes = (sp, ctypes.c_int32)
        else:
            self._init2 = lib[prefix + "inflateInit2_"]
            self._init2.argtypes = (sp, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
            version = lib[prefix + "zlibVersion"]
            version.restype = ctypes.c_char_p
            self._version = version()
        self._native = native
        self.inflate = self._fn(lib, prefix + "inflate", (sp, ctypes.c_int))
        self.end = self._fn(lib, prefix + "inflateEnd", (sp,))
        self.reset2 = self._fn(lib, prefix + "inflateReset2", (sp, ctypes.c_int))
        self.prime = self._fn(lib, prefix + "inflatePrime", (sp, ctypes.c_int, ctypes.c_int))
        self.set_dictionary = self._fn(
            lib, prefix + "inflateSetDictionary", (sp, ctypes.c_void_p, ctypes.c_uint32)
        )

    @staticmethod
    def _fn(lib: ctypes.CDLL, name: str, argtypes: tuple[Any, ...]) -> Any:
        fn = lib[name]
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn

    def init2(self, stream: _Stream, window_bits: int) -> int:
        if self._native:
            return int(self._init2(ctypes.byref(stream), window_bits))
        return int(
            self._init2(
                ctypes.byref(stream), window_bits, self._version, ctypes.sizeof(_Stream)
            )
        )


def _load_zlib_ng() -> _Api | None:
    try:
        import zlib_ng.zlib_ng as ext
    except ImportError:
        return None
    path = getattr(ext, "__file__", None)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        return _Api(lib, "zlib-ng", "zng_", native=True)
    except (OSError, AttributeError):
        return None


def _load_system_zlib() -> _Api:
    candidates = [ctypes.util.find_library("z") or "", "libz.so.1"]
    candidates += glob.glob("/lib/*/libz.so.1") + glob.glob("/usr/lib/*/libz.so.1")
    for cand in candidates:
        if not cand:
            continue
        try:
            return _Api(ctypes.CDLL(cand), "zlib", "", native=False)
        except (OSError, AttributeError):
            continue
    raise ImportError("clip: neither zlib-ng nor the system libz could be loaded")


def _load() -> _Api:
    if os.environ.get("CLIP_INFLATE_ENGINE") == "zlib":
        return _load_system_zlib()
    return _load_zlib_ng() or _load_system_zlib()


API: Final = _load()
ENGINE: Final = API.name
_INFLATE_ADDRESS: Final = int(ctypes.cast(API.inflate, ctypes.c_void_p).value or 0)
#: int64 fields per block boundary that ``run_blocks`` records (as _native.c defines it)
BOUND_FIELDS: Final = _native.BOUND_FIELDS


def new_bounds(count: int) -> array.array[int]:
    """A ``bounds`` buffer for `Inflater.run_blocks` with room for `count` block boundaries."""
    return array.array("q", bytes(8 * BOUND_FIELDS * count))


class InflateError(Exception):
    """A zlib error; the message is zlib's own (e.g. 'invalid block type')."""


class Inflater:
    """One inflate stream with caller-owned input/output buffers.

    Input is copied into a private ctypes buffer (``feed``) so the caller's ``bytes`` need not
    stay alive; output lands in a reusable buffer that ``run`` returns a view of, made on the
    first ``run`` (an index build's decoder only uses ``run_blocks``, which writes into the
    caller's pieces).
    """

    def __init__(self, window_bits: int, out_size: int = 1 << 20) -> None:
        self._s = _Stream()
        self._ref = ctypes.byref(self._s)
        self._address = ctypes.addressof(self._s)
        rc = API.init2(self._s, window_bits)
        if rc != Z_OK:
            raise InflateError(f"inflateInit2 failed ({rc})")
        self._open = True
        self._in = ctypes.create_string_buffer(0)
        self._in_addr = 0
        self._in_ref = b""
        self._out_addr = 0
        self._out_view = memoryview(b"")
        self.out_size = out_size

    def close(self) -> None:
        if self._open:
            API.end(self._ref)
            self._open = False

    def __del__(self) -> None:
        self.close()

    def reset(self, window_bits: int) -> None:
        self._check(API.reset2(self._ref, window_bits), "inflateReset2")

    def prime(self, bits: int, value: int) -> None:
        self._check(API.prime(self._ref, bits, value), "inflatePrime")

    def set_dictionary(self, window: bytes) -> None:
        if window:
            self._check(
                API.set_dictionary(self._ref, window, len(window)), "inflateSetDictionary"
            )

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Replace the pending input with ``data`` (call only when ``avail_in`` is 0)."""
        n = len(data)
        if len(self._in) < n:
            self._in = ctypes.create_string_buffer(max(n, 1 << 16))
            self._in_addr = ctypes.addressof(self._in)
        ctypes.memmove(self._in_addr, bytes(data), n)
        self._s.next_in = self._in_addr
        self._s.avail_in = n

    def feed_bytes(self, data: bytes, start: int = 0) -> None:
        """Like ``feed``, without the copy: inflate reads ``data[start:]`` in place (a
        reference is kept until the next feed, so the buffer stays alive while zlib points
        into it)."""
        if not 0 <= start <= len(data):
            raise ValueError(f"feed_bytes: start {start} outside {len(data)} bytes")
        self._in_ref = data
        self._s.next_in = (ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0) + start
        self._s.avail_in = len(data) - start

    @property
    def avail_in(self) -> int:
        return int(self._s.avail_in)

    @property
    def data_type(self) -> int:
        return int(self._s.data_type)

    def unused_input(self) -> bytes:
        """The input bytes inflate has not consumed yet."""
        n = self._s.avail_in
        if not n:
            return b""
        return ctypes.string_at(self._s.next_in, n)

    def run(self, flush: int, limit: int | None = None) -> tuple[int, memoryview]:
        """Inflate once into the output buffer; returns (zlib code, produced bytes view).

        The view is valid until the next call. ``limit`` caps the output of this call.
        """
        if not self._out_addr:
            out = (ctypes.c_ubyte * self.out_size)()
            self._out_addr = ctypes.addressof(out)
            self._out_view = memoryview(out).cast("B")  # keeps ``out`` alive
        room = self.out_size if limit is None else min(self.out_size, limit)
        s = self._s
        s.next_out = self._out_addr
        s.avail_out = room
        rc = self._inflated(int(API.inflate(self._ref, flush)))
        return rc, self._out_view[: room - s.avail_out]

    def run_blocks(self, pieces: list[bytes], start: int, bounds: Any, stop: int = -1,
                   ) -> tuple[int, int, int, int]:
        """Inflate with ``Z_BLOCK`` into ``pieces[0][start:]`` and on into the following pieces
        (fresh ``_native.new_piece`` objects: the output is written into them in place, so it
        is never copied), block after block, until the last piece is full, the input is used
        up, the stream ends or ``bounds`` (a writable int64 buffer, ``BOUND_FIELDS`` per
        boundary) is full. Returns (zlib code, index of the piece being filled, bytes filled in
        it, boundaries recorded); each boundary is (piece index, offset in that piece, input
        offset from the pending input's start, bits of the last byte that belong to the next
        block). Several pieces per call mean one return to Python (and one wait for the GIL)
        per input chunk rather than per piece. ``stop`` >= 0 also returns at the first block
        boundary at or past that offset of ``pieces[0]``."""
        rc, piece, filled, count = _native.inflate_blocks(
            self._address, _INFLATE_ADDRESS, bounds, pieces, start, stop
        )
        return self._inflated(rc), piece, filled, count

    def _inflated(self, rc: int) -> int:
        """``rc`` of an inflate call, or InflateError with zlib's message for an error."""
        if rc not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            s = self._s
            raise InflateError(s.msg.decode("ascii", "replace") if s.msg else f"zlib error {rc}")
        return rc

    def _check(self, rc: int, what: str) -> None:
        if rc != Z_OK:
            raise InflateError(f"{what} failed ({rc})")
