"""`clip status` against a real `clip serve` with containerd, runc, FUSE and docker-registry.

A node pulls an image lazily from seeded indexes: status lists each layer attached to the
FUSE mount with its image, nothing cached, not complete; reading a file in a container fills
the disk cache and status shows it. A node without indexes streams each blob once, so its
layers are complete. With background fetch on, status shows lazily attached layers
becoming complete on their own. A restarted daemon re-attaches the same layers; a stopped one
makes `clip status` fail with one line. With a real redis-server as the ContentCache, status
reports it healthy, and unhealthy once it is gone (while containers keep reading).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.harness.clipd import ClipDaemon, clip_pull
from integration.harness.containerd import Containerd
from integration.harness.images import BuiltImage, build_image, make_layer_tar, push_image
from integration.harness.redis import RedisServer
from integration.harness.registry import RegistryServer
from snapshotter import __version__
from snapshotter.remote.provider import layer_id

pytestmark = pytest.mark.slow
NAMESPACE = "clip-status"
BIG = 24 << 20
NO_BACKGROUND_FETCH = "[background_fetch]\nenabled = false\n"
BIG_DATA = random.Random(7).randbytes(BIG)


@dataclass
class Node:
    clip: ClipDaemon
    containerd: Containerd

    def pull(self, ref: str) -> None:
        result = clip_pull(self.containerd.socket, NAMESPACE, ref, timeout=300)
        assert result.returncode == 0, f"{result.stderr}\n--- clip log:\n{self.clip.log()}"

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "snapshotter", "status", "--address", str(self.clip.socket)]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)

    def report(self) -> dict[str, object]:
        result = self.status("--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(registry: RegistryServer) -> Iterator[NodeFactory]:
    """clip + containerd pairs on short private paths, stopped by PID afterwards."""
    started: list[tuple[Node, Path]] = []

    def make(seed: Path | None = None, extra_config: str = "") -> Node:
        work = Path(f"/tmp/clip-status-{os.getpid()}-{len(started)}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        config = work / "clip.toml"
        config.write_text(f'[registry."{registry.host}"]\nplain_http = true\n\n{extra_config}')
        clip = ClipDaemon(work / "clip", config=config)
        if seed is not None:
            shutil.copytree(seed, clip.root / "indexes")
        node = Node(clip, Containerd(work / "ctd", clip.socket, clip.root))
        started.append((node, work))
        clip.start()
        node.containerd.start()
        return node

    yield make
    for node, work in reversed(started):
        node.containerd.stop()
        node.clip.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def image(
    tmp_path_factory: pytest.TempPathFactory, host_tools_tree: Path, registry: RegistryServer
) -> BuiltImage:
    work = tmp_path_factory.mktemp("statusimage")
    data = work / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(BIG_DATA)
    layers = [
        make_layer_tar(tree, work / f"layer{i}.tar.gz", compression="gzip")
        for i, tree in enumerate((host_tools_tree, data))
    ]
    oci = build_image(layers, work / "oci", cmd=["/bin/sh"])
    return push_image(oci, registry.host, "clip/status", "v1")


def _seed(image: BuiltImage, where: Path) -> Path:
    where.mkdir(parents=True)
    for digest, blob in zip(image.layer_digests, image.layer_blobs, strict=True):
        out = where / digest.removeprefix("sha256:")
        cmd = [sys.executable, "-m", "snapshotter", "index", "build", str(blob), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
    return where


def _layers(report: dict[str, object]) -> dict[str, dict[str, object]]:
    layers = report["layers"]
    assert isinstance(layers, list)
    return {str(layer["digest"]): layer for layer in layers}


def test_status_of_a_lazy_node_fills_as_containers_read(
    image: BuiltImage, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(_seed(image, tmp_path / "indexes"), NO_BACKGROUND_FETCH)
    node.pull(image.ref)

    report = node.report()
    assert report["version"] == __version__ and report["root"] == str(node.clip.root)
    assert report["fuse"] == {
        "mounted": True, "mountpoint": str(node.clip.root / "mnt"), "fs_mode": "erofs",
        "direct_io": True}
    snapshots = report["snapshots"]
    assert isinstance(snapshots, dict) and snapshots["committed"] == len(image.layer_digests)
    layers = _layers(report)
    assert set(layers) == set(image.layer_digests)
    for digest, size in zip(image.layer_digests, image.uncompressed_sizes, strict=True):
        layer = layers[digest]
        assert layer["layer_id"] == layer_id(digest) and layer["image_ref"] == image.ref
        assert layer["uncompressed_size"] == size
        assert layer["complete"] is False and layer["cached_bytes"] == 0

    result = node.containerd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "clip",
        image.ref,
        "reader",
        "/bin/sh",
        "-c",
        "cat /big.bin | sha256sum",
        namespace=NAMESPACE,
    )
    assert result.stdout.split()[:1] == [hashlib.sha256(BIG_DATA).hexdigest()], result
    data_layer = _layers(node.report())[image.layer_digests[1]]
    assert data_layer["cached_bytes"] == data_layer["uncompressed_size"], data_layer
    assert data_layer["complete"] is True

    text = node.status()
    assert text.returncode == 0 and text.stderr == ""
    assert f"remote layers: {len(image.layer_digests)}" in text.stdout
    assert f"{layer_id(image.layer_digests[1])}" in text.stdout and image.ref in text.stdout
    assert "content cache: none" in text.stdout


def test_status_of_a_streamed_pull_restart_and_stop(
    image: BuiltImage, node_factory: NodeFactory
) -> None:
    node = node_factory()
    node.pull(image.ref)
    before = node.report()
    for layer in _layers(before).values():
        assert layer["complete"] is True and layer["cached_bytes"] == layer["uncompressed_size"]
    disk = before["disk_cache"]
    assert isinstance(disk, dict)
    assert disk["used_bytes"] >= sum(image.uncompressed_sizes)
    assert disk["dir"] == str(node.clip.root / "cache")

    node.clip.stop()
    down = node.status()
    assert down.returncode == 1 and down.stdout == ""
    lines = down.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip: ") and str(node.clip.socket) in lines[0]
    assert "Traceback" not in down.stderr

    node.clip.start()
    after = node.report()
    assert _layers(after) == _layers(before)  # restored from the metadata store and disk cache
    assert after["pid"] != before["pid"]
    assert after["snapshots"] == before["snapshots"]


def _poll(
    node: Node, done: Callable[[dict[str, object]], bool], timeout: float
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        report = node.report()
        if done(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def test_background_fetch_completes_lazy_layers(
    image: BuiltImage, node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(_seed(image, tmp_path / "indexes"))
    node.pull(image.ref)
    report = _poll(node, lambda r: all(x["complete"] for x in _layers(r).values()), 120)
    for layer in _layers(report).values():
        assert layer["complete"] is True, report
        assert layer["cached_bytes"] == layer["uncompressed_size"]


def test_content_cache_health(image: BuiltImage, node_factory: NodeFactory, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        url = redis.url()
        config = f'{NO_BACKGROUND_FETCH}\n[content_cache]\nurl = "{url}"\n'
        node = node_factory(_seed(image, tmp_path / "indexes"), config)
        node.pull(image.ref)
        tier = node.report()["content_cache"]
        assert tier == {
            "backend": "redis",
            "configured": True,
            "healthy": True,
            "detail": f"{url}, breaker closed",
        }, tier
        up = node.status()
        assert f"content cache: redis (healthy): {url}, breaker closed" in up.stdout
    # redis-server is gone: reads that miss locally try it, fail, and open the breaker; the
    # registry still serves them.
    result = node.containerd.ctr(
        "run", "--rm", "--snapshotter", "clip", image.ref, "gone",
        "/bin/sh", "-c", "cat /big.bin | sha256sum",
        namespace=NAMESPACE,
    )  # fmt: skip
    assert result.stdout.split()[:1] == [hashlib.sha256(BIG_DATA).hexdigest()], result
    report = _poll(node, lambda r: not r["content_cache"]["healthy"], 30)  # type: ignore[index]
    tier = report["content_cache"]
    assert isinstance(tier, dict) and tier["configured"] is True and tier["healthy"] is False
    assert "breaker open" in str(tier["detail"]), tier
    assert "content cache: redis (UNHEALTHY)" in node.status().stdout
