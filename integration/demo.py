"""`make demo`: the best end-to-end demonstration the code allows today.

Starts, under one directory (.work/demo), a private docker-registry on loopback behind a
counting proxy, a sample image built here (host tools + Debian's python3.11 and its standard
library + a 96 MiB data file), and two "nodes" (each a `clip serve` with its own containerd).
Then it runs the same workload (start python, import a few modules, read 1 MiB of the data
file) three ways and prints time to first exec and registry bytes next to the image size:

1. containerd's overlayfs snapshotter: `ctr image pull` + `ctr run`;
2. clip, first node, no index anywhere: `clip pull` (streams each blob once, building the index
   while the bytes fill the disk cache) + `ctr run`;
3. clip, a node that has the indexes (copied from node 1, as an operator or the cluster would
   share them): `clip pull` + `ctr run` reads only what the workload touches.

Everything it started is stopped (by PID) and unmounted (by path) before it exits, even on
failure; `--clean` removes the directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from integration.harness.clipd import ClipDaemon, clip_pull
from integration.harness.containerd import Containerd, unmount_under
from integration.harness.images import (
    BuiltImage,
    build_image,
    host_rootfs_tree,
    make_layer_tar,
    push_image,
)
from integration.harness.proxy import CountingProxy
from integration.harness.registry import RegistryServer

WORKDIR = Path(".work/demo")
NAMESPACE = "clip-demo"
PYTHON = "/usr/bin/python3.11"
TOOLS = ("/bin/sh", "/bin/cat", "/bin/ls", "/usr/bin/sha256sum", "/bin/dd", PYTHON)
DATA_MIB = 96
WORKLOAD = (
    "import json, email.parser, http.client, decimal\n"
    "with open('/app/data.bin', 'rb') as f:\n"
    "    f.seek(48 << 20); chunk = f.read(1 << 20)\n"
    "print('workload done:', len(chunk), 'bytes read')\n"
)


@dataclass
class Figures:
    setup: str
    pull_seconds: float
    run_seconds: float
    registry_bytes: int

    @property
    def total(self) -> float:
        return self.pull_seconds + self.run_seconds


def say(text: str) -> None:
    print(text, flush=True)


def build_sample_image(work: Path, registry_host: str) -> BuiltImage:
    """Three gzip layers a real Python service would have: runtime, stdlib, app with data."""
    trees = [work / "tree-runtime", work / "tree-stdlib", work / "tree-app"]
    host_rootfs_tree(trees[0], TOOLS)
    shutil.copytree("/usr/lib/python3.11", trees[1] / "usr/lib/python3.11", symlinks=True)
    app = trees[2] / "app"
    app.mkdir(parents=True)
    (app / "main.py").write_text(WORKLOAD)
    with open(app / "data.bin", "wb") as data:
        for _ in range(DATA_MIB):
            data.write(os.urandom(1 << 20))
    layers = [
        make_layer_tar(tree, work / f"layer{i}.tar.gz", compression="gzip")
        for i, tree in enumerate(trees)
    ]
    for tree in trees:
        shutil.rmtree(tree)
    oci = build_image(layers, work / "oci", cmd=[PYTHON, "/app/main.py"])
    return push_image(oci, registry_host, "demo/python-app", "v1")


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(step: Callable[[], object]) -> float:
    started = time.monotonic()
    step()
    return time.monotonic() - started


class DemoNode:
    """One node: `clip serve` plus a private containerd that knows it as `clip`."""

    def __init__(self, work: Path, registry_host: str, stack: ExitStack) -> None:
        work.mkdir(parents=True)
        config = work / "clip.toml"
        # Background fetch off: the registry figures then show what the workload itself read.
        config.write_text(
            f'[registry."{registry_host}"]\nplain_http = true\n\n'
            "[background_fetch]\nenabled = false\n"
        )
        self.clip = ClipDaemon(work / "clip", config=config, log_level="info")
        self.containerd = Containerd(work / "containerd", self.clip.socket, self.clip.root)
        stack.callback(self.clip.stop)
        self.clip.start()
        stack.callback(self.containerd.stop)
        self.containerd.start()

    def ctr(self, *args: str) -> str:
        return self.containerd.ctr(*args, namespace=NAMESPACE, timeout=900).stdout

    def clip_pull(self, ref: str) -> None:
        result = clip_pull(self.containerd.socket, NAMESPACE, ref, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"clip pull failed: {result.stderr.strip()}\n{self.clip.log()}")
        say("    " + result.stdout.strip())

    def run(self, ref: str, name: str, snapshotter: str) -> None:
        out = self.containerd.run(
            "--rm", "--snapshotter", snapshotter, ref, name, PYTHON, "/app/main.py",
            namespace=NAMESPACE, timeout=900,
        )  # fmt: skip
        say("    container: " + out.stdout.strip())


def measure(
    setup: str, proxy: CountingProxy, pull: Callable[[], None], run: Callable[[], None]
) -> Figures:
    say(f"\n== {setup}")
    drop_page_cache()
    proxy.reset()
    pull_seconds = timed(pull)
    run_seconds = timed(run)
    return Figures(setup, pull_seconds, run_seconds, proxy.total_bytes)


def report(image: BuiltImage, results: list[Figures]) -> None:
    size = image.compressed_total
    base = results[0].total
    say(
        f"\nimage {image.ref}: {len(image.layer_digests)} layers, "
        f"{size / 1e6:.1f} MB compressed, {sum(image.uncompressed_sizes) / 1e6:.1f} MB unpacked"
    )
    say(
        f"{'setup':<44} {'pull s':>7} {'run s':>7} {'first exec s':>13} {'vs overlay':>10} "
        f"{'registry MB':>12} {'of image':>9}"
    )
    for r in results:
        say(
            f"{r.setup:<44} {r.pull_seconds:>7.2f} {r.run_seconds:>7.2f} {r.total:>13.2f} "
            f"{r.total / base:>9.2f}x {r.registry_bytes / 1e6:>12.1f} "
            f"{100 * r.registry_bytes / size:>8.1f}%"
        )


def demo(workdir: Path) -> None:
    clean(workdir)
    workdir.mkdir(parents=True)
    workdir = workdir.resolve()
    with ExitStack() as stack:
        stack.callback(unmount_under, workdir)
        registry = RegistryServer(workdir / "registry")
        stack.callback(registry.stop)
        registry.start()
        proxy = CountingProxy(registry.host)
        stack.callback(proxy.stop)
        proxy.start()
        say("building and pushing the sample image ...")
        image = build_sample_image(workdir / "image", registry.host)
        ref = f"{proxy.host}/{image.repo}:{image.tag}"

        first = DemoNode(workdir / "node-a", proxy.host, stack)
        results = [
            measure(
                "containerd overlayfs: ctr image pull + run",
                proxy,
                lambda: first.ctr("images", "pull", "--plain-http", ref),
                lambda: first.run(ref, "overlay", "overlayfs"),
            ),
            measure(
                "clip, first node (no index): clip pull + run",
                proxy,
                lambda: first.clip_pull(ref),
                lambda: first.run(ref, "clip-a", "clip"),
            ),
        ]
        second = DemoNode(workdir / "node-b", proxy.host, stack)
        shutil.copytree(
            first.clip.root / "indexes", second.clip.root / "indexes", dirs_exist_ok=True
        )
        results.append(
            measure(
                "clip, node with indexes: clip pull + run",
                proxy,
                lambda: second.clip_pull(ref),
                lambda: second.run(ref, "clip-b", "clip"),
            )
        )
        report(image, results)
    say("(clip nodes ran with background fetch off, so registry bytes are what the workload read)")
    say(f"\neverything stopped; `make demo-clean` removes {workdir}")


def clean(workdir: Path) -> None:
    if workdir.exists():
        unmount_under(workdir.resolve())
        shutil.rmtree(workdir)


def main() -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the demo directory")
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    args = parser.parse_args()
    if args.clean:
        clean(args.workdir)
        return 0
    demo(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
