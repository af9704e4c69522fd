"""Hostile, corrupt and unsupported inputs: a clear error naming the culprit, never a wrong
index, never a traceback from the CLI, never a file left behind."""

from __future__ import annotations

import gzip
import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from snapshotter.index import (
    IndexBuildOptions,
    IndexFormatError,
    LayerFormatError,
    LayerIndex,
    build_index,
)
from snapshotter.index import format as fmt

DEFAULTS = IndexBuildOptions()


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", **pax: str
          ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.pax_headers = dict(pax)
    return info


def _build(blob: bytes, out: Path, opts: IndexBuildOptions = DEFAULTS) -> None:
    build_index(io.BytesIO(blob), out, opts)


def _fails(blob: bytes, tmp: Path, match: str, opts: IndexBuildOptions = DEFAULTS
           ) -> None:
    with pytest.raises(LayerFormatError, match=match):
        _build(blob, tmp / "idx", opts)
    assert os.listdir(tmp) == [], "a failed build left files behind"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_escaping_paths_are_refused(out: Path) -> None:
    _fails(_tar((_info("../evil"), b"x")), out, r"'\.\./evil'.*escapes")
    _fails(_tar((_info("a/../../evil"), b"x")), out, r"'a/\.\./\.\./evil'.*escapes")
    _fails(_tar((_info("/etc/passwd"), b"x")), out, r"'/etc/passwd'.*absolute")
    _fails(_tar((_info("ok"), b"x"), (_info("h", tarfile.LNKTYPE, "../ok"), b"")), out,
           r"hardlink 'h'.*escapes")


def test_hardlink_to_missing_target(out: Path) -> None:
    _fails(_tar((_info("link", tarfile.LNKTYPE, "nowhere"), b"")), out,
           r"'link': hardlink target 'nowhere' is not in the layer")


def test_parent_that_is_not_a_directory(out: Path) -> None:
    _fails(_tar((_info("a"), b"file"), (_info("a/b"), b"x")), out,
           r"'a/b': parent 'a' is not a directory")


def test_huge_pax_header(out: Path) -> None:
    blob = _tar((_info("f", comment="x" * (2 << 20)), b"data"))
    _fails(gzip.compress(blob), out, r"PAX header at offset 0 is \d+ bytes")


def test_sparse_files_are_refused(tmp_path: Path, out: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"island")
    for fmt_name in ("gnu", "posix"):
        tar = tmp_path / f"{fmt_name}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt_name}", "-C", str(src), "-cf",
                        str(tar), "holes"], check=True)
        _fails(tar.read_bytes(), out, r"holes.*sparse")


def test_corrupt_and_truncated_blobs(out: Path) -> None:
    raw = _tar((_info("a.txt"), os.urandom(100_000)), (_info("b.txt"), b"b" * 5000))
    gz = gzip.compress(raw)
    _fails(gz[:200] + bytes(b ^ 0x55 for b in gz[200:400]) + gz[400:], out, "corrupt gzip data")
    _fails(gz[: len(gz) // 2], out, "gzip stream is truncated")
    _fails(gz + b"junk", out, "garbage after the last gzip member")
    _fails(b"\x1f\x8b" + os.urandom(1000), out, "corrupt gzip data")
    _fails(raw[:50_000], out, r"truncated: 'a.txt' is cut off")
    zs = zstandard.ZstdCompressor().compress(raw)
    _fails(zs[: len(zs) // 2], out, "zstd stream is truncated")
    _fails(zs[:4] + b"\xff" * 8 + zs[12:], out, "corrupt zstd data")
    _fails(random.Random(5).randbytes(4096), out, r"checksum mismatch \(not a tar\?\)")
    _fails(b"", out, "empty")
    # a tar header whose data is cut short (no end-of-archive blocks either)
    _fails(raw[:512], out, "cut off")


def test_unsupported_entry_type(out: Path) -> None:
    info = _info("contiguous-ish")
    blob = bytearray(_tar((info, b"x")))
    # retype the member as a multi-volume continuation ('M') and fix the checksum
    hdr = blob.find(b"contiguous-ish") // 512 * 512
    blob[hdr + 156 : hdr + 157] = b"M"
    blob[hdr + 148 : hdr + 156] = b"        "
    blob[hdr + 148 : hdr + 156] = b"%06o\0 " % sum(blob[hdr : hdr + 512])
    _fails(bytes(blob), out, "'contiguous-ish': unsupported multi-volume")


def test_index_version_and_corruption(tmp_path: Path) -> None:
    _build(_tar((_info("f"), b"hello")), tmp_path / "idx")
    good = (tmp_path / "idx").read_bytes()
    assert LayerIndex.from_bytes(good).lookup("f") == 1
    future = bytearray(good)
    future[8:12] = (fmt.VERSION + 1).to_bytes(4, "little")
    with pytest.raises(IndexFormatError, match="version 3 is not supported"):
        LayerIndex.from_bytes(bytes(future))
    with pytest.raises(IndexFormatError, match="sizes do not add up"):
        LayerIndex.from_bytes(good[:-3])
    flipped = bytearray(good)
    flipped[fmt.HEADER_SIZE + 20] ^= 0xFF
    with pytest.raises(IndexFormatError, match="corrupt"):
        LayerIndex.from_bytes(bytes(flipped))
    with pytest.raises(IndexFormatError, match="not a clip index"):
        LayerIndex.from_bytes(b"PK\x03\x04" + bytes(200))


def _clip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapshotter", "index", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    raw = _tar((_info("dir/f.txt"), b"contents\n"))
    (tmp_path / "good.tar").write_bytes(raw)
    (tmp_path / "evil.tar").write_bytes(_tar((_info("../x"), b"x")))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:40])
    outdir = tmp_path / "out"
    outdir.mkdir()
    cases = [
        ("build", str(tmp_path / "missing"), "-o", str(outdir / "i")),
        ("build", str(tmp_path / "evil.tar"), "-o", str(outdir / "i")),
        ("build", str(tmp_path / "bad.gz"), "-o", str(outdir / "i")),
        ("build", str(tmp_path / "good.tar"), "-o", str(tmp_path / "nodir" / "i")),
        ("ls", str(tmp_path / "good.tar")),
        ("ls", str(tmp_path / "missing.idx")),
    ]
    for args in cases:
        res = _clip(*args)
        assert res.returncode == 1, args
        assert res.stderr.startswith("clip: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert os.listdir(outdir) == []
    ok = _clip("build", str(tmp_path / "good.tar"), "-o", str(outdir / "i"), "--json")
    assert ok.returncode == 0, ok.stderr
    for args in [("cat", str(outdir / "i"), str(tmp_path / "good.tar"), "nope"),
                 ("cat", str(outdir / "i"), str(tmp_path / "good.tar"), "dir"),
                 ("cat", str(outdir / "i"), str(tmp_path / "bad.gz"), "dir/f.txt")]:
        res = _clip(*args)
        assert res.returncode == 1 and res.stderr.startswith("clip: "), res.stderr
