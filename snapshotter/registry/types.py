"""Value types of the registry client: host configuration, descriptors, resolved images."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from snapshotter.errors import InvalidArgument
from snapshotter.registry.auth import Credentials
from snapshotter.registry.reference import Reference


@dataclass
class RegistryHostConfig:
    """How to reach one registry host (the key is the host as written in image refs).

    ``mirrors`` are tried in order for pulls before the host itself; each is ``host[:port]``
    (scheme from that host's own config, https by default) or a URL such as
    ``http://mirror:5000`` or ``https://mirror/prefix``. Pushes always go to the host itself.
    """

    plain_http: bool = False
    mirrors: list[str] = field(default_factory=list)
    auth: Credentials | None = None
    skip_verify: bool = False

    @classmethod
    def from_mapping(cls, host: str, data: Mapping[str, Any]) -> RegistryHostConfig:
        """Build from a config-file table: plain_http, mirrors, username/password, skip_verify."""
        known = {"plain_http", "mirrors", "username", "password", "identity_token", "skip_verify"}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgument(f"registry host {host}: unknown settings {sorted(unknown)}")
        mirrors = data.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise InvalidArgument(f"registry host {host}: mirrors must be a list of strings")
        auth = None
        if data.get("username") or data.get("identity_token"):
            auth = Credentials(
                username=str(data.get("username", "")),
                password=str(data.get("password", "")),
                identity_token=str(data.get("identity_token", "")),
            )
        return cls(
            plain_http=bool(data.get("plain_http", False)),
            mirrors=list(mirrors),
            auth=auth,
            skip_verify=bool(data.get("skip_verify", False)),
        )


class HostTable(Protocol):
    """A config file's ``[registry."HOST"]`` table, as far as the client needs it."""

    @property
    def plain_http(self) -> bool: ...

    @property
    def mirrors(self) -> Sequence[str]: ...


def hosts_from_config(
    tables: Mapping[str, HostTable], plain_http_host: str | None = None
) -> dict[str, RegistryHostConfig]:
    """The client's host settings from the config's registry tables.

    ``plain_http_host`` (a command's ``--plain-http`` for its image's registry) makes that host
    talk HTTP, keeping any mirrors its table names.
    """
    hosts = {
        host: RegistryHostConfig(plain_http=table.plain_http, mirrors=list(table.mirrors))
        for host, table in tables.items()
    }
    if plain_http_host is not None:
        hosts.setdefault(plain_http_host, RegistryHostConfig()).plain_http = True
    return hosts


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
