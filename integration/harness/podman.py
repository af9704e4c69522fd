"""podman on a private storage root, and a Debian base image made with debootstrap.

There is no Docker engine on the test machines and Docker Hub is out of reach, so the image
tests build the repository's Dockerfile with Debian's podman (4.3) on a base image made here
from the Debian archive. Every podman call of a test goes to its own storage root and run root
under the test's directory: the test cannot see or touch anyone else's images or containers,
and it removes what it created by ID, then the storage itself.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from integration.harness.containerd import unmount_under

# debootstrap output outlives one test run: building it takes a good part of a minute.
BASE_CACHE_DIR = Path(os.environ.get("CLIP_TEST_CACHE_DIR", "/var/cache/clip-test"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# CAs this machine trusts beyond Debian's bundle (a TLS-inspecting egress proxy, a site CA).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
# podman 4.3 lowers its own RLIMIT_NPROC to this when it cannot raise it, and runc cannot give
# a container more than podman has without CAP_SYS_RESOURCE (see PodmanStore.limits).
PODMAN_NPROC = 32768


class PodmanError(RuntimeError):
    """A podman command failed; the message holds the command and its stderr."""


class PodmanStore:
    """podman with ``--root``/``--runroot``/``--tmpdir`` under ``workdir``; tracks what it made."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.images: list[str] = []
        self.containers: list[str] = []

    def command(self, *args: str) -> list[str]:
        storage = [f"--{name}={self.workdir / name}" for name in ("root", "runroot", "tmpdir")]
        return ["podman", *storage, "--storage-driver=overlay", *args]

    def run(
        self, *args: str, timeout: float = 120, stdin: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one podman command; raise PodmanError with its stderr when it fails."""
        done = subprocess.run(
            self.command(*args), capture_output=True, text=True, timeout=timeout, stdin=stdin
        )
        if done.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    @staticmethod
    def limits() -> list[str]:
        """--ulimit flags a container can actually get here.

        podman asks runc for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC 4194304 by default; without
        CAP_SYS_RESOURCE (containers, sandboxes) raising past the caller's hard limit is EPERM
        and runc fails with "error setting rlimit type 7". These are the caller's own limits.
        """
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else min(nofile, 1 << 20)
        nproc = PODMAN_NPROC if nproc == resource.RLIM_INFINITY else min(nproc, PODMAN_NPROC)
        return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]

    def import_tarball(self, tarball: Path, reference: str, changes: Sequence[str] = ()) -> str:
        """``podman import`` a root filesystem tarball; returns the image ID."""
        flags = [f"--change={change}" for change in changes]
        done = self.run("import", "--quiet", *flags, str(tarball), reference)
        image = done.stdout.strip().removeprefix("sha256:")
        self.images.append(image)
        return image

    def build(self, context: Path, tag: str, build_args: dict[str, str], timeout: float) -> str:
        """``podman build`` the context's Dockerfile in Docker format; returns the image ID.

        Docker format, as `docker build` makes it: OCI image configs have no HEALTHCHECK.
        RUN steps use the host's network (no bridge or NAT to set up for apt and pip).
        """
        iidfile = self.workdir / f"iid-{len(self.images)}"
        args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        self.run(
            "build", "--format=docker", "--network=host", "--layers=false", *self.limits(),
            *args, f"--iidfile={iidfile}", f"--tag={tag}", str(context),
            timeout=timeout,
        )  # fmt: skip
        image = iidfile.read_text().strip().removeprefix("sha256:")
        self.images.append(image)
        return image

    def start(self, image: str, options: Sequence[str], args: Sequence[str] = ()) -> str:
        """``podman run --detach``; returns the container ID."""
        done = self.run("run", "--detach", *self.limits(), *options, image, *args)
        container = done.stdout.strip()
        self.containers.append(container)
        return container

    def remove_container(self, container: str) -> None:
        """``podman rm --force`` by ID (SIGTERM, SIGKILL after 10 s); it is forgotten either way."""
        if container in self.containers:
            self.containers.remove(container)
        subprocess.run(
            self.command("rm", "--force", "--time=10", container),
            capture_output=True, timeout=120,
        )  # fmt: skip

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format={{.Size}}", image).stdout)

    def cleanup(self) -> None:
        """Remove this store's containers and images by ID, then the store itself.

        Every step is attempted even when an earlier one failed. overlay leaves the storage's
        own bind mount (and, after a crash, container roots) mounted under ``workdir``: they
        are unmounted by path before the directory goes.
        """
        for container in reversed(self.containers):
            self.remove_container(container)
        for image in reversed(self.images):
            subprocess.run(self.command("rmi", "--force", image), capture_output=True, timeout=120)
        self.containers.clear()
        self.images.clear()
        unmount_under(self.workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _local_cas() -> list[Path]:
    return sorted(LOCAL_CA_DIR.glob("**/*.crt")) if LOCAL_CA_DIR.is_dir() else []


def base_tarball_name(suite: str, today: datetime.date) -> str:
    """Cache key: the suite, the day (the archive moves), and the local CAs baked in."""
    digest = hashlib.sha256()
    for ca in _local_cas():
        digest.update(ca.read_bytes())
    return f"debian-{suite}-minbase-{today.isoformat()}-{digest.hexdigest()[:12]}.tar"


def debian_base_tarball(suite: str = "bookworm", cache_dir: Path = BASE_CACHE_DIR) -> Path:
    """A minbase Debian root filesystem as a tarball, from the cache or made now.

    debootstrap --variant=minbase with ca-certificates, plus this machine's local CAs (as a
    site's own base image would carry them: pip and apt in the build go through the same
    egress as the host). apt lists and downloaded .debs are dropped; the builder runs apt-get
    update anyway. Tarballs of other days are deleted when a new one is written.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = base_tarball_name(suite, datetime.date.today())
    tarball = cache_dir / name
    if tarball.is_file():
        return tarball
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=cache_dir))
    try:
        rootfs = work / "rootfs"
        _debootstrap(suite, rootfs)
        partial = work / name
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        for old in cache_dir.glob(f"debian-{suite}-minbase-*.tar"):
            if old.name != name:  # a parallel run may just have written today's
                old.unlink(missing_ok=True)
        partial.rename(tarball)
    finally:
        unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def _debootstrap(suite: str, rootfs: Path) -> None:
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=ca-certificates", suite, str(rootfs),
         DEBIAN_MIRROR],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap {suite} failed: {done.stdout[-2000:]}{done.stderr}")
    cas = _local_cas()
    if cas:
        target = rootfs / LOCAL_CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for ca in cas:
            shutil.copy(ca, target / ca.name)
        subprocess.run(
            ["chroot", str(rootfs), "update-ca-certificates"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file():
                path.unlink()
