"""Node B next to node A next to overlayfs, in one run (prints numbers; not a test).

One docker-registry, one redis-server, and three fresh nodes (clip serve + containerd each,
from the integration harness), each behind its own CountingProxy so registry bytes are counted
per node:

- overlayfs: `ctr image pull` then `ctr run --snapshotter overlayfs`;
- node A:    `clip pull` then `ctr run --snapshotter clip` with the ContentCache (builds the
             indexes by streaming each blob once, then shares indexes and blocks);
- node B:    the same after node A's blocks are in Redis: indexes and bytes from the cache.

Time to first exec = pull + `ctr run` of the workload until it exits. The image is the
benchmark's `python` image (Debian minbase + python3, layers cached by bench/images.py under
bench/work/layers; build them once with `python -m bench` or this script's --build).

Run: .venv/bin/python bench/cluster_bench.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench.images import IMAGES, layer_blobs
from bench.setups import Node, drop_page_cache
from integration.harness.images import BuiltImage, build_image, push_image
from integration.harness.proxy import CountingProxy
from integration.harness.redis import RedisServer
from integration.harness.registry import RegistryServer

WORK = Path(__file__).resolve().parent / "work"


def _image(registry: RegistryServer, tmp: Path, build: bool) -> tuple[BuiltImage, tuple[str, ...]]:
    spec = next(s for s in IMAGES if s.name == "python")
    blobs = {n: WORK / "layers" / f"{n}.tar.gz" for n in spec.layers}
    if not all(b.exists() for b in blobs.values()):
        if not build:
            sys.exit("bench/work/layers lacks the python image's layers: run with --build")
        blobs = layer_blobs(WORK, set(spec.layers))
    oci = build_image([blobs[n] for n in spec.layers], tmp / "oci", cmd=list(spec.argv))
    return push_image(oci, registry.host, "bench/cluster", "v1"), spec.argv


def _measure(node: Node, ref: str, snapshotter: str, argv: tuple[str, ...]) -> tuple[float, float]:
    drop_page_cache()
    t0 = time.monotonic()
    if snapshotter == "overlayfs":
        node.overlay_pull(ref)
    else:
        node.clip_pull(ref)
    t1 = time.monotonic()
    node.run(ref, snapshotter, f"run-{time.time_ns()}", argv)
    return t1 - t0, time.monotonic() - t1


def _shared(url_port: int, image: BuiltImage) -> None:
    client = redis.Redis(port=url_port)
    keys = [
        f"clip:v1:{d[7:]}:b1048576:{b}"
        for d, size in zip(image.layer_digests, image.uncompressed_sizes, strict=True)
        for b in range(-(-size // (1 << 20)))
    ]
    deadline = time.monotonic() + 300
    while client.exists(*keys) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--build", action="store_true", help="build missing layers first")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="clip-clbench-"))
    registry = RegistryServer(tmp / "registry")
    registry.start()
    rows: list[tuple[str, int, float, float, int]] = []
    try:
        image, argv = _image(registry, tmp, args.build)
        for rnd in range(args.rounds):
            with RedisServer(tmp / f"redis{rnd}") as server:
                cc = f'[content_cache]\nurl = "{server.url()}"\n'
                for name, snap, extra in (("overlayfs", "overlayfs", ""),
                                          ("node A (clip)", "clip", cc),
                                          ("node B (clip)", "clip", cc)):
                    if name.startswith("node B"):
                        _shared(server.port, image)
                    with CountingProxy(registry.host) as proxy:
                        node = Node(Path(f"/tmp/clip-clb-{rnd}-{name[:6].strip()}"),
                                    [proxy.host], cc_url="", extra=extra)
                        node.start()
                        try:
                            ref = f"{proxy.host}/{image.repo}:{image.tag}"
                            pull, run = _measure(node, ref, snap, argv)
                        finally:
                            node.remove()
                        blob = sum(proxy.blob_bytes(d) for d in image.layer_digests)
                    rows.append((name, rnd, pull, run, blob))
    finally:
        registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    total = image.compressed_total
    print(f"image {image.repo}: {len(image.layer_digests)} layers, "
          f"{total / 1e6:.1f} MB compressed, {sum(image.uncompressed_sizes) / 1e6:.1f} MB tar")
    print(f"{'setup':<16} {'round':>5} {'pull s':>8} {'run s':>8} {'first exec s':>13} "
          f"{'registry blob MB':>17}")
    for name, rnd, pull, run, blob in rows:
        print(f"{name:<16} {rnd:>5} {pull:>8.2f} {run:>8.2f} {pull + run:>13.2f} "
              f"{blob / 1e6:>17.2f}")


if __name__ == "__main__":
    main()
