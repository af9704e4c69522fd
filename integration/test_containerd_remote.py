"""The remote-layer handshake against real containerd 1.6 (``ctr-remote image rpull``).

clip's Daemon runs in a thread of this test process with a small LayerProvider that fetches
a layer blob and extracts it into a directory (the real lazy FUSE provider plugs in the same
way). containerd must accept clip's ALREADY_EXISTS answers, never download the layer blobs,
and run a container on the resulting snapshots with the same rootfs as overlayfs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.harness import snapfs
from integration.harness.clipd import Mount
from integration.harness.containerd import Containerd
from integration.harness.mounts import Mounter
from integration.harness.registry import RegistryServer
from snapshotter.config import Config, DaemonConfig
from snapshotter.service.daemon import Daemon
from snapshotter.snapshots.remote import RemoteLayer

pytestmark = pytest.mark.slow


class ExtractingProvider:
    """Fetches each layer whole and extracts it, converting OCI whiteouts for overlayfs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.prepared: list[str] = []

    async def prepare(self, layer: RemoteLayer) -> str:
        target = self.base / str(len(self.prepared))
        self.prepared.append(layer.digest)
        await asyncio.to_thread(self._fetch_and_extract, layer, target)
        return str(target)

    def _fetch_and_extract(self, layer: RemoteLayer, target: Path) -> None:
        host, _, rest = layer.image_ref.partition("/")
        repo = rest.rsplit(":", 1)[0]
        blob = target.with_suffix(".blob")
        target.mkdir(parents=True)
        url = f"http://{host}/v2/{repo}/blobs/{layer.digest}"
        with urllib.request.urlopen(url) as resp, open(blob, "wb") as out:
            shutil.copyfileobj(resp, out)
        subprocess.run(["tar", "-xpf", str(blob), "--xattrs", "-C", str(target)], check=True)
        blob.unlink()
        for dirpath, _dirs, files in os.walk(target):
            for name in files:
                if name == ".wh..wh..opq":
                    os.unlink(os.path.join(dirpath, name))
                    os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                elif name.startswith(".wh."):
                    os.unlink(os.path.join(dirpath, name))
                    os.mknod(os.path.join(dirpath, name[4:]), 0o600 | 0o020000, os.makedev(0, 0))

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        return lowerdir

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        await asyncio.to_thread(shutil.rmtree, lowerdir, True)

    async def sweep(self) -> list[str]:
        return []


class ThreadedDaemon:
    """clip's Daemon on its own asyncio loop in a thread (signals stay with pytest)."""

    def __init__(self, work: Path, provider: ExtractingProvider) -> None:
        cfg = Config(daemon=DaemonConfig(root=str(work / "root"), address=str(work / "c.sock")))
        self.daemon = Daemon(cfg, provider)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.stop(grace=5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def remote_stack() -> Iterator[tuple[ThreadedDaemon, ExtractingProvider, Containerd, Mounter]]:
    work = Path(tempfile.mkdtemp(prefix="e2e-remote-", dir="/tmp"))
    provider = ExtractingProvider(work / "clip" / "root" / "mnt")
    clip = ThreadedDaemon(work / "clip", provider)
    ctd = Containerd(work / "ctd", clip.daemon.address, clip.daemon.root)
    mounter = Mounter()
    try:
        clip.start()
        ctd.start()
        yield clip, provider, ctd, mounter
    finally:
        mounter.unmount_all()
        ctd.stop()
        clip.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_rpull_uses_remote_layers_without_downloading(
    remote_stack: tuple[ThreadedDaemon, ExtractingProvider, Containerd, Mounter],
    build_test_image: Callable[..., object],
    host_tools_tree: Path,
    registry: RegistryServer,
    tmp_path: Path,
) -> None:
    _clip, provider, ctd, mounter = remote_stack
    l2 = tmp_path / "l2"
    (l2 / "app").mkdir(parents=True)
    (l2 / "app" / "msg").write_text("served lazily\n")
    (l2 / "bin").mkdir()
    (l2 / "bin" / ".wh.ls").write_text("")
    image = build_test_image([host_tools_tree, l2], "e2e/remote")
    ref, layers = image.ref, image.layer_digests  # type: ignore[attr-defined]

    subprocess.run(
        ["ctr-remote", "--address", str(ctd.socket), "--namespace", "clip-e2e",
         "image", "rpull", "--plain-http", "--snapshotter", "clip", ref],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert provider.prepared == layers
    content = ctd.ctr("content", "ls", "-q").stdout.split()
    assert not set(layers) & set(content), "containerd downloaded a remote layer"

    out = ctd.run("--rm", "--snapshotter", "clip", ref, "r1", "/bin/sh", "-c",
                  "cat /app/msg; test -e /bin/ls || echo ls-removed")  # fmt: skip
    assert out.stdout.splitlines() == ["served lazily", "ls-removed"]

    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    for snapshotter in ("clip", "overlayfs"):
        ctd.ctr("containers", "create", "--snapshotter", snapshotter, ref, f"c-{snapshotter}")
        target = tmp_path / f"rootfs-{snapshotter}"
        target.mkdir()
        lines = ctd.ctr("snapshots", "--snapshotter", snapshotter, "mounts", str(target),
                        f"c-{snapshotter}").stdout.strip().splitlines()  # fmt: skip
        for line in lines:
            _, _, mtype, source, _t, _, options = line.split(" ", 6)
            mounter.mount(Mount(mtype, source, tuple(options.split(","))), target)
    assert snapfs.tree(tmp_path / "rootfs-clip") == snapfs.tree(tmp_path / "rootfs-overlayfs")
