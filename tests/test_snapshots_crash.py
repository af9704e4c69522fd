"""kill -9 at arbitrary moments never leaves a record without its directories, and whatever
directories it leaves behind are reclaimed by Cleanup."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from snapshotter.snapshots.snapshotter import Snapshotter
from snapshotter.snapshots.store import Kind

# A writer that keeps preparing, committing and removing snapshots until killed.
WRITER = """
import asyncio, sys
from pathlib import Path
from snapshotter.snapshots.snapshotter import Snapshotter

async def main() -> None:
    sn = Snapshotter(Path(sys.argv[1]))
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        key = f"k{sys.argv[2]}-{i}"
        parent = f"c{sys.argv[2]}-{i - 1}" if i > 1 else ""
        await sn.prepare("default", key, parent, {"i": str(i)})
        (sn.layout.fs(sn.stat("default", key).id) / "f").write_bytes(b"x" * 4096)
        await sn.commit("default", f"c{sys.argv[2]}-{i}", key, {})
        await sn.prepare("default", f"tmp{sys.argv[2]}-{i}", "", {})
        await sn.remove("default", f"tmp{sys.argv[2]}-{i}")

asyncio.run(main())
"""


def _check(root: Path) -> None:
    sn = Snapshotter(root)
    try:
        records = sn.store.all(None)
        for r in records:
            assert sn.layout.fs(r.id).is_dir(), f"record {r.key} lost its fs dir"
            if r.kind is Kind.ACTIVE:
                assert sn.layout.work(r.id).is_dir(), f"record {r.key} lost its work dir"
        asyncio.run(sn.cleanup())
        assert sorted(os.listdir(sn.layout.snapshots)) == sorted(str(r.id) for r in records)
    finally:
        sn.close()


def test_kill_9_anywhere_is_recoverable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    rng = random.Random(3)
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(round_)], stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        _check(root)
