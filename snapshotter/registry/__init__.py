"""OCI registry client on aiohttp (pull, range reads, push) for clip's lazy layers."""

from snapshotter.registry.auth import Credentials, DockerConfig
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import AccessDenied, DigestMismatch
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.registry.types import (
    Descriptor,
    Platform,
    RegistryHostConfig,
    ResolvedImage,
    hosts_from_config,
)

__all__ = [
    "AccessDenied",
    "Credentials",
    "Descriptor",
    "DigestMismatch",
    "DockerConfig",
    "Platform",
    "Reference",
    "RegistryClient",
    "RegistryHostConfig",
    "ResolvedImage",
    "hosts_from_config",
    "parse_reference",
]
