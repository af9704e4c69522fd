"""Value types of the registry client: descriptors, resolved images, platforms."""

from __future__ import annotations

import platform as platform_mod
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapshotter.errors import InvalidArgument
from snapshotter.registry.reference import Reference


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (manifest entry, config or layer)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        """Validate and convert one JSON descriptor; ``where`` names it in errors."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"{where}: descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not re.match(r"^[a-z0-9+._-]+:[a-zA-Z0-9=_-]+$", digest):
            raise InvalidArgument(f"{where}: descriptor has a bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{where}: descriptor {digest} has a bad size {size!r}")
        platform = data.get("platform")
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=digest,
            size=size,
            annotations=dict(data.get("annotations") or {}),
            platform=platform if isinstance(platform, dict) else None,
            urls=tuple(data.get("urls") or ()),
        )


@dataclass(frozen=True)
class ResolvedImage:
    """One image for one platform: its manifest, config and layers, as the registry has them."""

    ref: Reference
    manifest_digest: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    media_type: str
    config: Descriptor
    config_bytes: bytes
    layers: list[Descriptor]
    platform: str
    index_digest: str | None = None
    index_bytes: bytes | None = None

    @property
    def pinned(self) -> Reference:
        """The reference with the manifest digest (what the image's blobs belong to)."""
        return self.ref.with_digest(self.manifest_digest)


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` with docker's aliases normalized (x86_64 -> amd64)."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls.normalize(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def normalize(cls, os_: str, arch: str, variant: str = "") -> Platform:
        arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}.get(
            arch, arch
        )
        if arch == "arm64" and variant in ("8", "v8"):
            variant = ""
        if arch == "arm" and variant in ("", "7"):
            variant = "v7"
        return cls(os_, arch, variant)

    def matches(self, other: Platform) -> bool:
        """Same os and architecture; variant must match only when this platform names one."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform() -> Platform:
    """This machine's platform (``linux/<arch>``), the default for every pull: an arm64 node
    pulls arm64 images, as containerd does."""
    machine = platform_mod.machine().lower()
    arch, variant = {"armv7l": ("arm", "v7"), "armv6l": ("arm", "v6")}.get(machine, (machine, ""))
    return Platform.normalize("linux", arch, variant)
