"""The entry point for remote (lazily served) layers.

containerd unpacks a layer by calling Prepare with the layer's chainID in the label
``containerd.io/snapshot.ref``. When the pull also carries remote labels (the CRI family
``containerd.io/snapshot/cri.*`` or stargz's ``containerd.io/snapshot/remote/stargz.*``) and a
:class:`LayerProvider` is plugged in, clip asks the provider to make the layer available,
commits a snapshot named by the chainID with the exact parent and all labels, and answers
ALREADY_EXISTS. containerd's metadata layer then walks with
``labels."containerd.io/snapshot.ref"==<chainID>,parent==<parent>``, takes the committed match
and skips downloading the layer (see containerd 1.6 ``metadata/snapshot.go``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

TARGET_LABEL = "containerd.io/snapshot.ref"
CRI_PREFIX = "containerd.io/snapshot/cri."
STARGZ_PREFIX = "containerd.io/snapshot/remote/stargz."


@dataclass(frozen=True)
class RemoteLayer:
    """A layer containerd asked to unpack, with what the labels say about it."""

    key: str
    parent: str
    chain_id: str
    image_ref: str
    digest: str
    layers: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


def remote_layer(key: str, parent: str, labels: Mapping[str, str]) -> RemoteLayer | None:
    """The remote layer a Prepare describes, or None when its labels do not name one."""
    chain_id = labels.get(TARGET_LABEL, "")
    for prefix, ref_name, digest_name, layers_name in (
        (CRI_PREFIX, "image-ref", "layer-digest", "image-layers"),
        (STARGZ_PREFIX, "reference", "digest", "layers"),
    ):
        image_ref = labels.get(prefix + ref_name, "")
        digest = labels.get(prefix + digest_name, "")
        if chain_id and image_ref and digest:
            layers = tuple(x for x in labels.get(prefix + layers_name, "").split(",") if x)
            return RemoteLayer(key, parent, chain_id, image_ref, digest, layers, dict(labels))
    return None


class LayerProvider(Protocol):
    """Makes remote layers available as directories overlayfs can use as a lowerdir."""

    async def prepare(self, layer: RemoteLayer) -> str:
        """Make ``layer`` available; return the directory to use as its lowerdir.

        Must not return before the directory is usable. Raise a ClipError (Unavailable,
        NotFound...) when the layer cannot be served: clip then fails the Prepare and never
        falls back to an ordinary unpack for a layer that carries remote labels.
        """
        ...

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        """Re-attach a layer recorded before a restart; return its (possibly new) lowerdir."""
        ...

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        """The snapshot of ``layer`` was removed: drop what was kept for it."""
        ...

    async def sweep(self) -> list[str]:
        """Drop what no snapshot uses any more (after restoring, and on Cleanup): e.g. a layer
        mount left by a daemon that died between mounting and committing. Returns what went."""
        ...
