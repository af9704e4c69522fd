"""Build OCI images from directory trees and push them to a test registry, byte for byte.

Layers are real tar files made by GNU tar (``tool="gnu"``, with PAX xattrs, devices, fifos,
hardlinks) or by Python's tarfile (``tool="python"``), compressed with gzip, zstd or not at all.
The pusher speaks the distribution API directly so the registry receives exactly the blobs that
were built; digests in :class:`BuiltImage` therefore describe what a client will download.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tarfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
CHUNK = 1 << 20


@dataclass
class BuiltImage:
    """What was pushed: enough for a test to compare a client's view with the truth."""

    registry_host: str
    repo: str
    tag: str
    ref: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    layer_sizes: list[int]
    uncompressed_sizes: list[int]
    layer_blobs: list[Path]
    platform: str = "linux/amd64"
    manifest_size: int = 0
    layer_media_types: list[str] = field(default_factory=list)

    @property
    def compressed_total(self) -> int:
        return sum(self.layer_sizes)


# ---------------------------------------------------------------- layers


def make_layer_tar(tree: Path, out: Path, *, compression: str = "gzip", tool: str = "gnu") -> Path:
    """Archive ``tree``'s contents (names relative to it, sorted) into a compressed layer.

    Output is deterministic for a given tree (no gzip name/mtime, sorted entries), so tests can
    rebuild an image and get the same digests.
    """
    if compression not in LAYER_MEDIA_TYPES:
        raise ValueError(f"unknown compression {compression!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name(out.name + ".tar.tmp")
    if tool == "gnu":
        _gnu_tar(tree, raw)
    elif tool == "python":
        _python_tar(tree, raw)
    else:
        raise ValueError(f"unknown tar tool {tool!r}")
    try:
        _compress(raw, out, compression)
    finally:
        raw.unlink(missing_ok=True)
    return out


def _gnu_tar(tree: Path, raw: Path) -> None:
    names = sorted(os.listdir(tree))
    cmd = [
        "tar",
        "--format=pax",
        "--numeric-owner",
        "--sort=name",
        "--xattrs",
        "--xattrs-include=*",
        "--pax-option=delete=atime,delete=ctime",
        "-C",
        str(tree),
        "-cf",
        str(raw),
    ]
    if names:
        cmd += ["--", *names]
    else:
        cmd += ["--files-from=/dev/null"]
    subprocess.run(cmd, check=True, capture_output=True)


def _python_tar(tree: Path, raw: Path) -> None:
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk_sorted(tree):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(tree).as_posix())
            info.uname = info.gname = ""
            xattrs = _xattrs(path)
            if xattrs:
                info.pax_headers = dict(info.pax_headers, **xattrs)
            if info.isreg():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def _walk_sorted(root: Path) -> Iterator[Path]:
    for name in sorted(os.listdir(root)):
        path = root / name
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk_sorted(path)


def _xattrs(path: Path) -> dict[str, str]:
    """PAX ``SCHILY.xattr.*`` records; binary values survive via surrogateescape."""
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in sorted(names):
        value = os.getxattr(path, name, follow_symlinks=False)
        out[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return out


def _compress(raw: Path, out: Path, compression: str) -> None:
    with raw.open("rb") as src, out.open("wb") as dst:
        if compression == "none":
            shutil.copyfileobj(src, dst, CHUNK)
        elif compression == "gzip":
            with gzip.GzipFile(filename="", mode="wb", fileobj=dst, mtime=0, compresslevel=6) as gz:
                shutil.copyfileobj(src, gz, CHUNK)
        else:
            cctx = zstandard.ZstdCompressor(level=3)
            cctx.copy_stream(src, dst, read_size=CHUNK, write_size=CHUNK)


def _decompressed_sha_and_size(blob: Path) -> tuple[str, int]:
    """The diff_id and uncompressed size of a layer, whatever its compression."""
    digest = hashlib.sha256()
    size = 0
    with blob.open("rb") as fh:
        magic = fh.read(4)
        fh.seek(0)
        if magic[:2] == b"\x1f\x8b":
            stream: Any = gzip.GzipFile(fileobj=fh, mode="rb")
        elif magic == b"\x28\xb5\x2f\xfd":
            stream = zstandard.ZstdDecompressor().stream_reader(fh)
        else:
            stream = fh
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _media_type_of(blob: Path) -> str:
    with blob.open("rb") as fh:
        magic = fh.read(4)
    if magic[:2] == b"\x1f\x8b":
        return LAYER_MEDIA_TYPES["gzip"]
    if magic == b"\x28\xb5\x2f\xfd":
        return LAYER_MEDIA_TYPES["zstd"]
    return LAYER_MEDIA_TYPES["none"]


# ---------------------------------------------------------------- OCI layout


def _platform_dict(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _write_blob(oci_dir: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = oci_dir / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def build_image(
    layers: list[Path],
    workdir: Path,
    *,
    platform: str = "linux/amd64",
    cmd: list[str] | None = None,
    env: list[str] | None = None,
) -> Path:
    """Write an OCI image layout in ``workdir`` (tag ``latest``); layers are compressed tars."""
    oci_dir = Path(workdir)
    blobs = oci_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for layer in layers:
        digest = _file_digest(layer)
        target = blobs / digest.split(":", 1)[1]
        if not target.exists():
            shutil.copyfile(layer, target)
        diff_ids.append(_decompressed_sha_and_size(layer)[0])
        layer_descs.append(
            {"mediaType": _media_type_of(layer), "digest": digest, "size": layer.stat().st_size}
        )
    plat = _platform_dict(platform)
    config: dict[str, Any] = {
        **plat,
        "created": "2026-01-01T00:00:00Z",
        "config": {
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd or ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "clip test"}],
    }
    config_digest, config_size = _write_blob(oci_dir, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    }
    manifest_digest, manifest_size = _write_blob(oci_dir, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": plat,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (oci_dir / "index.json").write_bytes(_canonical(index))
    (oci_dir / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return oci_dir


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------- pushing


class _Pusher:
    """Minimal distribution-API uploader (monolithic PUT) with optional basic auth."""

    def __init__(self, registry_host: str, repo: str, auth: tuple[str, str] | None) -> None:
        self.host = registry_host
        self.repo = repo
        self.headers: dict[str, str] = {}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.host, timeout=120)
        conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    def has_blob(self, digest: str) -> bool:
        return self._request("HEAD", f"/v2/{self.repo}/blobs/{digest}").status == 200

    def push_blob(self, path: Path, digest: str) -> None:
        if self.has_blob(digest):
            return
        resp = self._request("POST", f"/v2/{self.repo}/blobs/uploads/")
        if resp.status != 202:
            raise RuntimeError(f"upload start for {digest} to {self.host}: HTTP {resp.status}")
        location = urllib.parse.urlsplit(resp.headers["Location"])
        query = location.query + ("&" if location.query else "") + f"digest={digest}"
        size = path.stat().st_size
        with path.open("rb") as fh:
            resp = self._request(
                "PUT",
                f"{location.path}?{query}",
                body=fh,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        if resp.status != 201:
            raise RuntimeError(f"upload of {digest} to {self.host}: HTTP {resp.status}")

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        resp = self._request(
            "PUT",
            f"/v2/{self.repo}/manifests/{reference}",
            body=data,
            headers={"Content-Type": media_type},
        )
        if resp.status != 201:
            raise RuntimeError(f"manifest {self.repo}:{reference} to {self.host}: {resp.status}")


def push_image(
    oci_dir: Path,
    registry_host: str,
    repo: str,
    tag: str,
    *,
    auth: tuple[str, str] | None = None,
) -> BuiltImage:
    """Push the single image of an OCI layout made by :func:`build_image` under ``tag``."""
    oci_dir = Path(oci_dir)
    index = json.loads((oci_dir / "index.json").read_bytes())
    mdesc = index["manifests"][0]
    blob_dir = oci_dir / "blobs" / "sha256"
    manifest_bytes = (blob_dir / mdesc["digest"].split(":", 1)[1]).read_bytes()
    manifest = json.loads(manifest_bytes)
    pusher = _Pusher(registry_host, repo, auth)
    layer_blobs = [blob_dir / d["digest"].split(":", 1)[1] for d in manifest["layers"]]
    config_digest = manifest["config"]["digest"]
    for desc, path in zip(manifest["layers"], layer_blobs, strict=True):
        pusher.push_blob(path, desc["digest"])
    pusher.push_blob(blob_dir / config_digest.split(":", 1)[1], config_digest)
    pusher.push_manifest(tag, manifest_bytes, manifest["mediaType"])
    plat = mdesc.get("platform", {})
    platform = "/".join(
        p for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p
    )
    return BuiltImage(
        registry_host=registry_host,
        repo=repo,
        tag=tag,
        ref=f"{registry_host}/{repo}:{tag}",
        manifest_digest=mdesc["digest"],
        config_digest=config_digest,
        layer_digests=[d["digest"] for d in manifest["layers"]],
        layer_sizes=[d["size"] for d in manifest["layers"]],
        uncompressed_sizes=[_decompressed_sha_and_size(p)[1] for p in layer_blobs],
        layer_blobs=layer_blobs,
        platform=platform or "linux/amd64",
        manifest_size=len(manifest_bytes),
        layer_media_types=[d["mediaType"] for d in manifest["layers"]],
    )


def push_index(
    images: list[BuiltImage],
    tag: str,
    *,
    auth: tuple[str, str] | None = None,
    media_type: str = OCI_INDEX,
) -> str:
    """Push an image index (manifest list) over already pushed images of one repo; its digest."""
    first = images[0]
    entries = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": img.manifest_digest,
            "size": img.manifest_size,
            "platform": _platform_dict(img.platform),
        }
        for img in images
    ]
    data = _canonical({"schemaVersion": 2, "mediaType": media_type, "manifests": entries})
    _Pusher(first.registry_host, first.repo, auth).push_manifest(tag, data, media_type)
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- host binaries


DEFAULT_BINARIES = ("/bin/sh", "/bin/cat", "/bin/ls", "/bin/echo", "/usr/bin/sha256sum")


def host_rootfs_tree(dest: Path, binaries: list[str] | tuple[str, ...] = DEFAULT_BINARIES) -> Path:
    """Copy host binaries and the shared libraries ``ldd`` names into ``dest`` (same paths).

    There is no busybox image offline; containers in tests run these host binaries instead.
    Symlinked paths (e.g. /bin -> usr/bin on merged-/usr hosts) are copied as real files at
    the path asked for, so the tree works without the host's symlink layout.
    """
    dest = Path(dest)
    files: set[str] = set()
    for binary in binaries:
        files.add(binary)
        files.update(_shared_libraries(binary))
    for path in sorted(files):
        target = dest / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    for sub in ("etc", "tmp", "proc", "sys", "dev"):
        (dest / sub).mkdir(exist_ok=True)
    return dest


def _shared_libraries(binary: str) -> list[str]:
    result = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if result.returncode != 0:  # static binary: ldd says "not a dynamic executable"
        return []
    libs = []
    for line in result.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            idx = parts.index("=>")
            if idx + 1 < len(parts) and parts[idx + 1].startswith("/"):
                libs.append(parts[idx + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])  # the dynamic loader
    return libs
