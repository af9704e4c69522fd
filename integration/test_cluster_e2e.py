"""The shared read path across a cluster, end to end: two or more `clip serve` daemons with
their own roots and containerds, one redis-server as the ContentCache, Debian's docker-registry
behind a CountingProxy, all started here.

- Node A pulls and runs an image (building the indexes, sharing them and every block); node B
  then pulls and runs it with zero layer-blob bytes from the registry, without building an
  index, and its reads show as ContentCache hits on its /metrics.
- A corrupted value planted in Redis is detected (verification failure counted), not served,
  and the right bytes come from the registry; Redis stopped mid-run: reads go on from the
  registry within the bounded delay.
- Background fetch completes a layer, after which the registry can go away without any read
  failing.
- `clip index push`, then a fresh node pulls without building an index (no whole-blob GET) and
  prefetches the start profile recorded on the node that ran the image first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from integration.harness.clipd import ClipDaemon
from integration.harness.containerd import Containerd
from integration.harness.images import (
    BuiltImage,
    build_image,
    host_rootfs_tree,
    make_layer_tar,
    push_image,
)
from integration.harness.proxy import CountingProxy
from integration.harness.redis import RedisServer
from integration.harness.registry import RegistryServer, free_port
from integration.test_lazy_e2e import Node
from snapshotter.cache import BLOCK_SIZE
from snapshotter.contentcache import block_key
from snapshotter.index import LayerIndex
from snapshotter.telemetry import scrape

pytestmark = pytest.mark.slow

BINARIES = ("/bin/sh", "/bin/cat", "/bin/ls", "/usr/bin/sha256sum", "/bin/dd")
BIG = 24 << 20
MiB = 1 << 20
READ = "cat /etc/motd-clip && dd if=/big.bin bs=1048576 skip={skip} count=1 status=none | sha256sum"


@dataclass
class ClusterImage:
    image: BuiltImage
    big: bytes
    big_digest: str  # the layer holding /big.bin

    def middle(self, skip: int) -> str:
        return hashlib.sha256(self.big[skip * MiB : (skip + 1) * MiB]).hexdigest()


@pytest.fixture(scope="module")
def cluster_image(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer
) -> ClusterImage:
    work = tmp_path_factory.mktemp("clusterimage")
    tools = host_rootfs_tree(work / "tree0", BINARIES)
    (tools / "etc").mkdir(exist_ok=True)
    (tools / "etc" / "motd-clip").write_text("hello cluster\n")
    data = work / "tree1"
    data.mkdir()
    big = os.urandom(BIG)
    (data / "big.bin").write_bytes(big)
    for i in range(200):
        (data / f"small{i:03d}").write_bytes(os.urandom(3000 + i))
    layers = [make_layer_tar(t, work / f"l{i}.tar.gz") for i, t in enumerate((tools, data))]
    oci = build_image(layers, work / "oci", cmd=["/bin/sh"])
    image = push_image(oci, registry.host, "clip/cluster", "v1")
    return ClusterImage(image, big, image.layer_digests[1])


# ---------------------------------------------------------------------------- nodes


@dataclass
class ClusterNode(Node):
    metrics_port: int = 0

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return dict(scrape(resp.read().decode()))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's series whose labels include `labels`."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            value
            for key, value in self.metrics().items()
            if key.split("{")[0] == name and all(w in key for w in want)
        )

    def cache_ls(self) -> list[dict[str, object]]:
        out = subprocess.run(
            [sys.executable, "-m", "snapshotter", "cache", "ls", "--json",
             "--root", str(self.clip.root)],
            capture_output=True, text=True, check=True, timeout=60,
        )
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows


NodeFactory = Callable[..., ClusterNode]


def _config(path: Path, hosts: list[str], port: int, extra: str) -> Path:
    tables = "".join(f'[registry."{h}"]\nplain_http = true\n\n' for h in hosts)
    path.write_text(
        f'[daemon]\nmetrics_address = "127.0.0.1:{port}"\n\n{tables}'
        "[fuse]\nread_timeout_seconds = 10.0\n\n" + extra
    )
    return path


@pytest.fixture
def cluster_nodes() -> Iterator[NodeFactory]:
    started: list[ClusterNode] = []

    def make(hosts: list[str], name: str, extra: str = "") -> ClusterNode:
        work = Path(f"/tmp/clip-cl-{os.getpid()}-{name}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        port = free_port()
        clip = ClipDaemon(work / "clip", config=_config(work / "clip.toml", hosts, port, extra))
        clip.start()
        containerd = Containerd(work / "ctd", clip.socket, clip.root)
        node = ClusterNode(clip, containerd, port)
        started.append(node)
        containerd.start()
        return node

    yield make
    for node in reversed(started):
        node.containerd.stop()
        node.clip.stop()
        shutil.rmtree(node.clip.workdir.parent, ignore_errors=True)


def _cache_section(server: RedisServer, background: bool = True) -> str:
    return (
        f'[content_cache]\nurl = "{server.url()}"\ncooldown_seconds = 2.0\n\n'
        f"[background_fetch]\nenabled = {'true' if background else 'false'}\n"
        "profile_seconds = 3.0\n"
    )


def _wait(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _all_shared(server: RedisServer, image: BuiltImage) -> Callable[[], bool]:
    """Every block and index of every layer is in Redis."""
    client = redis.Redis(port=server.port)
    keys = [
        block_key(d, b)
        for d, size in zip(image.layer_digests, image.uncompressed_sizes, strict=True)
        for b in range(-(-size // BLOCK_SIZE))
    ]

    def check() -> bool:
        return bool(client.exists(*keys) == len(keys))

    return check


def _read(node: Node, ref: str, name: str, skip: int) -> str:
    out = node.run(ref, name, "/bin/sh", "-c", READ.format(skip=skip))
    lines = out.stdout.splitlines()
    assert lines[0] == "hello cluster", out.stdout
    return lines[1].split()[0]


def _layer_bytes(proxy: CountingProxy, image: BuiltImage) -> int:
    return sum(proxy.blob_bytes(d) for d in image.layer_digests)


# ---------------------------------------------------------------------------- tests


def test_second_node_reads_everything_from_the_content_cache(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    image = cluster_image.image
    with RedisServer(tmp_path / "redis") as server, CountingProxy(registry.host) as proxy:
        a = cluster_nodes([registry.host], "a", _cache_section(server))
        a.pull(image.ref)
        assert _read(a, image.ref, "a1", 5) == cluster_image.middle(5)
        _wait("node A to share every block", _all_shared(server, image))
        profile = a.clip.root / "indexes" / (cluster_image.big_digest[7:] + ".profile")
        _wait("node A's start profile", profile.exists)

        b = cluster_nodes([proxy.host], "b", _cache_section(server))
        ref = f"{proxy.host}/{image.repo}:{image.tag}"
        b.pull(ref)
        assert _read(b, ref, "b1", 5) == cluster_image.middle(5)
        assert _read(b, ref, "b2", 17) == cluster_image.middle(17)
        whole = b.run(ref, "b3", "/bin/sh", "-c", "sha256sum /big.bin")
        assert whole.stdout.split()[0] == hashlib.sha256(cluster_image.big).hexdigest()
        _wait("node B's background fetch", lambda: all(r["complete"] for r in b.cache_ls()))

        assert _layer_bytes(proxy, image) == 0, proxy.request_log
        assert b.metric("clip_tier_hits_total", tier="contentcache") > 0
        assert b.metric("clip_tier_read_bytes_total", tier="contentcache") >= BIG
        assert b.metric("clip_index_builds_total") == 0
        assert a.metric("clip_index_builds_total") == len(image.layer_digests)
        assert "building index" not in b.clip.log()
        assert "start profile fetched" in b.clip.log_path.read_text()


def test_corrupt_value_is_rejected_and_a_stopped_redis_is_skipped(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    image = cluster_image.image
    with RedisServer(tmp_path / "redis") as server, CountingProxy(registry.host) as proxy:
        a = cluster_nodes([registry.host], "ca", _cache_section(server))
        a.pull(image.ref)
        _wait("node A to share every block", _all_shared(server, image))
        index = LayerIndex.open(a.clip.root / "indexes" / cluster_image.big_digest[7:])
        big = index.entry(index.lookup("big.bin") or 0)
        block = (big.uoff + 8 * MiB + MiB // 2) // BLOCK_SIZE
        client = redis.Redis(port=server.port)
        key = block_key(cluster_image.big_digest, block)
        value = bytearray(client.get(key) or b"")
        value[1000:1010] = bytes(10)
        value[BLOCK_SIZE // 2 : BLOCK_SIZE // 2 + 10] = b"corrupted!"
        client.set(key, bytes(value))

        b = cluster_nodes([proxy.host], "cb", _cache_section(server, background=False))
        ref = f"{proxy.host}/{image.repo}:{image.tag}"
        b.pull(ref)
        assert _read(b, ref, "good", 8) == cluster_image.middle(8)
        assert b.metric("clip_verification_failures_total", tier="contentcache") >= 1
        assert proxy.blob_bytes(cluster_image.big_digest) > 0
        assert "content cache bytes rejected" in b.clip.log_path.read_text()

        server.stop()
        before = _layer_bytes(proxy, image)
        started = time.monotonic()
        assert _read(b, ref, "no-redis", 19) == cluster_image.middle(19)
        assert _read(b, ref, "no-redis-2", 21) == cluster_image.middle(21)
        elapsed = time.monotonic() - started
        assert _layer_bytes(proxy, image) > before
        assert elapsed < 30, elapsed  # each cache call is bounded; the breaker then skips it


def _push(image_ref: str, root: Path | None = None) -> dict[str, object]:
    cmd = [sys.executable, "-m", "snapshotter", "index", "push", "--plain-http", "--json",
           image_ref]
    if root is not None:
        cmd += ["--root", str(root)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _whole_blob_gets(proxy: CountingProxy, image: BuiltImage) -> list[str]:
    return [
        path for method, path, rng in proxy.request_log
        if method == "GET" and rng is None and any(path.endswith(d) for d in image.layer_digests)
    ]


def test_index_push_then_a_fresh_node_builds_nothing_and_background_fetch_completes(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
) -> None:
    image = cluster_image.image
    first = cluster_nodes([registry.host], "pa", "[background_fetch]\nprofile_seconds = 3.0\n")
    first.pull(image.ref)
    assert _read(first, image.ref, "p1", 3) == cluster_image.middle(3)
    profile = first.clip.root / "indexes" / (cluster_image.big_digest[7:] + ".profile")
    _wait("the start profile", profile.exists)
    # the read 3 MiB into big.bin (random bytes: checkpoints 2 MiB apart) starts far past a
    # checkpoint: the profile names the block boundary before it, with its window
    assert json.loads(profile.read_bytes()).get("points"), profile.read_text()[:300]
    pushed = _push(image.ref, first.clip.root)
    assert pushed["layers"] == len(image.layer_digests) and pushed["profiles"] >= 1
    assert pushed["tag"] == "sha256-" + image.manifest_digest[7:] + ".clip"

    with CountingProxy(registry.host) as proxy:
        fresh = cluster_nodes(
            [proxy.host], "pb", "[background_fetch]\nbytes_per_second = 1073741824\n"
        )
        ref = f"{proxy.host}/{image.repo}:{image.tag}"
        fresh.pull(ref)
        assert _read(fresh, ref, "p2", 11) == cluster_image.middle(11)
        assert fresh.metric("clip_index_builds_total") == 0
        assert fresh.metric("clip_index_fetches_total", source="registry", outcome="hit") >= 1
        fetched = [json.loads(line) for line in fresh.clip.log_path.read_text().splitlines()
                   if '"start profile fetched"' in line]
        assert any(entry.get("layer") == cluster_image.big_digest
                   and entry.get("restart_points", 0) >= 1 for entry in fetched), fetched
        _wait("background fetch", lambda: all(r["complete"] for r in fresh.cache_ls()))
        assert _whole_blob_gets(proxy, image) == []
        assert fresh.metric("clip_background_fetch_done_bytes") > 0

        proxy.pause("refuse")
        whole = fresh.run(ref, "offline", "/bin/sh", "-c", "cat /small* >/dev/null && "
                          "sha256sum /big.bin")
        assert whole.stdout.split()[0] == hashlib.sha256(cluster_image.big).hexdigest()
        proxy.resume()


def test_cache_ls_and_prune_beside_a_running_daemon(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
) -> None:
    image = cluster_image.image
    node = cluster_nodes([registry.host], "ls")
    node.pull(image.ref)
    # built here, or (after the index-push test) found in the registry and background-fetched
    _wait("complete layers", lambda: all(r["complete"] for r in node.cache_ls()))
    rows = {r["digest"]: r for r in node.cache_ls()}
    assert set(rows) == set(image.layer_digests)
    assert all(r["in_use"] for r in rows.values()), rows
    prune = [sys.executable, "-m", "snapshotter", "cache", "prune", "--all-unused", "--json",
             "--root", str(node.clip.root)]
    out = subprocess.run(prune, capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []  # everything is used by the pulled image
    node.containerd.ctr("images", "rm", "--sync", image.ref, namespace="clip-lazy")
    _wait("snapshots removed", lambda: node.committed() == [], timeout=60)
    _wait("layers unused", lambda: not any(r["in_use"] for r in node.cache_ls()), timeout=30)
    out = subprocess.run(prune, capture_output=True, text=True, check=True, timeout=60)
    assert {r["digest"] for r in json.loads(out.stdout)} == set(image.layer_digests)
    assert node.cache_ls() == []


def test_eviction_keeps_the_disk_cache_under_its_cap(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    cap = 32 * MiB
    tree = tmp_path / "tree"
    tree.mkdir()
    other_big = os.urandom(20 * MiB)
    (tree / "other.bin").write_bytes(other_big)
    tools = host_rootfs_tree(tmp_path / "tools", BINARIES)
    layers = [make_layer_tar(t, tmp_path / f"e{i}.tar.gz") for i, t in enumerate((tools, tree))]
    other = push_image(build_image(layers, tmp_path / "oci"), registry.host, "clip/evict", "v1")

    node = cluster_nodes([registry.host], "ev", f"[disk_cache]\nlimit_bytes = {cap}\n")
    first = cluster_image.image
    node.pull(first.ref)
    assert _read(node, first.ref, "first", 2) == cluster_image.middle(2)
    # the first image whole on disk (background fetch, after its quiet spell) before it goes
    _wait("the first image's layers on disk",
          lambda: all(r["complete"] for r in node.cache_ls()), timeout=60)
    node.containerd.ctr("images", "rm", "--sync", first.ref, namespace="clip-lazy")
    _wait("the first image's snapshots to go", lambda: node.committed() == [], timeout=60)

    node.pull(other.ref)
    out = node.run(other.ref, "second", "/bin/sh", "-c", "sha256sum /other.bin")
    assert out.stdout.split()[0] == hashlib.sha256(other_big).hexdigest()

    def under_cap() -> bool:
        return sum(int(str(r["bytes_cached"])) for r in node.cache_ls()) <= cap

    _wait("eviction under the cap", under_cap, timeout=60)
    rows = {str(r["digest"]): r for r in node.cache_ls()}
    assert cluster_image.big_digest not in rows  # unused and least recently used: evicted
    assert rows[other.layer_digests[1]]["in_use"] and rows[other.layer_digests[1]]["complete"]
    assert "evicted layer cache" in node.clip.log_path.read_text()


def test_a_layer_built_while_redis_was_down_is_shared_after_a_restart(
    cluster_image: ClusterImage, registry: RegistryServer, cluster_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    image = cluster_image.image
    # Frozen (SIGSTOP) rather than not started, so that its port stays ours meanwhile.
    with RedisServer(tmp_path / "redis") as server:
        server.pause()
        node = cluster_nodes([registry.host], "down", _cache_section(server))
        node.pull(image.ref)
        assert _read(node, image.ref, "down", 1) == cluster_image.middle(1)
        # built here, or (after the index-push test) found in the registry and background-fetched
        _wait("complete layers", lambda: all(r["complete"] for r in node.cache_ls()))
        node.clip.stop()  # Redis comes back while no daemon runs
        server.resume()
        assert not _all_shared(server, image)()
        node.clip.start()
        node.wait_until_reachable()
        _wait("the restarted node to share its complete layers", _all_shared(server, image))
