"""Disk cache limits: scan, LRU prune of layers nobody holds, the per-layer flock, dir override."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from snapshotter.cache import DiskCache, prune, scan

BS = 4096


def digest(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


def fill(cache: DiskCache, d: str, blocks: int, *, used_at: float) -> None:
    layer = cache.layer(d)
    layer.set_size(blocks * BS)
    layer.store(0, os.urandom(blocks * BS))
    layer.flush()
    cache.release(d)
    path = cache.directory / d[7:]
    for name in ("lock", "present", "data"):
        os.utime(path / name, (used_at, used_at))


def test_scan_reports_each_layer(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, block_size=BS)
    fill(cache, digest(1), 4, used_at=1000)
    partial = cache.layer(digest(2))
    partial.set_size(8 * BS)
    partial.store(0, os.urandom(2 * BS))
    partial.flush()
    rows = {e.digest: e for e in scan(cache.directory, BS)}
    assert rows[digest(1)].complete and not rows[digest(1)].in_use
    assert rows[digest(1)].bytes_cached >= 4 * BS and rows[digest(1)].last_used == 1000
    assert not rows[digest(2)].complete and rows[digest(2)].in_use  # this process holds it
    assert rows[digest(2)].size == 8 * BS


def test_prune_removes_least_recently_used_until_under_the_limit(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, block_size=BS)
    now = time.time()
    for n, age in ((1, 300), (2, 100), (3, 200)):
        fill(cache, digest(n), 16, used_at=now - age)
    total = sum(e.bytes_cached for e in scan(cache.directory, BS))
    removed = prune(cache.directory, total - 1, block_size=BS)
    assert [e.digest for e in removed] == [digest(1)]  # the oldest only
    removed = prune(cache.directory, 0, keep={digest(2)}, block_size=BS)
    assert [e.digest for e in removed] == [digest(3)]
    assert [e.digest for e in scan(cache.directory, BS)] == [digest(2)]


def test_a_layer_open_in_another_process_is_never_pruned(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, block_size=BS)
    fill(cache, digest(1), 4, used_at=1000)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from snapshotter.cache import DiskCache;"
         f"DiskCache({str(tmp_path)!r}, block_size={BS}).layer({digest(1)!r});"
         "print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert [e.in_use for e in scan(cache.directory, BS)] == [True]
        assert prune(cache.directory, None, block_size=BS) == []
    finally:
        holder.kill()
        holder.wait()
    assert [e.digest for e in prune(cache.directory, None, block_size=BS)] == [digest(1)]
    assert not (cache.directory / digest(1)[7:]).exists()


def test_reopening_after_a_prune_starts_empty(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, block_size=BS)
    fill(cache, digest(1), 4, used_at=1000)
    assert len(prune(cache.directory, None, block_size=BS)) == 1
    again = cache.layer(digest(1))
    assert again.present_blocks() == 0 and again.size is None


def test_directory_override(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "root", directory=tmp_path / "elsewhere")
    cache.layer(digest(5))
    assert (tmp_path / "elsewhere" / digest(5)[7:] / "lock").exists()
    assert not (tmp_path / "root").exists()
    cache.close()


def test_cache_cli_on_a_root_without_a_daemon(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, block_size=1 << 20)
    layer = cache.layer(digest(7))
    layer.set_size(1 << 20)
    layer.store(0, os.urandom(1 << 20))
    cache.close()
    clip = [sys.executable, "-m", "snapshotter", "cache"]
    ls = subprocess.run([*clip, "ls", "--root", str(tmp_path)], capture_output=True, text=True)
    assert ls.returncode == 0 and digest(7) in ls.stdout and "yes" in ls.stdout
    pr = subprocess.run([*clip, "prune", "--root", str(tmp_path), "--limit", "10GiB"],
                        capture_output=True, text=True)
    assert pr.returncode == 0 and "0 layer cache(s) removed" in pr.stdout
    pr = subprocess.run([*clip, "prune", "--root", str(tmp_path), "--all-unused"],
                        capture_output=True, text=True)
    assert pr.returncode == 0 and f"removed {digest(7)}" in pr.stdout
    bad = subprocess.run([*clip, "prune", "--root", str(tmp_path), "--limit", "lots"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("clip: --limit: expected a size")
