"""The CLI's happy paths, the reader's counters and concurrency, and bounded build memory."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from index_helpers import compress, gnu_tar, make_special_tree

from snapshotter.index import (
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
    inflate_range,
)


def _clip(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "snapshotter", "index", *args],
                          capture_output=True, timeout=300)


def test_cli_build_ls_cat(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_special_tree(src)
    raw = gnu_tar(src, tmp_path / "layer.tar", "posix")
    blob = tmp_path / "layer.gz"
    blob.write_bytes(compress(raw, "gzip"))
    res = _clip("build", str(blob), "-o", str(tmp_path / "i.idx"), "--json",
                "--checkpoint-spacing", "20000")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("entries", "uncompressed_size", "compressed_size", "index_size",
                "checkpoints", "seconds"):
        assert key in info
    assert info["uncompressed_size"] == len(raw) and info["checkpoints"] > 1
    ls = _clip("ls", str(tmp_path / "i.idx"), "--json")
    rows = [json.loads(line) for line in ls.stdout.decode().splitlines()]
    assert len(rows) == info["entries"]
    by_path = {r["path"]: r for r in rows}
    assert by_path["bin/su"]["mode"] == "4755"
    assert by_path["dev/null"]["type"] == "char"
    assert by_path["bin/hosts-link"]["linkname"] == "../etc/hosts"
    assert by_path["big-hardlink"]["type"] in ("hardlink", "file")
    text = _clip("ls", str(tmp_path / "i.idx")).stdout.decode()
    assert "-rwsr-xr-x 4755 0/0" in text and "drwxrwxrwt 1777" in text
    cat = _clip("cat", str(tmp_path / "i.idx"), str(blob), "big.bin", "--stats")
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == (src / "big.bin").read_bytes()
    stats = json.loads(cat.stderr)
    assert 0 < stats["compressed_bytes_read"] <= len(blob.read_bytes())
    small = _clip("cat", str(tmp_path / "i.idx"), str(blob), "etc/hosts", "--stats")
    assert small.stdout == b"127.0.0.1 localhost\n"
    # random access: a small file late in the layer does not read the blob from the start
    assert json.loads(small.stderr)["compressed_bytes_read"] < len(blob.read_bytes())


def test_reader_counters_hardlinks_and_threads(tmp_path: Path) -> None:
    rnd = __import__("random").Random(3)
    files = {f"f{i:03d}": bytes(rnd.randrange(256) for _ in range(rnd.randrange(60_000)))
             for i in range(40)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("hl")
        link.type = tarfile.LNKTYPE
        link.linkname = "f007"
        tf.addfile(link)
    raw = buf.getvalue()
    blob = gzip.compress(raw, 6)
    out = io.BytesIO()
    build_index(io.BytesIO(blob), out, IndexBuildOptions(checkpoint_spacing=16 << 10))
    index = LayerIndex.from_bytes(out.getvalue())
    asked: list[tuple[int, int]] = []

    def source(off: int, n: int) -> bytes:
        asked.append((off, n))
        return blob[off : off + n]

    reader = IndexReader(index, source)
    hl = index.lookup("hl")
    assert hl is not None
    e = index.entry(hl)
    assert e.type is EntryType.HARDLINK and index.entry(e.link_target).path == "f007"
    assert index.entry(e.link_target).nlink == 2
    assert reader.read(hl, 10, 100) == files["f007"][10:110]
    before = reader.inflated_bytes
    assert reader.read(hl, 200, 50) == files["f007"][200:250]
    assert reader.inflated_bytes == before  # same span: served from the cached segment
    assert reader.compressed_bytes_read == sum(n for _o, n in asked)
    # digests verify what the reader returns
    f = index.entry(index.lookup("f020") or 0)
    for uoff, length, digest in index.chunk_digests(f.ordinal):
        assert hashlib.sha256(raw[uoff : uoff + length]).digest() == digest

    def check(name: str) -> bool:
        ent = index.entry(index.lookup(name) or 0)
        c0, c1 = index.compressed_range(ent.uoff, ent.size)
        return inflate_range(index, c0, blob[c0:c1], ent.uoff, ent.size) == files[name]

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, list(files) * 3))


def test_build_memory_is_bounded(tmp_path: Path) -> None:
    """A 400 MB layer streamed through a pipe: peak RSS stays far below the layer size."""
    script = textwrap.dedent(
        """
        import gzip, io, os, sys, tarfile, threading
        from snapshotter.index import build_index, LayerIndex
        SIZE = 400 << 20
        r, w = os.pipe()
        def produce():
            with os.fdopen(w, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb",
                                                          compresslevel=1) as gz:
                info = tarfile.TarInfo("big")
                info.size = SIZE
                gz.write(info.tobuf(tarfile.GNU_FORMAT))
                chunk = bytes(range(256)) * 4096
                for _ in range(SIZE // len(chunk)):
                    gz.write(chunk)
                gz.write(bytes(1024))
        t = threading.Thread(target=produce)
        t.start()
        with os.fdopen(r, "rb") as src:
            res = build_index(src, sys.argv[1])
        t.join()
        idx = LayerIndex.open(sys.argv[1])
        # VmHWM, not ru_maxrss: Linux carries the forked parent's peak (pytest's) into
        # ru_maxrss across exec, while VmHWM belongs to this process's own memory map.
        with open("/proc/self/status") as status:
            hwm = next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
        print(res.uncompressed_size, idx.checkpoint_count, hwm)
        """
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "i.idx")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    usize, checkpoints, maxrss_kib = map(int, res.stdout.split())
    assert usize > 400 << 20
    # max_span (8 MiB) applies to highly compressible data, at deflate block granularity
    assert checkpoints >= 25
    assert maxrss_kib < 200 * 1024, f"peak RSS {maxrss_kib} KiB"
    assert os.path.getsize(tmp_path / "i.idx") < 4 << 20


def test_system_zlib_fallback_engine(tmp_path: Path) -> None:
    """CLIP_INFLATE_ENGINE=zlib binds the classic libz.so.1; indexes are engine-independent."""
    src = tmp_path / "src"
    make_special_tree(src)
    raw = gnu_tar(src, tmp_path / "layer.tar", "gnu")
    (tmp_path / "layer.gz").write_bytes(compress(raw, "gzip"))
    script = textwrap.dedent(
        """
        import sys
        from snapshotter.index import IndexBuildOptions, IndexReader, LayerIndex, build_index
        from snapshotter.index import inflate
        opts = IndexBuildOptions(checkpoint_spacing=8192)
        with open(sys.argv[1], "rb") as f:
            res = build_index(f, sys.argv[2], opts)
        idx = LayerIndex.open(sys.argv[2])
        data = IndexReader(idx, sys.argv[1]).read(idx.lookup("big.bin"), 1000, 400000)
        print(inflate.ENGINE, res.index_digest, data.hex()[:64], len(data))
        """
    )
    outs = []
    for engine in ("zlib", "zlib-ng"):
        env = {**os.environ, "CLIP_INFLATE_ENGINE": engine}
        res = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "layer.gz"),
             str(tmp_path / f"{engine}.idx")],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout.split())
    assert [o[0] for o in outs] == ["zlib", "zlib-ng"]
    assert outs[0][1:] == outs[1][1:]
    assert outs[0][2] == (src / "big.bin").read_bytes()[1000:1032].hex()


def test_failing_consumer_stops_the_build(tmp_path: Path) -> None:
    """An on_data callback that fails (say, a full disk cache) aborts the build cleanly."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(5).randbytes(10 << 20))  # several pieces
    raw = gnu_tar(src, tmp_path / "layer.tar", "gnu")
    blob = compress(raw, "gzip")
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def on_data(uoff: int, view: memoryview) -> None:
        seen.append(uoff)
        if len(seen) == 2:
            raise OSError(28, "No space left on device")

    try:
        build_index(io.BytesIO(blob), out / "i.idx", on_data=on_data)
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("build_index did not fail")
    assert os.listdir(out) == [] and len(seen) == 2
