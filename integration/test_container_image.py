"""The repository's Dockerfile, built and run for real with podman.

No Docker engine runs on the test machines and Docker Hub is out of reach, so the base image is
made here: debootstrap's minbase Debian bookworm (cached per day under /var/cache/clip-test),
imported into a podman storage root of this module's own, passed to the build as
``--build-arg BASE=localhost/clip-base:bookworm``. The Dockerfile then takes its
"plain Debian base" path (Debian's python3 in both stages) instead of python:3.11-slim's
/usr/local CPython; everything else — the two stages, the packages, the venv, the entrypoint,
command and healthcheck — is what a `docker build` runs.

Checked: the image prints clip's version; its default command serves on the host's /dev/fuse
with a root, socket and config directory mounted as docs/deploy.md says; from the host,
`clip status` over the mounted socket sees the daemon up and FUSE mounted, and the FUSE mount
is visible on the host through the rshared root; the image's HEALTHCHECK passes; `podman stop`
(SIGTERM) ends clip with exit 0 and leaves no mount under the root. Image size and build time
are printed (`pytest -s`), not asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.harness.containerd import unmount_under
from integration.harness.podman import PodmanStore, debian_base_tarball
from snapshotter import __version__

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BASE_REF = "localhost/clip-base:bookworm"
IMAGE_REF = f"localhost/clip-test:{__version__}"
# The image's default command uses these paths inside the container (Dockerfile CMD).
ROOT_IN_CONTAINER = "/var/lib/clip"
SOCKET_NAME = "clip.sock"


@dataclass(frozen=True)
class BuiltImage:
    store: PodmanStore
    image: str


@pytest.fixture(scope="module")
def built() -> Iterator[BuiltImage]:
    """Base tarball (cached) -> podman import -> podman build; all removed afterwards."""
    for tool in ("podman", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed (Debian package {tool})"
    store = PodmanStore(Path(tempfile.mkdtemp(prefix="clip-podman-", dir="/tmp")))
    try:
        started = time.monotonic()
        tarball = debian_base_tarball()
        based = time.monotonic()
        store.import_tarball(tarball, BASE_REF)
        imported = time.monotonic()
        image = store.build(REPO, IMAGE_REF, {"BASE": BASE_REF}, timeout=900)
        done = time.monotonic()
        size = store.image_size(image)
        print(
            f"\nimage: base tarball {based - started:.1f} s ({tarball.name}), "
            f"import {imported - based:.1f} s, build {done - imported:.1f} s, "
            f"size {size / 1e6:.1f} MB ({size} bytes), base image "
            f"{store.image_size(BASE_REF) / 1e6:.1f} MB"
        )
        yield BuiltImage(store, image)
    finally:
        store.cleanup()


def test_image_prints_clips_version(built: BuiltImage) -> None:
    done = built.store.run("run", "--rm", "--network=none", *built.store.limits(),
                           built.image, "--version")  # fmt: skip
    assert done.stdout.strip() == f"clip {__version__}"


def test_image_runtime_has_clip_and_pyfuse3_but_no_compiler(built: BuiltImage) -> None:
    """PATH finds the venv's console script first; pyfuse3 loads against libfuse3-3 alone."""
    script = (
        "command -v clip; command -v gcc cc || true; python3 -c 'import pyfuse3'; "
        "du -sk /opt/clip /var/cache/apt /var/lib/apt/lists"
    )
    done = built.store.run("run", "--rm", "--network=none", *built.store.limits(),
                           "--entrypoint=sh", built.image, "-c", script)  # fmt: skip
    first, *sizes = done.stdout.splitlines()
    assert first == "/opt/clip/bin/clip"
    kib = {path: int(size) for size, path in (line.split() for line in sizes)}
    print(f"\nimage: venv {kib['/opt/clip'] / 1024:.1f} MiB, apt caches "
          f"{kib['/var/cache/apt']} KiB, apt lists {kib['/var/lib/apt/lists']} KiB")  # fmt: skip
    # pip and setuptools left the venv in the builder.
    listing = built.store.run("run", "--rm", "--network=none", *built.store.limits(),
                              "--entrypoint=ls", built.image, "/opt/clip/bin").stdout  # fmt: skip
    assert "clip" in listing.split() and "pip" not in listing.split()


@dataclass(frozen=True)
class HostDirs:
    root: Path
    run: Path
    etc: Path


@pytest.fixture
def host_dirs() -> Iterator[HostDirs]:
    """Root, socket and config directories on the host; the root is a shared mount point.

    `-v ROOT:/var/lib/clip:rshared` only carries the container's FUSE mount back to the host
    when the host side is itself shared; / is private here (and on many hosts), so the root is
    bind-mounted onto itself and made shared — undone by path afterwards.
    """
    work = Path(tempfile.mkdtemp(prefix="clip-image-", dir="/tmp"))
    dirs = HostDirs(work / "root", work / "run", work / "etc")
    for path in (dirs.root, dirs.run, dirs.etc):
        path.mkdir()
    shutil.copy(REPO / "config" / "clip.toml", dirs.etc / "clip.toml")
    try:
        subprocess.run(["mount", "--bind", str(dirs.root), str(dirs.root)], check=True)
        subprocess.run(["mount", "--make-shared", str(dirs.root)], check=True)
        yield dirs
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


def _mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount strictly below ``path`` on the host."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            fstype = fields[fields.index("-") + 1]
            if point.startswith(f"{path}/"):
                found.append((point, fstype))
    return found


def _status(socket: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snapshotter", "status", "--address", str(socket), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _wait_for_status(store: PodmanStore, container: str, socket: Path) -> dict[str, object]:
    """Poll `clip status` from the host until the daemon answers or the container is gone."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = _status(socket)
        if result.returncode == 0:
            report: dict[str, object] = json.loads(result.stdout)
            return report
        state = store.run("inspect", "--format={{.State.Status}}", container).stdout.strip()
        if state != "running":
            break
        time.sleep(0.5)
    done = store.run("logs", container)
    logs = done.stdout + done.stderr
    raise AssertionError(f"clip in the container never answered on {socket}: {logs[-3000:]}")


def test_image_serves_with_host_fuse_root_and_socket(
    built: BuiltImage, host_dirs: HostDirs
) -> None:
    store = built.store
    options = [
        "--privileged",
        "--device=/dev/fuse",
        "--network=none",
        f"--volume={host_dirs.root}:{ROOT_IN_CONTAINER}:rshared",
        f"--volume={host_dirs.run}:/run/clip",
        f"--volume={host_dirs.etc}:/etc/clip:ro",
    ]
    started = time.monotonic()
    container = store.start(built.image, options)  # the image's own CMD: clip serve ...
    try:
        _check_serving(store, container, host_dirs, started)
    finally:
        store.remove_container(container)


def _check_serving(store: PodmanStore, container: str, dirs: HostDirs, started: float) -> None:
    report = _wait_for_status(store, container, dirs.run / SOCKET_NAME)
    print(f"\nimage: clip serve answered `clip status` {time.monotonic() - started:.1f} s "
          "after podman run")  # fmt: skip

    assert report["version"] == __version__
    assert report["root"] == ROOT_IN_CONTAINER
    # the kernel (6.12+) mounts file-backed EROFS inside the container too: layers are served
    # by EROFS images, the FUSE mount carries their streams
    assert report["fuse"] == {
        "mounted": True, "mountpoint": f"{ROOT_IN_CONTAINER}/mnt", "fs_mode": "erofs",
        "direct_io": True}
    # The container's FUSE mount reached the host through the rshared root.
    fuse = [(p, t) for p, t in _mounts_under(dirs.root) if p == f"{dirs.root}/mnt"]
    assert len(fuse) == 1 and fuse[0][1].startswith("fuse"), _mounts_under(dirs.root)
    # The Dockerfile's HEALTHCHECK (clip status in the container) passes.
    store.run("healthcheck", "run", container)

    store.run("stop", "--time=30", container, timeout=60)
    exit_code = store.run("inspect", "--format={{.State.ExitCode}}", container).stdout.strip()
    assert exit_code == "0", store.run("logs", container).stderr[-3000:]
    assert _mounts_under(dirs.root) == []
    assert _status(dirs.run / SOCKET_NAME).returncode == 1
