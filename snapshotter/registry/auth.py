"""Credentials from docker's ``config.json`` and parsing of ``WWW-Authenticate`` challenges.

Docker keys ``auths`` by registry host, sometimes written as a URL
(``https://index.docker.io/v1/``, ``http://host:5000``); we normalize keys to ``host[:port]``
so a lookup by the reference's registry finds them. Credential helpers (``credHelpers``,
``credsStore``) are run the way docker runs them: ``docker-credential-<name> get`` with the
server on stdin, JSON on stdout.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from snapshotter.errors import InvalidArgument, Unavailable
from snapshotter.registry.reference import DOCKER_HUB, DOCKER_HUB_AUTH_KEY, Reference


@dataclass(frozen=True)
class Credentials:
    """A user/password pair, an identity (refresh) token for the token server, or a registry
    (bearer) token sent as it is. Secrets stay out of repr() so they never reach a log."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


class Keychain(Protocol):
    """Credentials that belong to an image rather than to a host (e.g. the ones kubelet sends
    in a CRI PullImage request for a pod's imagePullSecrets).

    The registry client asks its keychain first, with the image being pulled and the host the
    request goes to (the image's registry or one of its mirrors); None means "ask the host's
    configured credentials and docker's config.json as usual".
    """

    def credentials(self, image: Reference, host: str) -> Credentials | None: ...


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, as docker looks it up."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def normalize_auth_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/x`` -> ``h:5000``."""
    if key == DOCKER_HUB_AUTH_KEY:
        return DOCKER_HUB
    host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


class DockerConfig:
    """Read-only view of a docker ``config.json``: ``auths``, ``credHelpers``, ``credsStore``."""

    def __init__(self, data: dict[str, Any] | None = None, source: str = "<none>") -> None:
        data = data or {}
        self.source = source
        self.auths: dict[str, dict[str, Any]] = {
            normalize_auth_key(k): v for k, v in (data.get("auths") or {}).items()
        }
        self.cred_helpers: dict[str, str] = {
            normalize_auth_key(k): v for k, v in (data.get("credHelpers") or {}).items()
        }
        self.creds_store: str | None = data.get("credsStore") or None

    @classmethod
    def load(cls, path: Path | None) -> DockerConfig:
        """Load ``path`` (or the default location); a missing file means no credentials."""
        path = path or default_docker_config()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"docker config {path}: cannot read: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"docker config {path}: not a JSON object")
        return cls(data, str(path))

    def credentials(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (as written in image refs), or None for anonymous."""
        helper = self.cred_helpers.get(registry)
        if helper:
            return _run_helper(helper, registry)
        entry = self.auths.get(registry)
        if entry:
            creds = self._from_entry(registry, entry)
            if creds is not None:
                return creds
        if self.creds_store:
            return _run_helper(self.creds_store, registry)
        return None

    def _from_entry(self, registry: str, entry: dict[str, Any]) -> Credentials | None:
        if entry.get("identitytoken"):
            return Credentials(
                username=entry.get("username", ""), identity_token=entry["identitytoken"]
            )
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError, TypeError):
                decoded = ""
            user, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument(
                    f"docker config {self.source}: auth for {registry} is not base64 user:password"
                )
            return Credentials(username=user, password=password)
        if entry.get("username"):
            return Credentials(username=entry["username"], password=entry.get("password", ""))
        return None


def _run_helper(helper: str, registry: str) -> Credentials | None:
    server = DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run(
            [program, "get"], input=server, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"credential helper {program} for {registry}: {exc}") from None
    if result.returncode != 0:
        if "credentials not found" in (result.stdout + result.stderr).lower():
            return None
        raise Unavailable(f"credential helper {program} for {registry}: {result.stderr.strip()}")
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise Unavailable(f"credential helper {program} for {registry}: bad output") from None
    user, secret = data.get("Username", ""), data.get("Secret", "")
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lowercase) and its parameters."""

    scheme: str
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(header: str) -> Challenge:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (quoted or bare values)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[match.group(1).lower()] = value
    return Challenge(scheme=scheme.lower(), params=params)
