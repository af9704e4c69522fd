"""OCI registry client on aiohttp (pull, range reads, push) for clip's lazy layers."""

from snapshotter.registry.auth import Credentials, DockerConfig
from snapshotter.registry.client import RegistryClient
from snapshotter.registry.errors import AccessDenied, DigestMismatch
from snapshotter.registry.hosts import (
    ContainerdRegistry,
    HostEndpoint,
    RegistryHosts,
    hosts_from_config,
)
from snapshotter.registry.policy import RetryPolicy
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.registry.types import Descriptor, Platform, ResolvedImage, host_platform

__all__ = [
    "AccessDenied",
    "ContainerdRegistry",
    "Credentials",
    "Descriptor",
    "DigestMismatch",
    "DockerConfig",
    "HostEndpoint",
    "Platform",
    "Reference",
    "RegistryClient",
    "RegistryHosts",
    "ResolvedImage",
    "RetryPolicy",
    "host_platform",
    "hosts_from_config",
    "parse_reference",
]
