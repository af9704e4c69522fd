"""The five setups of issue 6, each measured from a clean node.

Every measured run gets a fresh "node": its own ``clip serve`` (root, socket) and its own
containerd (root, state, socket) from the integration harness, under a short /tmp path, torn down
(by PID and mount path) right after. Clean state therefore means: no image, no content, no
snapshots; clip's disk cache and index store hold exactly what the setup says; the page cache is
dropped just before the pull. Setups:

1. ``overlayfs``: ``ctr image pull`` (download + unpack) then ``ctr run``;
   plus ``overlayfs-warm``: the same image already unpacked, page cache dropped, ``ctr run`` again
   (the fair baseline for a warm clip disk cache);
2. ``clip-cold``: ``clip pull`` with no index anywhere (clip streams each blob once, indexing it
   while the decompressed bytes fill the disk cache) then ``ctr run``;
3. ``clip-lazy``: the node's index store seeded with the indexes node 2 built (what
   "indexes already published" gives a node), empty disk cache: reads go to the registry;
4. ``clip-contentcache``: like 3 with a Redis ContentCache warmed by another node (only when the
   read path has a ContentCache tier; otherwise reported as not available);
5. ``clip-warm``: node 2's disk cache and indexes moved to a fresh node: a node that ran the image
   before.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.images import PushedImage, compressed_bytes_of
from integration.harness.clipd import ClipDaemon
from integration.harness.containerd import Containerd, unmount_under
from integration.harness.proxy import CountingProxy

NAMESPACE = "clip-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(text, flush=True)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def contentcache_in_read_path() -> bool:
    """Whether the read path consults a ContentCache tier (setup 4 needs it)."""
    return "contentcache" in (REPO / "snapshotter" / "readpath.py").read_text().lower()


@dataclass
class Run:
    """One measured run: the figures issue 6 asks for."""

    link: str
    image: str
    setup: str
    repeat: int
    pull_s: float
    first_exec_s: float  # `ctr run` start to workload done
    registry_blob_bytes: int  # layer blob bytes the registry served (CountingProxy)
    registry_bytes: int  # everything the registry served (manifests, config, blobs)
    registry_requests: int
    contentcache_bytes: int | None
    clip_cpu_s: float | None  # CPU time of `clip serve` during pull + run
    clip_peak_rss: int | None  # VmHWM of `clip serve`
    read_compressed_bytes: int | None = None  # compressed bytes of the files the workload read
    output: str = ""

    @property
    def end_to_end_s(self) -> float:
        return self.pull_s + self.first_exec_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "end_to_end_s": self.end_to_end_s}


class Node:
    """A clip serve + containerd pair on a private short path, for one measured run."""

    def __init__(self, work: Path, registry_hosts: list[str], *, cc_url: str = "") -> None:
        self.work = work
        if work.exists():
            unmount_under(work)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        tables = "".join(f'[registry."{h}"]\nplain_http = true\n\n' for h in registry_hosts)
        cache = f'[content_cache]\nurl = "{cc_url}"\n' if cc_url else ""
        (work / "clip.toml").write_text(tables + cache)
        self.clip = ClipDaemon(work / "clip", config=work / "clip.toml", log_level="warning")
        self.containerd = Containerd(work / "ctd", self.clip.socket, self.clip.root)

    @property
    def root(self) -> Path:
        return self.clip.root

    def start(self) -> None:
        self.clip.start()
        self.containerd.start()

    def stop(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.clip.stop()
            unmount_under(self.work)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr(*args, namespace=NAMESPACE, timeout=1800).stdout

    def overlay_pull(self, ref: str) -> None:
        self.ctr("images", "pull", "--plain-http", ref)

    def clip_pull(self, ref: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "snapshotter",
            "pull",
            "--plain-http",
            "--namespace",
            NAMESPACE,
            "--address",
            str(self.containerd.socket),
            ref,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"clip pull {ref}: {result.stderr.strip()}\n{self.clip.log()}")

    def run(self, ref: str, snapshotter: str, name: str, argv: tuple[str, ...]) -> str:
        result = self.containerd.ctr(
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            "--fifo-dir",
            str(self.work / "fifo"),
            "--runc-root",
            str(self.work / "runc"),
            ref,
            name,
            *argv,
            namespace=NAMESPACE,
            timeout=1800,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"ctr run {ref} ({snapshotter}) -> {result.returncode}: {result.stderr.strip()}"
                f"\n{self.clip.log()}"
            )
        return result.stdout


def redis_output_bytes(url: str) -> int:
    """total_net_output_bytes of the Redis server behind ``url`` (bytes it sent to clients)."""
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = host_port.rsplit(":", 1)
    out = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "INFO", "stats"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("total_net_output_bytes:"):
            return int(line.split(":", 1)[1])
    return 0


@dataclass
class Bench:
    """Shared context of one benchmark invocation."""

    work: Path  # short path for nodes, e.g. /tmp/clipbench-PID
    proxy: CountingProxy
    link: str  # "unshaped" or e.g. "200mbit-20ms"
    hosts: list[str]  # every proxy host the nodes must treat as plain http
    cc_url: str = ""  # a Redis URL when setup 4 runs
    runs: list[Run] = field(default_factory=list)

    def node(self, name: str, *, cc: bool = False) -> Node:
        return Node(self.work / name, self.hosts, cc_url=self.cc_url if cc else "")

    def measure(
        self,
        node: Node,
        pushed: PushedImage,
        setup: str,
        repeat: int,
        pull: Callable[[str], None] | None,
        snapshotter: str,
    ) -> Run:
        """Drop the page cache, then time ``pull`` (if any) and ``ctr run`` of the workload."""
        ref = pushed.ref_via(self.proxy.host)
        pid = node.clip.pid
        assert pid is not None
        drop_page_cache()
        self.proxy.reset()
        cc0 = redis_output_bytes(self.cc_url) if self.cc_url else None
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        if pull is not None:
            pull(ref)
        t1 = time.monotonic()
        out = node.run(ref, snapshotter, f"{setup}-{repeat}", pushed.spec.argv)
        t2 = time.monotonic()
        blobs = sum(self.proxy.blob_bytes(d) for d in pushed.image.layer_digests)
        run = Run(
            link=self.link,
            image=pushed.spec.name,
            setup=setup,
            repeat=repeat,
            pull_s=t1 - t0,
            first_exec_s=t2 - t1,
            registry_blob_bytes=blobs,
            registry_bytes=self.proxy.total_bytes,
            registry_requests=self.proxy.total_requests,
            contentcache_bytes=(redis_output_bytes(self.cc_url) - cc0) if cc0 is not None else None,
            clip_cpu_s=cpu_seconds(pid) - cpu0 if snapshotter == "clip" else None,
            clip_peak_rss=peak_rss_bytes(pid) if snapshotter == "clip" else None,
            read_compressed_bytes=_read_bytes(pushed, out),
            output=_short(out),
        )
        self.runs.append(run)
        say(
            f"    {self.link:<14} {pushed.spec.name:<10} {setup:<18} #{repeat}: pull "
            f"{run.pull_s:6.2f}s  run {run.first_exec_s:6.2f}s  registry "
            f"{blobs / 1e6:8.1f} MB"
            + (f"  rss {run.clip_peak_rss / 1e6:.0f} MB" if run.clip_peak_rss else "")
        )
        return run

    # --------------------------------------------------------------------------- one image

    def image_round(self, pushed: PushedImage, repeat: int, with_cc: bool) -> None:
        """Setups 1-5 for one image, each on a clean node."""
        name = pushed.spec.name
        overlay = self.node(f"{name}-o")
        try:
            overlay.start()
            self.measure(overlay, pushed, "overlayfs", repeat, overlay.overlay_pull, "overlayfs")
            self.measure(overlay, pushed, "overlayfs-warm", repeat, None, "overlayfs")
        finally:
            overlay.remove()
        cold = self.node(f"{name}-a")
        try:
            cold.start()
            self.measure(cold, pushed, "clip-cold", repeat, cold.clip_pull, "clip")
        finally:
            cold.stop()
        try:
            self._lazy_and_warm(pushed, repeat, cold, with_cc)
        finally:
            cold.remove()

    def _lazy_and_warm(self, pushed: PushedImage, repeat: int, cold: Node, with_cc: bool) -> None:
        name = pushed.spec.name
        if with_cc:
            _flush_redis(self.cc_url)
        lazy = self.node(f"{name}-b", cc=with_cc)
        try:
            shutil.copytree(cold.root / "indexes", lazy.root / "indexes")
            lazy.start()
            self.measure(lazy, pushed, "clip-lazy", repeat, lazy.clip_pull, "clip")
        finally:
            lazy.remove()
        if with_cc:
            node_b = self.node(f"{name}-c", cc=True)
            try:
                shutil.copytree(cold.root / "indexes", node_b.root / "indexes")
                node_b.start()
                self.measure(node_b, pushed, "clip-contentcache", repeat, node_b.clip_pull, "clip")
            finally:
                node_b.remove()
        warm = self.node(f"{name}-d")
        try:
            warm.root.mkdir(parents=True)
            (cold.root / "indexes").rename(warm.root / "indexes")
            (cold.root / "cache").rename(warm.root / "cache")
            warm.start()
            self.measure(warm, pushed, "clip-warm", repeat, warm.clip_pull, "clip")
        finally:
            warm.remove()


def _flush_redis(url: str) -> None:
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = host_port.rsplit(":", 1)
    subprocess.run(["redis-cli", "-h", host, "-p", port, "FLUSHALL"], capture_output=True)


def _read_bytes(pushed: PushedImage, out: str) -> int | None:
    for line in out.splitlines():
        if line.startswith("FILES "):
            return compressed_bytes_of(pushed, json.loads(line[6:]))
    return None


def _short(out: str) -> str:
    lines = [line for line in out.splitlines() if not line.startswith("FILES ")]
    return " | ".join(lines)[:200]


# ------------------------------------------------------------------------------- throughput

READ_SCRIPT = (
    "t0=$(date +%s%N); cat /data/big.bin > /dev/null; t1=$(date +%s%N); "
    "find /files -type f | head -n {n} | xargs cat > /dev/null; t2=$(date +%s%N); "
    "echo T $t0 $t1 $t2"
)


@dataclass
class Throughput:
    setup: str
    big_mib_s: float
    small_files_s: float
    registry_bytes: int


def _timed_reads(node: Node, ref: str, snapshotter: str, name: str, n: int) -> tuple[float, float]:
    drop_page_cache()
    out = node.run(ref, snapshotter, name, ("/bin/sh", "-c", READ_SCRIPT.format(n=n)))
    stamps = next(line for line in out.splitlines() if line.startswith("T ")).split()[1:]
    t0, t1, t2 = (int(s) / 1e9 for s in stamps)
    return t1 - t0, t2 - t1


def throughput(bench: Bench, pushed: PushedImage, big_mib: int, n_small: int) -> list[Throughput]:
    """Sequential first read of the big file and open+read of ``n_small`` small files, inside a
    container, page cache dropped: overlayfs (local disk), clip lazy (first read from the
    registry), clip warm (disk cache through FUSE)."""
    ref = pushed.ref_via(bench.proxy.host)
    results: list[Throughput] = []

    def record(setup: str, node: Node, snapshotter: str) -> None:
        bench.proxy.reset()
        big_s, small_s = _timed_reads(node, ref, snapshotter, f"tp-{setup}", n_small)
        results.append(
            Throughput(setup, big_mib / big_s, n_small / small_s, bench.proxy.total_bytes)
        )
        say(
            f"    throughput {setup:<16} big {big_mib / big_s:8.1f} MiB/s   "
            f"small {n_small / small_s:8.0f} files/s   "
            f"registry {bench.proxy.total_bytes / 1e6:.1f} MB"
        )

    overlay = bench.node("tp-o")
    try:
        overlay.start()
        overlay.overlay_pull(ref)
        record("overlayfs", overlay, "overlayfs")
    finally:
        overlay.remove()
    cold = bench.node("tp-a")
    try:
        cold.start()
        cold.clip_pull(ref)
        record("clip-warm", cold, "clip")
        cold.stop()
        lazy = bench.node("tp-b")
        try:
            shutil.copytree(cold.root / "indexes", lazy.root / "indexes")
            lazy.start()
            lazy.clip_pull(ref)
            record("clip-lazy", lazy, "clip")
        finally:
            lazy.remove()
    finally:
        cold.remove()
    return results


def wait_http(host: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, timeout=2)
            conn.request("GET", "/v2/")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host} does not answer")
