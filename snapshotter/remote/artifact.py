"""Clip indexes as an OCI artifact attached to their image (`clip index push`), and lookup.

Layout (docs/cluster.md has the full description): one OCI image manifest

    mediaType     application/vnd.oci.image.manifest.v1+json
    artifactType  application/vnd.clip.index.v1
    config        the OCI empty descriptor (application/vnd.oci.empty.v1+json, `{}`)
    layers        per image layer: its clip index (application/vnd.clip.index.v1) and, when
                  known, its start profile (application/vnd.clip.start-profile.v1+json), each
                  annotated `io.clip.layer.digest: <layer digest>`
    subject       the image manifest (platform manifest) the indexes belong to

pushed to the image's repository under the tag `sha256-<manifest hex>.clip`. Registries that
implement the OCI 1.1 referrers API also list it as a referrer of the image through `subject`;
lookups ask the referrers API first and fall back to the tag (Debian's docker-registry 2.8 has
no referrers API and ignores `subject`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.errors import ClipError, InvalidArgument, NotFound
from snapshotter.index import IndexFormatError, LayerIndex
from snapshotter.registry import RegistryClient
from snapshotter.registry import mediatypes as mt
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.registry.types import Descriptor
from snapshotter.remote.build import build_from_registry, index_of_blob
from snapshotter.remote.profile import PROFILE_MEDIA_TYPE
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.clip.index.v1"
INDEX_MEDIA_TYPE = "application/vnd.clip.index.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
LAYER_ANNOTATION = "io.clip.layer.digest"


def artifact_tag(manifest_digest: str) -> str:
    """The fallback tag of an image manifest's index artifact: `sha256-<hex>.clip`."""
    algo, _, hexd = manifest_digest.partition(":")
    if not hexd:
        raise InvalidArgument(f"{manifest_digest!r} is not a manifest digest")
    return f"{algo}-{hexd}.clip"


@dataclass
class LayerArtifacts:
    """What the artifact holds for one layer."""

    index: Descriptor
    profile: Descriptor | None = None


@dataclass
class Artifact:
    """A found artifact: its repository reference and the per-layer descriptors."""

    ref: Reference
    layers: dict[str, LayerArtifacts] = field(default_factory=dict)

    async def index(self, client: RegistryClient, digest: str) -> LayerIndex | None:
        """The layer's index from the artifact, checked to be an index of that very blob."""
        entry = self.layers.get(digest)
        if entry is None:
            return None
        data = await client.fetch_blob(self.ref, entry.index.digest, size=entry.index.size)
        return index_of_blob(lambda: LayerIndex.from_bytes(data), digest, "artifact index")

    async def profile(self, client: RegistryClient, digest: str) -> bytes | None:
        entry = self.layers.get(digest)
        if entry is None or entry.profile is None:
            return None
        return await client.fetch_blob(self.ref, entry.profile.digest, size=entry.profile.size)


async def find_artifact(
    client: RegistryClient, ref: str, manifest_digest: str
) -> Artifact | None:
    """The index artifact attached to `manifest_digest` in `ref`'s repository, or None."""
    r = parse_reference(ref)
    data = await _from_referrers(client, r, manifest_digest)
    if data is None:
        try:
            data, _, _ = await client.fetch_manifest(
                r, artifact_tag(manifest_digest), optional=True
            )
        except NotFound:
            TELEMETRY.index_fetch("registry", "miss")
            return None
    try:
        artifact = _parse(r, data)
    except (ValueError, InvalidArgument) as exc:
        log.warning("ignoring the clip index artifact of %s: %s", manifest_digest, exc)
        TELEMETRY.index_fetch("registry", "error")
        return None
    TELEMETRY.index_fetch("registry", "hit")
    return artifact


async def _from_referrers(
    client: RegistryClient, r: Reference, manifest_digest: str
) -> bytes | None:
    """The artifact manifest through the OCI referrers API; None when unsupported or absent."""
    try:
        body = await client.fetch_referrers(r, manifest_digest, ARTIFACT_TYPE)
        listing = json.loads(body) if body is not None else None
    except (ClipError, ValueError):
        return None
    if not isinstance(listing, dict):
        return None
    for entry in listing.get("manifests") or []:
        if isinstance(entry, dict) and entry.get("artifactType") == ARTIFACT_TYPE:
            data, _, _ = await client.fetch_manifest(r, str(entry.get("digest")))
            return data
    return None


def _parse(r: Reference, data: bytes) -> Artifact:
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
        raise InvalidArgument("not a clip index artifact")
    artifact = Artifact(r)
    for i, raw in enumerate(doc.get("layers") or []):
        desc = Descriptor.from_json(raw, f"clip index artifact layer {i}")
        layer = desc.annotations.get(LAYER_ANNOTATION, "")
        if desc.media_type == INDEX_MEDIA_TYPE and layer:
            artifact.layers.setdefault(layer, LayerArtifacts(desc)).index = desc
        elif desc.media_type == PROFILE_MEDIA_TYPE and layer in artifact.layers:
            artifact.layers[layer].profile = desc
    return artifact


# --- clip index push -------------------------------------------------------------------------


@dataclass
class PushResult:
    tag: str
    manifest_digest: str
    artifact_digest: str
    layers: int
    profiles: int


async def push_indexes(client: RegistryClient, ref: str, root: Path | None) -> PushResult:
    """Build (or take from `<root>/indexes`) every layer's index of `ref` and push them as the
    image's index artifact. Start profiles found in `<root>/indexes` are included."""
    image = await client.resolve(ref)
    r = image.ref
    layers: list[dict[str, object]] = []
    profiles = 0
    with tempfile.TemporaryDirectory(prefix="clip-push-") as tmp:
        for layer in image.layers:
            hexd = layer.digest.removeprefix("sha256:")
            index_path = _local(root, hexd, layer.digest) or Path(tmp) / hexd
            if not index_path.exists():
                await build_from_registry(client, str(image.pinned), layer.digest, index_path)
            layers.append(await _push_part(client, r, index_path, INDEX_MEDIA_TYPE, layer.digest))
            profile = root / "indexes" / f"{hexd}.profile" if root is not None else None
            if profile is not None and profile.is_file():
                part = await _push_part(client, r, profile, PROFILE_MEDIA_TYPE, layer.digest)
                layers.append(part)
                profiles += 1
    await client.push_blob(r, EMPTY_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": _sha256(EMPTY_CONFIG), "size": 2},
        "layers": layers,
        "subject": {
            "mediaType": image.media_type,
            "digest": image.manifest_digest,
            "size": len(image.manifest_bytes),
        },
        "annotations": {"io.clip.image.ref": str(r)},
    }
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    tag = artifact_tag(image.manifest_digest)
    digest = await client.push_manifest(r, data, mt.OCI_MANIFEST, reference=tag)
    return PushResult(tag, image.manifest_digest, digest, len(image.layers), profiles)


def _local(root: Path | None, hexd: str, digest: str) -> Path | None:
    """A valid index of `digest` in the node's store, if there is one."""
    if root is None:
        return None
    path = root / "indexes" / hexd
    try:
        if LayerIndex.open(path).blob_digest == digest:
            return path
    except (IndexFormatError, OSError):
        pass
    return None


async def _push_part(
    client: RegistryClient, r: Reference, path: Path, media_type: str, layer: str
) -> dict[str, object]:
    desc = await client.push_blob(r, path)
    return {
        "mediaType": media_type,
        "digest": desc.digest,
        "size": desc.size,
        "annotations": {LAYER_ANNOTATION: layer},
    }


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


__all__ = [
    "ARTIFACT_TYPE",
    "Artifact",
    "PushResult",
    "artifact_tag",
    "find_artifact",
    "push_indexes",
]
