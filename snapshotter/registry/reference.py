"""Image references: ``[host[:port]/]path[:tag][@digest]``, normalized like docker does.

A first path component is a registry host only if it contains ``.`` or ``:`` or is
``localhost``; otherwise the image lives on Docker Hub, where single-component names are in
``library/``. Parsing is strict so a typo is reported as bad input, not as a network error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from snapshotter.errors import InvalidArgument

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_HOST = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$"
)
SHA256_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference; ``registry`` is ``docker.io`` for Docker Hub."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def endpoint_host(self) -> str:
        """The host to talk to (Docker Hub's API lives on another name than its refs)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(ref: str | Reference) -> Reference:
    """Parse and normalize ``ref``; raise InvalidArgument naming it when malformed."""
    if isinstance(ref, Reference):
        return ref
    if not ref or ref != ref.strip():
        raise InvalidArgument(f"invalid image reference {ref!r}: empty or surrounded by spaces")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidArgument(f"invalid image reference {ref!r}: bad digest {digest!r}")
    registry, path = _split_host(name)
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidArgument(f"invalid image reference {ref!r}: bad tag {tag!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH.match(path):
        raise InvalidArgument(
            f"invalid image reference {ref!r}: repository {path!r} must be lowercase "
            "letters, digits and separators"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def _split_host(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise InvalidArgument(f"invalid image reference {name!r}: bad registry host {first!r}")
        host = DOCKER_HUB if first in ("index.docker.io", "registry-1.docker.io") else first
        return host, rest
    return DOCKER_HUB, name
