"""`clip pull`: a lazy pull into containerd through containerd's own API.

What a normal pull does, minus the layer downloads: the manifest (and index) and the image
config go into containerd's content store with the garbage-collection labels containerd uses,
each layer is prepared through containerd's Snapshots service with remote labels so that clip
(as the proxy snapshotter) makes it available lazily and answers ALREADY_EXISTS, and the image
record is created. `ctr run --snapshotter clip REF` then finds the image unpacked (the config
carries ``containerd.io/gc.ref.snapshot.<snapshotter>`` and the chainID snapshot exists) and
starts it without downloading anything more.

Everything is written under a lease that expires on its own, so an interrupted pull leaves
nothing that garbage collection cannot reclaim.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from snapshotter.containerd import ContainerdClient
from snapshotter.errors import FailedPrecondition, InvalidArgument, Unavailable
from snapshotter.registry import RegistryClient
from snapshotter.registry.types import ResolvedImage
from snapshotter.snapshots.remote import CRI_PREFIX, TARGET_LABEL

# containerd validates each label (key + value) against this size (labels.Validate).
MAX_LABEL_BYTES = 4096
LEASE_LIFETIME = datetime.timedelta(hours=1)
# what gRPC says when containerd cannot connect to a proxy plugin's socket
DIAL_FAILURES = ("connection error", "error while dialing", "Error while dialing", "dial unix")


@dataclass(frozen=True)
class PullOptions:
    ref: str
    address: str = "/run/containerd/containerd.sock"
    namespace: str = "default"
    snapshotter: str = "clip"
    platform: str = ""  # empty: this host's platform


@dataclass
class LayerProgress:
    index: int
    digest: str
    size: int
    chain_id: str
    seconds: float = 0.0
    state: str = "waiting"


@dataclass
class PullResult:
    name: str
    manifest_digest: str
    layers: list[LayerProgress] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


ProgressCallback = Callable[[PullResult], None]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chainIDs of a layer stack (OCI image spec: chain(n) = H(chain(n-1) + " " + diff(n)))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chains


def diff_ids_of(image: ResolvedImage) -> list[str]:
    """The uncompressed layer digests from the image config, checked against the manifest."""
    try:
        config: Any = json.loads(image.config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(f"image {image.ref}: config has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArgument(f"image {image.ref}: config rootfs.diff_ids is not a list")
    if len(diff_ids) != len(image.layers):
        raise InvalidArgument(
            f"image {image.ref}: config lists {len(diff_ids)} diff_ids "
            f"for {len(image.layers)} layers"
        )
    return list(diff_ids)


def image_layers_label(key: str, digests: Sequence[str]) -> str:
    """This and the following layer digests, comma separated, cut to containerd's label limit."""
    value = ""
    for digest in digests:
        candidate = f"{value},{digest}" if value else digest
        if len(key) + len(candidate) > MAX_LABEL_BYTES:
            break
        value = candidate
    return value


def layer_labels(image: ResolvedImage, ref: str, index: int, chain_id: str) -> dict[str, str]:
    """The labels containerd's CRI plugin puts on a remote-capable unpack Prepare."""
    layers_key = CRI_PREFIX + "image-layers"
    return {
        TARGET_LABEL: chain_id,
        CRI_PREFIX + "image-ref": ref,
        CRI_PREFIX + "layer-digest": image.layers[index].digest,
        CRI_PREFIX + "manifest-digest": image.manifest_digest,
        layers_key: image_layers_label(layers_key, [d.digest for d in image.layers[index:]]),
    }


def _source_labels(image: ResolvedImage) -> dict[str, str]:
    """containerd's ``distribution.source`` label: which repository the content came from."""
    return {f"containerd.io/distribution.source.{image.ref.registry}": image.ref.repository}


class Puller:
    """One lazy pull; split into steps so each is small and the order is explicit."""

    def __init__(
        self,
        options: PullOptions,
        registry: RegistryClient,
        containerd: ContainerdClient,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.options = options
        self.registry = registry
        self.containerd = containerd
        self.on_progress = on_progress or (lambda _result: None)

    async def run(self) -> PullResult:
        started = time.monotonic()
        image = await self.registry.resolve(self.options.ref, self.options.platform or None)
        name = str(image.ref)
        chains = chain_ids(diff_ids_of(image))
        result = PullResult(name=name, manifest_digest=image.manifest_digest)
        result.layers = [
            LayerProgress(i, layer.digest, layer.size, chains[i])
            for i, layer in enumerate(image.layers)
        ]
        await self.containerd.create_lease(LEASE_LIFETIME)
        try:
            await self._store_content(image, chains[-1] if chains else "")
            await self._prepare_layers(image, name, result)
            target_type, target_digest, target_size = self._target(image)
            await self.containerd.put_image(name, target_type, target_digest, target_size, {})
        finally:
            await self.containerd.delete_lease()
        result.seconds = time.monotonic() - started
        return result

    @staticmethod
    def _target(image: ResolvedImage) -> tuple[str, str, int]:
        if image.index_digest and image.index_bytes is not None:
            index_type = json.loads(image.index_bytes).get("mediaType") or (
                "application/vnd.oci.image.index.v1+json"
            )
            return str(index_type), image.index_digest, len(image.index_bytes)
        return image.media_type, image.manifest_digest, len(image.manifest_bytes)

    async def _store_content(self, image: ResolvedImage, top_chain: str) -> None:
        """Config, manifest and index into the content store, children first."""
        source = _source_labels(image)
        config_labels = dict(source)
        if top_chain:
            config_labels[f"containerd.io/gc.ref.snapshot.{self.options.snapshotter}"] = top_chain
        await self.containerd.write_content(
            image.config.digest, image.config_bytes, config_labels
        )
        manifest_labels = dict(source)
        manifest_labels["containerd.io/gc.ref.content.config"] = image.config.digest
        for i, layer in enumerate(image.layers):
            manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] = layer.digest
        await self.containerd.write_content(
            image.manifest_digest, image.manifest_bytes, manifest_labels
        )
        if image.index_digest and image.index_bytes is not None:
            index_labels = dict(source)
            manifests = json.loads(image.index_bytes).get("manifests") or []
            for i, entry in enumerate(manifests):
                if isinstance(entry, dict) and entry.get("digest") == image.manifest_digest:
                    index_labels[f"containerd.io/gc.ref.content.m.{i}"] = image.manifest_digest
            await self.containerd.write_content(
                image.index_digest, image.index_bytes, index_labels
            )

    async def _prepare_layers(self, image: ResolvedImage, name: str, result: PullResult) -> None:
        """Each layer through containerd, bottom up: clip must answer ALREADY_EXISTS."""
        parent = ""
        for layer in result.layers:
            started = time.monotonic()
            layer.state = "resolving"
            self.on_progress(result)
            if await self._stat(image, name, layer):
                layer.state = "present"
            else:
                await self._prepare_one(image, name, layer, parent)
                layer.state = "lazy"
            layer.seconds = time.monotonic() - started
            self.on_progress(result)
            parent = layer.chain_id

    async def _prepare_one(
        self, image: ResolvedImage, name: str, layer: LayerProgress, parent: str
    ) -> None:
        key = f"extract-{time.time_ns()}-{secrets.token_urlsafe(8)} {layer.chain_id}"
        labels = layer_labels(image, name, layer.index, layer.chain_id)
        snapshotter = self.options.snapshotter
        try:
            mounts = await self.containerd.prepare_snapshot(snapshotter, key, parent, labels)
        except Unavailable as exc:
            raise await self._who_failed(image, name, layer, exc) from None
        if mounts is not None:
            await self.containerd.remove_snapshot(snapshotter, key)
            raise FailedPrecondition(
                f"snapshotter {snapshotter!r} did not serve layer {layer.digest} of {name} "
                "lazily (it returned ordinary mounts): is it clip, with its layer provider on?"
            )

    async def _stat(self, image: ResolvedImage, name: str, layer: LayerProgress) -> bool:
        """Whether the layer's snapshot exists (containerd asks clip when it knows the key)."""
        try:
            found = await self.containerd.stat_snapshot(self.options.snapshotter, layer.chain_id)
        except Unavailable as exc:
            raise await self._who_failed(image, name, layer, exc) from None
        return found is not None

    async def _who_failed(
        self, image: ResolvedImage, name: str, layer: LayerProgress, exc: Unavailable
    ) -> Unavailable:
        """containerd relays UNAVAILABLE both for itself and for the snapshotter behind it:
        tell "containerd is unreachable" from "clip is unreachable" (containerd could not dial
        clip's socket) from clip's own answer (e.g. the layer's registry is unreachable)."""
        try:
            await self.containerd.content_labels(image.config.digest)
        except Unavailable:
            return exc  # containerd itself does not answer: its message says so
        details = str(exc).partition("): ")[2] or str(exc)
        snapshotter = self.options.snapshotter
        if any(mark in details for mark in DIAL_FAILURES):
            return Unavailable(
                f"clip (containerd's {snapshotter!r} snapshotter) is unreachable: containerd "
                f"at {self.options.address} cannot reach its socket ({details}); is `clip serve` "
                f"running? (layer {layer.digest} of {name})"
            )
        return Unavailable(f"layer {layer.digest} of {name}: {snapshotter}: {details}")
