"""Disk pressure and hostile layers end to end: real containerd, runc, FUSE, docker-registry,
and the disk cache on a real 64 MiB tmpfs (ENOSPC is the filesystem's, not simulated).

- After an image's containers and the image are removed, a new image whose layers do not fit
  next to the old ones pulls and runs: the old layers' caches are evicted when the build needs
  room (before, the pull failed with "INTERNAL: [Errno 28] No space left on device").
- A gzip bomb is refused while it streams, with one line naming the layer, and nothing of it
  is committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import BuildTestImage
from integration.harness.clipd import ClipDaemon, clip_pull
from integration.harness.containerd import Containerd
from integration.harness.registry import RegistryServer

pytestmark = pytest.mark.slow

NAMESPACE = "clip-pressure"
MiB = 1 << 20


@dataclass
class Stack:
    clip: ClipDaemon
    containerd: Containerd
    cache: Path

    def pull(self, ref: str) -> subprocess.CompletedProcess[str]:
        return clip_pull(self.containerd.socket, NAMESPACE, ref)

    def run(self, ref: str, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.containerd.run(
            "--rm", "--snapshotter", "clip", ref, name, *argv, namespace=NAMESPACE, timeout=300
        )


@pytest.fixture
def stack(registry: RegistryServer) -> Iterator[Stack]:
    work = Path(f"/tmp/clip-pressure-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(cache)], check=True)
    config = work / "clip.toml"
    config.write_text(
        f'[registry."{registry.host}"]\nplain_http = true\n\n'
        f'[disk_cache]\ndir = "{cache}"\nlimit_bytes = 0\n'
    )
    clip = ClipDaemon(work / "clip", config=config)
    containerd = Containerd(work / "ctd", clip.socket, clip.root)
    try:
        clip.start()
        containerd.start()
        yield Stack(clip, containerd, cache)
    finally:
        containerd.stop()
        clip.stop()
        subprocess.run(["umount", str(cache)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _big_tree(where: Path, seed: bytes) -> tuple[Path, str]:
    """A tree holding /big: 40 MiB that do not compress; returns it and the file's sha256."""
    where.mkdir(parents=True)
    data = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(40 * MiB // 32)
    )
    (where / "big").write_bytes(data)
    return where, hashlib.sha256(data).hexdigest()


def test_a_new_image_runs_after_the_old_one_is_removed(
    stack: Stack, build_test_image: BuildTestImage, host_tools_tree: Path, tmp_path: Path
) -> None:
    big_a, sha_a = _big_tree(tmp_path / "a", b"a")
    big_b, sha_b = _big_tree(tmp_path / "b", b"b")
    image_a = build_test_image([host_tools_tree, big_a], "clip/pressure-a")
    image_b = build_test_image([host_tools_tree, big_b], "clip/pressure-b")

    result = stack.pull(image_a.ref)
    assert result.returncode == 0, f"{result.stderr}\n{stack.clip.log()}"
    assert stack.run(image_a.ref, "a", "/bin/sh", "-c", "sha256sum /big").stdout.split()[0] == sha_a
    stack.containerd.ctr("images", "rm", "--sync", image_a.ref, namespace=NAMESPACE)

    result = stack.pull(image_b.ref)  # 40 MiB more do not fit next to image a's caches
    assert result.returncode == 0, f"{result.stderr}\n{stack.clip.log()}"
    assert stack.run(image_b.ref, "b", "/bin/sh", "-c", "sha256sum /big").stdout.split()[0] == sha_b
    big_a_cache = stack.cache / image_a.layer_digests[1].removeprefix("sha256:")
    assert not big_a_cache.exists()
    assert "evicted layer cache" in stack.clip.log()


def test_a_gzip_bomb_is_refused_while_streaming(
    stack: Stack, build_test_image: BuildTestImage, tmp_path: Path
) -> None:
    tree = tmp_path / "bomb"
    tree.mkdir()
    with open(tree / "zeros", "wb") as f:  # 300 MiB of zeros: ~1000x under gzip
        for _ in range(300):
            f.write(bytes(MiB))
    image = build_test_image([tree], "clip/bomb")
    result = stack.pull(image.ref)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert image.layer_digests[0] in message and "max_compression_ratio" in message, message
    assert "Traceback" not in result.stderr
    listed = stack.containerd.ctr("snapshots", "--snapshotter", "clip", "ls", namespace=NAMESPACE)
    assert "Committed" not in listed.stdout
    # refused long before 300 MiB reached the 64 MiB cache filesystem
    assert not (stack.cache / image.layer_digests[0].removeprefix("sha256:")).exists()
