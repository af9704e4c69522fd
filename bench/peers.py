"""Other lazy snapshotters in the same run: stargz-snapshotter (issue 14).

Debian ships stargz-snapshotter's Go library and ``ctr-remote``, not its daemon, so the
benchmark builds its own small daemon from ``bench/stargz/main.go`` (GOPATH mode, offline,
against Debian's Go sources in /usr/share/gocode) and caches the binary under
``<work>/stargz/build`` keyed by the source's and the toolchain's hash. It converts each bench
image to eStargz with ``ctr-remote image convert --estargz --oci`` at the originals' gzip level,
in a converter containerd whose store persists under ``<work>/stargz/convert`` (so a rerun only
pushes), and pushes the result beside the original as ``bench/<name>:esgz``.

Anything that fails here is returned as one line for the report; the rest of the benchmark
runs without the stargz setups.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from bench.images import PushedImage, say
from integration.harness.clipd import ClipDaemon
from integration.harness.containerd import Containerd
from integration.harness.images import BuiltImage

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "stargz"
BINARY_NAME = "stargz-bench-snapshotter"
# integration.harness.images writes every gzip layer at this level (GzipFile compresslevel).
ORIGINAL_GZIP_LEVEL = 6
ESGZ_TAG = "esgz"
CONVERT_NAMESPACE = "esgz-convert"
# Debian packages whose Go sources the daemon is compiled from (part of the cache key).
GO_PACKAGES = (
    "golang-github-containerd-stargz-snapshotter-dev",
    "golang-github-containerd-containerd-dev",
)
GO_ENV = {
    "GO111MODULE": "off",  # Debian's Go libraries are a GOPATH tree, no module proxy here
    "GOFLAGS": "",
    "GOPROXY": "off",
    "CGO_ENABLED": "0",
}


@dataclass(frozen=True)
class Built:
    """The daemon binary, or why there is none (exactly one of the two is set)."""

    binary: Path | None
    error: str = ""


def _source_key(source: Path) -> str:
    """Hash of the daemon's Go sources, the toolchain and the Debian Go libraries it is built
    against: the build cache's key."""
    digest = hashlib.sha256()
    for path in sorted(source.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    versions = subprocess.run(
        ["dpkg-query", "-W", *GO_PACKAGES], capture_output=True, text=True
    ).stdout
    go = shutil.which("go")
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout if go else ""
    digest.update((versions + version).encode())
    return digest.hexdigest()[:16]


def build_daemon(work: Path, source: Path = SOURCE) -> Built:
    """Build (or reuse) the stargz daemon from ``source``; a missing toolchain or library or a
    compile error is returned as the reason, never raised."""
    if shutil.which("go") is None:
        return Built(None, "no Go toolchain (`make bench-deps` installs it)")
    out = (work / "stargz" / "build").resolve()  # GOPATH entries must be absolute
    binary = out / f"{BINARY_NAME}-{_source_key(source)}"
    if binary.exists():
        return Built(binary)
    out.mkdir(parents=True, exist_ok=True)
    say(f"  building {BINARY_NAME} (Go, GOPATH mode, once per source change) ...")
    env = {
        **os.environ,
        **GO_ENV,
        "GOPATH": f"/usr/share/gocode:{out / 'gopath'}",
        "GOCACHE": str(out / "gocache"),
    }
    tmp = binary.with_suffix(".part")
    result = subprocess.run(
        ["go", "build", "-o", str(tmp), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        # go prints "# <package>" before the first real error line.
        lines = [line for line in result.stderr.splitlines() if line and line[0] != "#"]
        return Built(None, f"building {source} failed: {(lines or ['(no output)'])[0]}")
    tmp.rename(binary)
    for stale in out.glob(f"{BINARY_NAME}-*"):
        if stale != binary:
            stale.unlink()
    return Built(binary)


class StargzDaemon(ClipDaemon):
    """The bench's stargz daemon on ``<workdir>/root`` and ``<workdir>/run/clip.sock``.

    It reuses the harness's process handling (start waits for the snapshot API to answer,
    stop is SIGTERM then SIGKILL by PID); only the command differs. The socket keeps the
    harness's file name because the harness's containerd registers whatever listens there as
    its proxy plugin ``clip``: on a stargz node that plugin name points at this daemon.
    """

    def __init__(self, binary: Path, workdir: Path) -> None:
        super().__init__(workdir, log_level="warning")
        self.binary = binary

    def start(self, timeout: float = 30.0) -> None:
        try:
            super().start(timeout)
        except RuntimeError as exc:  # the harness's message names clip serve
            raise RuntimeError(str(exc).replace("clip serve", BINARY_NAME, 1)) from None

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "-address",
            str(self.socket),
            "-root",
            str(self.root),
            "-log-level",
            self.log_level,
        ]


def rpull(containerd: Containerd, namespace: str, ref: str, plugin: str) -> None:
    """``ctr-remote image rpull``: fetch manifest and config, mount every layer lazily."""
    cmd = ["ctr-remote", "--address", str(containerd.socket), "--namespace", namespace,
           "images", "rpull", "--plain-http", "--snapshotter", plugin, ref]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"ctr-remote rpull {ref}: {result.stderr.strip()}")


# ------------------------------------------------------------------------------- conversion


class Converter:
    """A containerd whose content store persists under ``<work>/stargz/convert``.

    Converted images are kept there under a local name that carries the original manifest's
    digest and the gzip level, so a rerun with unchanged images converts nothing.
    """

    def __init__(self, work: Path) -> None:
        base = (work / "stargz" / "convert").resolve()
        # No proxy plugin is used here; the harness's config names one, which is never dialed.
        self.containerd = Containerd(base, base / "unused.sock", base / "unused")

    def __enter__(self) -> Converter:
        self.containerd.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.containerd.stop()

    def _ctr(self, *args: str) -> str:
        cmd = ["ctr-remote", "--address", str(self.containerd.socket),
               "--namespace", CONVERT_NAMESPACE, *args]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[5:8])}: {result.stderr.strip()}")
        return result.stdout

    def _images(self) -> dict[str, str]:
        """Local image name -> manifest digest."""
        rows = self._ctr("images", "ls").splitlines()[1:]
        return {row.split()[0]: row.split()[2] for row in rows if row.strip()}

    def convert_and_push(self, pushed: PushedImage, registry_host: str) -> PushedImage:
        """The eStargz twin of ``pushed`` in the registry as ``bench/<name>:esgz``."""
        src = pushed.image
        local = f"esgz/{pushed.spec.name}:{src.manifest_digest[7:23]}-gz{ORIGINAL_GZIP_LEVEL}"
        if local not in self._images():
            say(f"  converting {pushed.spec.name} to eStargz (gzip -{ORIGINAL_GZIP_LEVEL}) ...")
            self._ctr("content", "fetch", "--plain-http", src.ref)
            self._ctr("images", "convert", "--estargz", "--oci",
                      "--estargz-compression-level", str(ORIGINAL_GZIP_LEVEL),
                      src.ref, local)  # fmt: skip
        target = f"{registry_host}/{src.repo}:{ESGZ_TAG}"
        self._ctr("images", "push", "--plain-http", target, local)
        return replace(pushed, image=self._built(local, target, src))

    def _built(self, local: str, target: str, src: BuiltImage) -> BuiltImage:
        """What was pushed, read from the converter's content store."""
        blobs = self.containerd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        digest = self._images()[local]
        manifest = json.loads((blobs / digest[7:]).read_bytes())
        if "layers" not in manifest:
            raise RuntimeError(f"{local}: converted to an index, expected one manifest")
        layers = manifest["layers"]
        registry_host, _, _ = target.partition("/")
        return BuiltImage(
            registry_host=registry_host,
            repo=src.repo,
            tag=ESGZ_TAG,
            ref=target,
            manifest_digest=digest,
            config_digest=manifest["config"]["digest"],
            layer_digests=[d["digest"] for d in layers],
            layer_sizes=[d["size"] for d in layers],
            # The TOC and footer add little; the read-set estimate keeps the original's ratios.
            uncompressed_sizes=src.uncompressed_sizes,
            layer_blobs=[blobs / d["digest"][7:] for d in layers],
            layer_media_types=[d["mediaType"] for d in layers],
        )


def convert_all(
    work: Path, pushed: list[PushedImage], registry_host: str
) -> dict[str, PushedImage]:
    """eStargz twins of ``pushed`` by image name (the converter is stopped by PID on return)."""
    with Converter(work) as converter:
        return {p.spec.name: converter.convert_and_push(p, registry_host) for p in pushed}
