"""The build's native loops and side thread give exactly what the Python paths give.

``_native.scan_members`` reads runs of plain headers and leaves everything else to the
scanner's general path; ``_native.inflate_blocks`` reports deflate block boundaries a buffer at
a time; ``SideWorker`` hashes file data and compresses windows in its own thread. Each is
checked against the path it replaces: the general state machine (fed one byte at a time, so no
header is ever whole in a piece), ``Digests`` in the calling thread, and a one-boundary-per-call
bounds array.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import threading
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshotter.index import IndexBuildOptions, LayerFormatError, build_index, decoders, digests
from snapshotter.index.digests import DeferredDigests, Digests
from snapshotter.index.tarscan import Member, TarScanner
from snapshotter.index.worker import SideWorker

OPTS = IndexBuildOptions(chunk_size=4096)


def _scan(raw: bytes, one_byte_pieces: bool) -> list[Member]:
    out: list[Member] = []
    scanner = TarScanner(OPTS, out.append)
    if one_byte_pieces:  # no header is ever whole in a piece: the general path only
        for i in range(len(raw)):
            scanner.feed(raw[i : i + 1])
    else:
        scanner.feed(raw)
    scanner.finish()
    return out


def _header(name: bytes, kind: bytes = b"0", data_size: int = 0, **fields: bytes) -> bytes:
    """A ustar header with raw field bytes (``mode=b" 644 \\0"`` etc.) and a valid checksum."""
    block = bytearray(512)
    block[0 : len(name)] = name
    values = {"mode": b"0000644\0", "uid": b"0001750\0", "gid": b"0001750\0",
              "size": b"%011o\0" % data_size, "mtime": b"14000000000\0", "devmajor": b"",
              "devminor": b"", "linkname": b"", "prefix": b"", "magic": b"ustar\x0000"}
    values.update(fields)
    places = {"mode": 100, "uid": 108, "gid": 116, "size": 124, "mtime": 136, "linkname": 157,
              "magic": 257, "devmajor": 329, "devminor": 337, "prefix": 345}
    for key, at in places.items():
        block[at : at + len(values[key])] = values[key]
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _member(name: bytes, data: bytes = b"", kind: bytes = b"0", **fields: bytes) -> bytes:
    pad = -len(data) % 512
    return _header(name, kind, len(data), **fields) + data + bytes(pad)


ODD_HEADERS = [
    _member(b"plain.txt", b"hello"),
    _member(b"spaces.txt", b"x", mode=b"  644  \0"),  # leading and trailing spaces
    _member(b"junk-after-nul.txt", b"y", uid=b"17\0 12\0\0"),  # general path reads "17"
    _member(b"empty-field.txt", b"z", gid=b"\0" * 8),  # general path reads 0
    _member(b"base256.txt", b"b", uid=b"\x80\0\0\0\0\0\x01\x00"),  # GNU base-256
    _member(b"olddir/", b"", kind=b"0"),  # a pre-POSIX directory
    _member(b"name", b"data", prefix=b"deep/prefix/dir"),  # ustar prefix
    _member(b"gnu-magic", b"g", magic=b"ustar  \0", prefix=b"ignored"),  # GNU: no prefix
    _member(b"./dot/slash.txt", b"d"),
    _member(b"trailing/dir/", kind=b"5"),
    _member(b"a//double/./dots", b"n"),  # the Python normalise decides
    _member(b"link", kind=b"2", linkname=b"plain.txt"),
    _member(b"hard", kind=b"1", linkname=b"plain.txt"),
    _member(b"null", kind=b"3", devmajor=b"0000001\0", devminor=b"0000003\0"),
    _member(b"fifo", kind=b"6"),
    _member(b"contiguous", b"c", kind=b"7"),
    _member(b"future", b"f", mtime=b"777777777777"),  # beyond int64 nanoseconds
    _member("ünïcode-\udcff".encode("utf-8", "surrogateescape"), b"u"),
    _member(b"dir-with-size", b"", kind=b"5", size=b"00000001000\0"),  # size ignored
    _member(b"big.bin", random.Random(1).randbytes(20000)),
]


def test_odd_headers_give_what_the_general_path_gives() -> None:
    raw = b"".join(ODD_HEADERS) + bytes(1024)
    fast, general = _scan(raw, False), _scan(raw, True)
    assert fast == general
    assert len(fast) == len(ODD_HEADERS)
    by_path = {m.path: m for m in fast}
    assert by_path["deep/prefix/dir/name"].size == 4
    assert by_path["gnu-magic"].raw_path == "gnu-magic"
    assert by_path["olddir"].type.name == "DIR"
    assert by_path["dot/slash.txt"].raw_path == "./dot/slash.txt"
    assert by_path["a/double/dots"].size == 1
    assert by_path["junk-after-nul.txt"].uid == 0o17
    assert by_path["future"].mtime_ns == 0o777777777777 * 1_000_000_000
    assert by_path["big.bin"].digests == b"".join([
        hashlib.sha256(ODD_HEADERS[-1][512 + p : 512 + min(p + 4096, 20000)]).digest()
        for p in range(0, 20000, 4096)
    ])


def test_a_bad_checksum_is_refused_by_the_general_path() -> None:
    bad = bytearray(_member(b"x", b"1"))
    bad[0] = ord("y")  # the checksum no longer matches
    with pytest.raises(LayerFormatError, match="checksum mismatch"):
        _scan(bytes(bad) + bytes(1024), False)


def test_an_escaping_path_is_refused_from_the_native_scan() -> None:
    with pytest.raises(LayerFormatError, match="escapes the layer root"):
        _scan(_member(b"ok", b"1") + _member(b"../../etc/passwd", b"2") + bytes(1024), False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(ODD_HEADERS))),
                          st.integers(min_value=1, max_value=3000)), min_size=1, max_size=12))
def test_any_mix_and_slicing_matches_the_general_path(picks: list[tuple[int, int]]) -> None:
    raw = b"".join(ODD_HEADERS[i] for i, _ in picks) + bytes(1024)
    general = _scan(raw, True)
    out: list[Member] = []
    scanner = TarScanner(OPTS, out.append)
    pos = 0
    for _, size in picks:  # pieces of the drawn sizes, then the rest
        scanner.feed(raw[pos : pos + size])
        pos += size
    scanner.feed(raw[pos:])
    scanner.finish()
    assert out == general


def _python_tar(seed: int) -> bytes:
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(400):
            info = tarfile.TarInfo(f"d{i % 9}/f{i}")
            payload = rnd.randbytes(rnd.choice([0, 10, 5000, 70000]))
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize("libcrypto", [True, False])
def test_deferred_digests_equal_inline_digests(libcrypto: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole files hashed in batches (through libcrypto, or hashlib without it) and split
    files hashed call by call give the digests the inline digester gives."""
    if libcrypto:
        assert digests.sha256_address() is not None  # this machine has OpenSSL
    else:
        monkeypatch.setattr(digests, "sha256_address", lambda: None)
    raw = _python_tar(2)
    inline: list[Member] = []
    scanner = TarScanner(OPTS, inline.append, digester=Digests(OPTS.chunk_size))
    for i in range(0, len(raw), 7000):  # files both whole in a piece and split across pieces
        scanner.feed(raw[i : i + 7000])
    stop = threading.Event()
    worker = SideWorker(stop)
    deferred: list[Member] = []
    hashing = DeferredDigests(OPTS.chunk_size, worker)
    scanner = TarScanner(OPTS, deferred.append, digester=hashing)
    for i in range(0, len(raw), 7000):
        scanner.feed(raw[i : i + 7000])
        hashing.flush()
    worker.close()
    assert deferred == inline
    assert sum(len(m.digests) for m in inline) > 400 * 32


def test_side_worker_hands_an_error_to_the_caller() -> None:
    worker = SideWorker(threading.Event())

    def fail(a: object, b: object) -> None:
        raise ValueError(f"side work failed on {a}")

    worker.call(fail, "piece-3", None)
    with pytest.raises(ValueError, match="piece-3"):
        worker.close()


def test_side_worker_unblocks_when_the_build_stops() -> None:
    """A stopped build never leaves its caller waiting on a full queue."""
    stop, gate = threading.Event(), threading.Event()
    worker = SideWorker(stop, depth=1)
    worker.call(lambda a, b: gate.wait(10), None, None)
    worker.flush()  # the thread takes this batch and blocks in it
    worker.call(lambda a, b: None, None, None)
    worker.flush()  # fills the queue
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    worker.call(lambda a, b: None, None, None)
    worker.flush()  # waits on the full queue until the build stops
    assert stop.is_set()
    gate.set()
    worker.close()
    timer.join()


def test_one_bound_per_native_call_gives_the_same_index(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The C loop returns early when its bounds array is full; the decoder then calls again,
    and the index is the same byte for byte."""
    blob = gzip.compress(_python_tar(3) * 6, 6, mtime=0)
    build_index(io.BytesIO(blob), tmp_path / "many.idx")
    monkeypatch.setattr(decoders, "BOUNDS_PER_CALL", 1)
    build_index(io.BytesIO(blob), tmp_path / "one.idx")
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "many.idx").read_bytes()


def test_digest_files_refuses_bad_input() -> None:
    from snapshotter.index import _native

    address = digests.sha256_address()
    assert address is not None
    with pytest.raises(TypeError, match="member, data"):
        _native.digest_files([("no-pair",)], 4096, address)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="chunk size"):
        _native.digest_files([], 0, address)
    with pytest.raises(TypeError, match="not bytes"):
        _native.digest_files([(types.SimpleNamespace(digests=()), b"x")], 4096, address)
    member = types.SimpleNamespace(digests=b"")
    _native.digest_files([(member, b"x" * 5000), (member, b"")], 4096, address)
    sha = hashlib.sha256
    assert member.digests == sha(b"x" * 4096).digest() + sha(b"x" * 904).digest()


def test_the_native_scan_rejects_a_bad_types_table() -> None:
    from snapshotter.index import _native
    from snapshotter.index.tarscan import normalise

    with pytest.raises(ValueError, match="types table"):
        _native.scan_members(bytes(512), 0, 0, Member, (None,) * 3, normalise, {})


def test_the_native_scan_takes_plain_headers_and_leaves_the_rest() -> None:
    """Which of the odd headers the C scan reads itself (the others go to the general path):
    the comparison above is only meaningful if both kinds occur."""
    from snapshotter.index import _native
    from snapshotter.index.tarscan import _NO_XATTRS, _PLAIN_TYPES, normalise

    taken = {}
    for raw in ODD_HEADERS:
        run, stop = _native.scan_members(raw + bytes(1024), 0, 0, Member, _PLAIN_TYPES,
                                         normalise, _NO_XATTRS)
        name = raw[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
        taken[name] = len(run) == 1
        assert stop == (len(raw) if run else 0)
    left = sorted(name for name, took in taken.items() if not took)
    assert left == ["base256.txt", "empty-field.txt", "future", "junk-after-nul.txt", "olddir/"]


@pytest.mark.parametrize("cut", [decoders.PIECE_SIZE, decoders.PIECE_SIZE - 1,
                                 decoders.PIECE_SIZE + 1, 2 * decoders.PIECE_SIZE])
def test_a_gzip_member_ending_at_a_piece_boundary(tmp_path: Path, cut: int) -> None:
    """A member whose output ends exactly where a piece fills up: the piece is handed on
    before the next member starts, and every byte reads back."""
    from snapshotter.index import IndexReader, LayerIndex

    src = tmp_path / "src"
    src.mkdir()
    payload = random.Random(cut).randbytes(3 * decoders.PIECE_SIZE)
    (src / "big.bin").write_bytes(payload)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(src / "big.bin", arcname="big.bin")
    raw = buf.getvalue()
    blob = gzip.compress(raw[:cut], 1, mtime=0) + gzip.compress(raw[cut:], 1, mtime=0)
    (tmp_path / "layer.gz").write_bytes(blob)
    build_index(io.BytesIO(blob), tmp_path / "i.idx")
    index = LayerIndex.open(tmp_path / "i.idx")
    with IndexReader(index, tmp_path / "layer.gz") as reader:
        entry = index.lookup("big.bin")
        assert entry is not None
        assert reader.read(entry, 0, len(payload)) == payload


@pytest.mark.parametrize(("field", "value", "message"), [
    ("uid", 2**40, "uid 1099511627776 does not fit the index"),
    ("mtime", 10**12, "mtime_ns 1000000000000000000000 does not fit the index"),
])
def test_a_value_the_index_cannot_hold_is_a_clear_error(tmp_path: Path, field: str,
                                                        value: int, message: str) -> None:
    """PAX can carry numbers beyond the record's fields (a uid over 32 bits, an mtime past
    2262): the build names the entry and the field instead of failing somewhere inside."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("fine"))
        odd = tarfile.TarInfo("odd")
        setattr(odd, field, value)
        tf.addfile(odd)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LayerFormatError, match=f"layer entry 'odd': {message}"):
        build_index(io.BytesIO(buf.getvalue()), out / "i.idx")
    assert list(out.iterdir()) == []


def test_pieces_per_call_do_not_change_the_index(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Highly compressible data fills every piece a call gets (40 MiB of zeros from a few KB
    of input): filling one piece per call or several gives the same index, and the bytes read
    back."""
    from snapshotter.index import IndexReader, LayerIndex

    buf = io.BytesIO()
    zeros = bytes(40 << 20)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, payload in (("zeros", zeros), ("tail.txt", b"after the zeros\n")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    blob = gzip.compress(buf.getvalue(), 9, mtime=0)
    (tmp_path / "layer.gz").write_bytes(blob)
    build_index(io.BytesIO(blob), tmp_path / "many.idx")
    monkeypatch.setattr(decoders, "PIECES_PER_CALL", 1)
    build_index(io.BytesIO(blob), tmp_path / "one.idx")
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "many.idx").read_bytes()
    index = LayerIndex.open(tmp_path / "many.idx")
    with IndexReader(index, tmp_path / "layer.gz") as reader:
        tail = index.lookup("tail.txt")
        assert tail is not None and reader.read(tail, 0, 100) == b"after the zeros\n"
        big = index.lookup("zeros")
        assert big is not None and reader.read(big, (40 << 20) - 4096, 4096) == bytes(4096)
