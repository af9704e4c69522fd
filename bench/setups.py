"""The setups of issues 6 and 14, each measured from a clean node.

Every measured run gets a fresh "node": its own ``clip serve`` (root, socket) and its own
containerd (root, state, socket) from the integration harness, under a short /tmp path, torn down
(by PID and mount path) right after. Clean state therefore means: no image, no content, no
snapshots; clip's disk cache and index store hold exactly what the setup says; the page cache is
dropped just before the pull. Setups:

1. ``overlayfs``: ``ctr image pull`` (download + unpack) then ``ctr run``;
   plus ``overlayfs-warm``: the same image already unpacked, page cache dropped, ``ctr run`` again
   (the fair baseline for a warm clip disk cache), and ``overlayfs-hot``: ``ctr run`` once more
   with the page cache as the warm run left it (the floor: no snapshotter starts the container
   faster on this machine);
2. ``clip-cold``: ``clip pull`` with no index anywhere (clip streams each blob once, indexing it
   while the decompressed bytes fill the disk cache) then ``ctr run``;
3. ``clip-lazy``: the node's index store seeded with the indexes node 2 built (what
   "indexes already published" gives a node), empty disk cache: reads go to the registry;
4. ``clip-contentcache``: like 3 with a Redis ContentCache warmed by another node (only when the
   read path has a ContentCache tier; otherwise reported as not available);
5. ``clip-warm``: node 2's disk cache and indexes moved to a fresh node: a node that ran the image
   before;
6. ``stargz``: the image's eStargz twin (bench/peers.py), ``ctr-remote image rpull`` then
   ``ctr run`` on a node whose snapshotter is the bench's stargz daemon; plus ``stargz-warm``:
   the same node again, page cache dropped (its layer caches hold what the first run fetched).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from bench.images import PushedImage, compressed_bytes_of, read_set_paths
from bench.peers import StargzDaemon, rpull
from integration.harness.clipd import CLIP, ClipDaemon, clip_pull
from integration.harness.containerd import Containerd, unmount_under
from integration.harness.proxy import CountingProxy
from integration.harness.registry import free_port

NAMESPACE = "clip-bench"
PROXY_PLUGIN = "clip"  # the harness containerd's proxy plugin: clip serve or the stargz daemon
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


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
    registry_unique_bytes: int  # blob bytes counted once however often ranges overlapped
    contentcache_bytes: int | None
    # The snapshotter's process: `clip serve`, the stargz daemon, or containerd itself for
    # overlayfs (it snapshots and unpacks in-process). CPU during pull + run; VmHWM at the end.
    daemon_cpu_s: float | None
    daemon_peak_rss: int | None
    inflate_s: float | None = None  # clip.inflate.duration sum over the run (read path only)
    read_compressed_bytes: int | None = None  # compressed bytes of the files the workload read
    load1: float = 0.0  # 1-minute load average at the end (the machine is shared: noise gauge)
    containerd_cpu_s: float | None = None  # containerd's CPU during pull + run (every setup)
    fuse_requests: int | None = None  # requests clip's FUSE mount served during pull + run
    # seconds clip's reads spent waiting for bytes not yet on the node (read-path latency of
    # the reads the registry or the ContentCache served; concurrent reads each count)
    fetch_wait_s: float | None = None
    # clip lazy with background fetch on: per layer, what the registry served over the node's
    # life (pull + run + background fetch until the layer was complete on disk)
    life: list[dict[str, Any]] | None = None
    output: str = ""
    # 0: the repeat's run (after its pull, if any); n > 0: the n-th more run of a run-only
    # setup on the same node (`RERUNS`), which only adds a first-exec sample
    rerun: int = 0

    @property
    def end_to_end_s(self) -> float:
        return self.pull_s + self.first_exec_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "end_to_end_s": self.end_to_end_s}


class ClipCounters(NamedTuple):
    """Cumulative clip metrics a measured run reports as deltas (see `Run`)."""

    inflate_s: float
    fuse_requests: float
    fetch_wait_s: float


def _metric_sum(text: str, prefix: str, suffix: str, labels: tuple[str, ...] = ()) -> float:
    """Sum of the samples in Prometheus ``text`` named ``prefix...suffix`` (over all labels, or
    over the samples carrying one of ``labels``)."""
    total = 0.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        metric = name.split("{", 1)[0]
        wanted = not labels or any(label in name for label in labels)
        if metric.startswith(prefix) and metric.endswith(suffix) and wanted:
            total += float(value.split()[0])
    return total


class Node:
    """A snapshotter daemon + containerd pair on a private short path, for one measured run.

    The daemon is ``clip serve``, or with ``stargz`` the bench's stargz daemon (then the
    containerd's proxy plugin named ``clip`` is that daemon: see bench.peers.StargzDaemon).
    """

    def __init__(
        self,
        work: Path,
        registry_hosts: list[str],
        *,
        cc_url: str = "",
        extra: str = "",
        stargz: Path | None = None,
    ) -> None:
        self.work = work
        self.cc_url = cc_url
        if work.exists():
            unmount_under(work)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        self.metrics = ""
        self.clip: ClipDaemon | StargzDaemon
        if stargz is not None:
            self.clip = StargzDaemon(stargz, work / "sgz")
        else:
            tables = "".join(f'[registry."{h}"]\nplain_http = true\n\n' for h in registry_hosts)
            cache = f'[content_cache]\nurl = "{cc_url}"\n' if cc_url else ""
            self.metrics = f"127.0.0.1:{free_port()}"
            daemon = f'[daemon]\nmetrics_address = "{self.metrics}"\n\n'
            (work / "clip.toml").write_text(daemon + tables + cache + extra)
            self.clip = ClipDaemon(work / "clip", config=work / "clip.toml", log_level="warning")
        self.containerd = Containerd(work / "ctd", self.clip.socket, self.clip.root)

    @property
    def root(self) -> Path:
        return self.clip.root

    def snapshotter_pid(self, snapshotter: str) -> int:
        """The process doing the snapshotter's work: containerd for overlayfs, else the daemon."""
        proc = self.containerd.proc if snapshotter == "overlayfs" else self.clip.proc
        assert proc is not None, "node not started"
        return proc.pid

    def counters(self) -> ClipCounters | None:
        """clip's counters so far, from one scrape of `[daemon] metrics_address`
        (None for a daemon without it, or when the scrape fails)."""
        if not self.metrics:
            return None
        try:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return ClipCounters(
            # read-path inflation (the `clip.inflate.duration` histogram)
            inflate_s=_metric_sum(text, "clip_inflate_duration", "_sum"),
            # every operation of clip's FUSE mount, both fs modes
            fuse_requests=_metric_sum(text, "clip_fuse_requests", "_total"),
            # the read-path latency of reads served from below the node, not memory or disk
            fetch_wait_s=_metric_sum(
                text, "clip_read_latency_seconds", "_sum",
                ('tier="registry"', 'tier="contentcache"'),
            ),
        )

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

    def stargz_pull(self, ref: str) -> None:
        try:
            rpull(self.containerd, NAMESPACE, ref, PROXY_PLUGIN)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.clip.log()}") from None

    def clip_pull(self, ref: str) -> None:
        result = clip_pull(self.containerd.socket, NAMESPACE, ref, timeout=1800)
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


def _redis_info(url: str, section: str) -> dict[str, int]:
    """Integer fields of Redis ``INFO section`` for the server behind ``url``."""
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = host_port.rsplit(":", 1)
    out = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "INFO", section], capture_output=True, text=True
    ).stdout
    fields: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if value.isdigit():
            fields[key] = int(value)
    return fields


def redis_output_bytes(url: str) -> int:
    """total_net_output_bytes of the Redis server (bytes it sent to clients)."""
    return _redis_info(url, "stats").get("total_net_output_bytes", 0)


@dataclass
class Bench:
    """Shared context of one benchmark invocation."""

    work: Path  # short path for nodes, e.g. /tmp/clipbench-PID
    proxy: CountingProxy
    link: str  # "unshaped" or e.g. "200mbit-20ms"
    hosts: list[str]  # every proxy host the nodes must treat as plain http
    cc_url: str = ""  # a Redis URL when setup 4 runs
    profile: tuple[str, ...] = ()  # setups to record with py-spy (bench/work/profiles)
    profile_dir: Path = Path("bench/work/profiles")
    stargz: Path | None = None  # the stargz daemon's binary, when it built
    esgz: dict[str, PushedImage] = field(default_factory=dict)  # eStargz twins by image name
    only: frozenset[str] | None = None  # setups to measure (None: all; see wants())
    runs: list[Run] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def node(self, name: str, *, cc: bool = False, extra: str = "") -> Node:
        return Node(self.work / name, self.hosts, cc_url=self.cc_url if cc else "", extra=extra)

    def wants(self, *setups: str) -> bool:
        """Whether any of ``setups`` is to be measured (``--setups`` narrows the run)."""
        return self.only is None or any(s in self.only for s in setups)

    def measure(
        self,
        node: Node,
        pushed: PushedImage,
        setup: str,
        repeat: int,
        pull: Callable[[str], None] | None,
        snapshotter: str,
        *,
        drop: bool = True,
        rerun: int = 0,
    ) -> Run:
        """Drop the page cache (unless ``drop`` is false), then time ``pull`` (if any) and
        ``ctr run`` of the workload."""
        ref = pushed.ref_via(self.proxy.host)
        pid = node.snapshotter_pid(snapshotter)
        ctd = node.snapshotter_pid("overlayfs")
        if drop:
            drop_page_cache()
        self.proxy.reset()
        cc0 = redis_output_bytes(node.cc_url) if node.cc_url else None
        cpu0, ctd0 = cpu_seconds(pid), cpu_seconds(ctd)
        counters0 = node.counters()
        spy = self._py_spy(pid, f"{self.link}-{pushed.spec.name}-{setup}-{repeat}", setup)
        t0 = time.monotonic()
        try:
            if pull is not None:
                pull(ref)
            t1 = time.monotonic()
            out = node.run(ref, snapshotter, f"{setup}-{repeat}", pushed.spec.argv)
            t2 = time.monotonic()
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        blobs = sum(self.proxy.blob_bytes(d) for d in pushed.image.layer_digests)
        counted = _since(node.counters(), counters0)
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
            registry_unique_bytes=unique_blob_bytes(self.proxy, pushed),
            contentcache_bytes=(redis_output_bytes(node.cc_url) - cc0) if cc0 is not None else None,
            daemon_cpu_s=cpu_seconds(pid) - cpu0,
            daemon_peak_rss=peak_rss_bytes(pid),
            containerd_cpu_s=cpu_seconds(ctd) - ctd0,
            read_compressed_bytes=_read_bytes(pushed, out),
            load1=os.getloadavg()[0],
            inflate_s=None if counted is None else counted.inflate_s,
            fuse_requests=None if counted is None else round(counted.fuse_requests),
            fetch_wait_s=None if counted is None else counted.fetch_wait_s,
            output=_short(out),
            rerun=rerun,
        )
        self.runs.append(run)
        say(
            f"    {self.link:<14} {pushed.spec.name:<10} {setup:<18} #{repeat}"
            + (f".{rerun}" if rerun else "") + ": pull "
            f"{run.pull_s:6.2f}s  run {run.first_exec_s:6.2f}s  registry "
            f"{blobs / 1e6:8.1f} MB"
            + f"  daemon cpu {run.daemon_cpu_s:5.2f}s rss {(run.daemon_peak_rss or 0) / 1e6:.0f} MB"
        )
        return run

    def _py_spy(self, pid: int, name: str, setup: str) -> subprocess.Popen[bytes] | None:
        """py-spy recording `clip serve` (all threads, native frames off) when asked for."""
        if setup not in self.profile:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.txt"
        cmd = ["py-spy", "record", "-p", str(pid), "--format", "raw", "-o", str(out),
               "--rate", "200", "--threads", "--nonblocking"]  # fmt: skip
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / cmd[0]), *cmd[1:]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # let it attach before the measured work starts
        return spy

    # --------------------------------------------------------------------------- one image

    def image_round(self, pushed: PushedImage, repeat: int, with_cc: bool) -> None:
        """Setups 1-5 for one image, each on a clean node; a failing setup is recorded in
        ``failures`` and the round goes on with what does not depend on it. The nodes of the
        run-only setups 1b/1c, 5 and 5b stay up until the end of the round and take their runs
        in turns (`interleave`)."""
        name = pushed.spec.name
        warm: list[WarmNode] = []
        try:
            if self.wants("overlayfs", "overlayfs-warm", "overlayfs-hot"):
                self._attempt(pushed, "overlayfs", repeat,
                              kept(warm, partial(self._overlay, pushed, repeat)))
            esgz = self.esgz.get(name)
            if self.stargz is not None and esgz is not None and self.wants("stargz", "stargz-warm"):
                self._attempt(esgz, "stargz", repeat, lambda: self._stargz(esgz, repeat))
            self._clip_setups(pushed, repeat, with_cc, warm)
            self._interleave(pushed, repeat, warm)
        finally:
            for unit in warm:
                unit.node.remove()

    def _clip_setups(
        self, pushed: PushedImage, repeat: int, with_cc: bool, warm: list[WarmNode]
    ) -> None:
        """Setups 2-4 measured, then the nodes of 5b and 5 prepared and added to ``warm``."""
        name = pushed.spec.name
        clip_setups = [s for s in CLIP_SETUPS if self.wants(s) and (with_cc or "content" not in s)]
        if not clip_setups:
            return
        if with_cc:
            _flush_redis(self.cc_url)
        cold = self.node(f"{name}-a", cc=with_cc)
        try:
            if not self._attempt(
                pushed, "clip-cold", repeat, lambda: self._cold(cold, pushed, repeat, with_cc)
            ):
                return
            for setup, extra in (
                ("clip-lazy", ""),
                ("clip-lazy-nobg", NO_BACKGROUND),
                ("clip-lazy-fusetree", FUSE_TREE),
            ):
                if setup not in clip_setups:
                    continue
                self._attempt(
                    pushed,
                    setup,
                    repeat,
                    partial(self._fresh, pushed, setup, repeat, cold, extra=extra),
                )
            if "clip-contentcache" in clip_setups:
                self._attempt(
                    pushed,
                    "clip-contentcache",
                    repeat,
                    lambda: self._fresh(pushed, "clip-contentcache", repeat, None, cc=True),
                )
            for setup in ("clip-warm-fusetree", "clip-warm"):  # the last one moves the cache
                if setup in clip_setups:
                    self._attempt(pushed, setup, repeat,
                                  kept(warm, partial(self._warm, pushed, cold, setup)))
        finally:
            cold.remove()

    def _interleave(self, pushed: PushedImage, repeat: int, warm: list[WarmNode]) -> None:
        """The run-only setups' 1 + `RERUNS` runs each, in turns on their nodes (`turns`): the
        machine's drift over the minutes of a round then reaches every setup alike, which one
        setup's runs after another's did not (issue 15: warm ratios 0.93-1.08x from run to run).
        A node's first turn runs its ``pull`` first (clip pull on a warm node is a figure). Each
        run is its own `_attempt`: a failed run is recorded and the others still run."""
        for rerun, unit in turns(warm, 1 + RERUNS):
            for setup, drop in unit.setups:
                pull = unit.pull if rerun == 0 else None
                self._attempt(pushed, setup, repeat, partial(
                    self.measure, unit.node, pushed, setup, repeat, pull, unit.snapshotter,
                    drop=drop, rerun=rerun))

    def _attempt(
        self, pushed: PushedImage, setup: str, repeat: int, step: Callable[[], object]
    ) -> bool:
        try:
            step()
            return True
        except Exception as exc:  # recorded and reported; the benchmark goes on
            text = str(exc).strip().splitlines() or [repr(exc)]
            first = text[0][:300]
            self.failures.append(
                {
                    "link": self.link,
                    "image": pushed.spec.name,
                    "setup": setup,
                    "repeat": repeat,
                    "error": first,
                }
            )
            say(f"    {self.link:<14} {pushed.spec.name:<10} {setup:<18} #{repeat}: FAILED {first}")
            say("".join(f"      | {line}\n" for line in text[1:][-20:]).rstrip())
            return False

    def _overlay(self, pushed: PushedImage, repeat: int) -> WarmNode:
        """Setup 1; the node is kept for 1b and 1c (1c right after each 1b: the page cache as
        1b left it)."""
        node = self.node(f"{pushed.spec.name}-o")
        try:
            node.start()
            self.measure(node, pushed, "overlayfs", repeat, node.overlay_pull, "overlayfs")
        except BaseException:
            node.remove()
            raise
        return WarmNode(node, "overlayfs", (("overlayfs-warm", True), ("overlayfs-hot", False)))

    def _stargz(self, esgz: PushedImage, repeat: int) -> None:
        """Setup 6 on the eStargz twin: rpull + run, then the warm run on the same node."""
        node = Node(self.work / f"{esgz.spec.name}-s", self.hosts, stargz=self.stargz)
        try:
            node.start()
            self.measure(node, esgz, "stargz", repeat, node.stargz_pull, PROXY_PLUGIN)
            self._interleave(esgz, repeat, [WarmNode(node, PROXY_PLUGIN, (("stargz-warm", True),))])
        finally:
            node.remove()

    def _cold(self, node: Node, pushed: PushedImage, repeat: int, with_cc: bool) -> None:
        """Setup 2. Afterwards (untimed) the node stays up until it has saved each layer's start
        profile (the blocks read in the first `profile_seconds` after attach), which is published
        with the index, and, with a ContentCache, until its publishing to the cache is done."""
        try:
            node.start()
            self.measure(node, pushed, "clip-cold", repeat, node.clip_pull, "clip")
            wait_for_profiles(node, pushed)
            if with_cc:
                wait_redis_settled(self.cc_url)
        finally:
            node.stop()

    def _fresh(
        self,
        pushed: PushedImage,
        setup: str,
        repeat: int,
        seed: Node | None,
        *,
        extra: str = "",
        cc: bool = False,
    ) -> None:
        """A new node, its index store seeded from ``seed`` (if any), empty disk cache."""
        node = self.node(f"{pushed.spec.name}-{setup}", cc=cc, extra=extra)
        try:
            if seed is not None:
                shutil.copytree(seed.root / "indexes", node.root / "indexes")
            node.start()
            run = self.measure(node, pushed, setup, repeat, node.clip_pull, "clip")
            if setup == "clip-lazy":
                run.life = self._node_life(node, pushed)
        finally:
            node.remove()

    def _node_life(
        self, node: Node, pushed: PushedImage, limit: float = 600.0
    ) -> list[dict[str, Any]]:
        """Wait for background fetch to complete every layer of the image, then per layer: the
        bytes the registry served since the pull (ranges counted as often as asked), the
        distinct bytes and the blob size (issue 12: served <= 1.02x the blob)."""
        deadline = time.monotonic() + limit
        digests = set(pushed.image.layer_digests)
        complete = False
        while not complete and time.monotonic() < deadline:
            status = json.loads(subprocess.run(
                [*CLIP, "status", "--json", "--address", str(node.clip.socket)],
                capture_output=True, text=True, check=True).stdout)
            done = {layer["digest"] for layer in status.get("layers", []) if layer.get("complete")}
            complete = digests <= done
            if not complete:
                time.sleep(0.5)
        if not complete:
            say(f"    (background fetch did not complete every layer within {limit:.0f}s)")
        spans = blob_spans(self.proxy, pushed)
        out = []
        for digest, size in zip(pushed.image.layer_digests, pushed.image.layer_sizes, strict=True):
            ranges = spans.get(digest, [])
            out.append({
                "digest": digest, "blob": size, "complete": complete,
                "served": sum(end - start for start, end in ranges),
                "distinct": _union(ranges), "requests": len(ranges),
            })
        return out

    def _warm(self, pushed: PushedImage, cold: Node, setup: str) -> WarmNode:
        """Setup 5's node: node 2's disk cache and indexes on a fresh node, copied for the
        FUSE-tree variant (prepared first), moved for the last one; started, not yet run."""
        fuse_tree = setup == "clip-warm-fusetree"
        node = self.node(f"{pushed.spec.name}-{setup}", extra=FUSE_TREE if fuse_tree else "")
        try:
            node.root.mkdir(parents=True)
            for part in ("indexes", "cache"):
                if fuse_tree:
                    subprocess.run(
                        ["cp", "-a", "--sparse=always", str(cold.root / part), str(node.root)],
                        check=True,
                    )
                else:
                    (cold.root / part).rename(node.root / part)
            node.start()
        except BaseException:
            node.remove()
            raise
        return WarmNode(node, "clip", ((setup, True),), node.clip_pull)


#: More runs of each run-only setup per repeat (1b, 1c, 5, 5b, 6b), pooled into its first-exec
#: median: those runs take 0.15-2.5 s and vary by tens of ms from one to the next on this
#: 2-core machine, and more samples cost no fresh node here (what makes the other setups slow).
#: They steady each median; taking them in turns (`turns`) spreads the drift between minutes
#: over the setups alike. A re-run is prepared like the first (page cache dropped, every byte
#: on disk); pull and the other figures come from each repeat's first run.
RERUNS = 2
NO_BACKGROUND = "[background_fetch]\nenabled = false\n"
# The FUSE-tree mode (clip serves every file operation), side by side with the default, in
# which the kernel serves each layer from an EROFS image (docs/erofs.md).
FUSE_TREE = '[fs]\nmode = "fuse"\n'
# clip-cold runs whenever any of these is wanted: the others start from what it built.
CLIP_SETUPS = (
    "clip-cold",
    "clip-lazy",
    "clip-lazy-nobg",
    "clip-lazy-fusetree",
    "clip-contentcache",
    "clip-warm-fusetree",
    "clip-warm",
)
SETUPS = ("overlayfs", "overlayfs-warm", "overlayfs-hot", "stargz", "stargz-warm", *CLIP_SETUPS)


class WarmNode(NamedTuple):
    """A node kept up for run-only setups: ``setups`` are (setup, drop the page cache first),
    run back to back at each of the node's turns; ``pull`` runs before its first turn."""

    node: Node
    snapshotter: str
    setups: tuple[tuple[str, bool], ...]
    pull: Callable[[str], None] | None = None


def kept(warm: list[WarmNode], prepare: Callable[[], WarmNode]) -> Callable[[], None]:
    """A step that prepares a run-only setup's node and keeps it in ``warm``."""
    return lambda: warm.append(prepare())


def turns(units: Sequence[T], rounds: int) -> list[tuple[int, T]]:
    """``rounds`` turns of every unit as (round, unit), the order reversed in every other round
    (A B C, C B A, A B C, ...): a drift linear in time then costs each unit the same on
    average, and no unit always runs right after a particular other."""
    order: list[tuple[int, T]] = []
    for n in range(rounds):
        order.extend((n, unit) for unit in (units if n % 2 == 0 else list(reversed(units))))
    return order


def wait_for_profiles(node: Node, pushed: PushedImage, limit: float = 30.0) -> None:
    """Wait until ``<root>/indexes/<hex>.profile`` exists for every layer (or ``limit``)."""
    wanted = [node.root / "indexes" / (d.removeprefix("sha256:") + ".profile")
              for d in pushed.image.layer_digests]  # fmt: skip
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not all(p.exists() for p in wanted):
        time.sleep(0.25)
    missing = sum(not p.exists() for p in wanted)
    if missing:
        say(f"    ({missing} of {len(wanted)} layers have no start profile after {limit:.0f}s)")


def wait_redis_settled(url: str, quiet: float = 2.0, limit: float = 90.0) -> None:
    """Wait until the ContentCache stops growing (a node's background publishing is done)."""
    deadline = time.monotonic() + limit
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        used = _redis_info(url, "memory").get("used_memory", 0)
        if used != last:
            last, since = used, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)


def unique_blob_bytes(proxy: CountingProxy, pushed: PushedImage) -> int:
    """Layer bytes the registry served, each byte counted once (union of the ranges asked)."""
    return sum(_union(ranges) for ranges in blob_spans(proxy, pushed).values())


def _union(ranges: list[tuple[int, int]]) -> int:
    total, reach = 0, -1
    for start, end in sorted(ranges):
        total += max(0, end - max(start, reach))
        reach = max(reach, end)
    return total


def blob_spans(proxy: CountingProxy, pushed: PushedImage) -> dict[str, list[tuple[int, int]]]:
    """Per layer digest, the byte ranges of the blob GETs the registry answered."""
    sizes = dict(zip(pushed.image.layer_digests, pushed.image.layer_sizes, strict=True))
    spans: dict[str, list[tuple[int, int]]] = {}
    for method, path, rng in list(proxy.request_log):
        digest = path.rsplit("/", 1)[-1]
        if method != "GET" or digest not in sizes:
            continue
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            end = int(last) + 1 if last else sizes[digest]
            spans.setdefault(digest, []).append((int(first), min(end, sizes[digest])))
        else:
            spans.setdefault(digest, []).append((0, sizes[digest]))
    return spans


def _flush_redis(url: str) -> None:
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = host_port.rsplit(":", 1)
    subprocess.run(["redis-cli", "-h", host, "-p", port, "FLUSHALL"], capture_output=True)


def _since(after: ClipCounters | None, before: ClipCounters | None) -> ClipCounters | None:
    """What the counters grew by between two scrapes (None unless both answered)."""
    if after is None or before is None:
        return None
    return ClipCounters(*(a - b for a, b in zip(after, before, strict=True)))


def _read_bytes(pushed: PushedImage, out: str) -> int | None:
    """Compressed bytes of what the workload read: the files it printed, else its spec's
    declared read set, else unknown."""
    for line in out.splitlines():
        if line.startswith("FILES "):
            return compressed_bytes_of(pushed, json.loads(line[6:]))
    paths = read_set_paths(pushed)
    return compressed_bytes_of(pushed, paths) if paths else None


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
