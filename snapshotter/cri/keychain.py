"""CriKeychain: the credentials of CRI PullImage requests, per repository, in memory only.

The registry client asks its keychain first for every request of an image (manifest, blobs,
index artifacts; see ``snapshotter.registry.auth.Keychain``). Entries are keyed by registry
and repository, so a tag ref, a digest ref and the ``cri.image-ref`` label containerd passes
on unpack all find the credentials kubelet sent for that repository. Like containerd's CRI,
credentials with a ``server_address`` are used only for that host; without one, for any host
the image is read from (its registry or a mirror).

Nothing here is ever written to disk or logged: ``repr`` of an entry and of the keychain
hold no secret, and the keychain exposes only the number of entries.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from snapshotter.errors import InvalidArgument
from snapshotter.registry.auth import Credentials, normalize_auth_key
from snapshotter.registry.reference import Reference, parse_reference

Clock = Callable[[], float]


@dataclass(frozen=True)
class PullAuth:
    """The fields of a CRI ``AuthConfig`` (kept apart from the protobuf type so the keychain
    is usable and testable without it)."""

    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    server_address: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)


def credentials_of(auth: PullAuth) -> Credentials | None:
    """What the registry client should send, in containerd's order of precedence: username
    and password, identity token, ``auth`` (base64 ``user:password``), then registry token.
    None when the request carries no usable credential (malformed ``auth`` included: the
    caller forwards the pull anyway and containerd reports it)."""
    if auth.username:
        return Credentials(username=auth.username, password=auth.password)
    if auth.identity_token:
        return Credentials(identity_token=auth.identity_token)
    if auth.auth:
        try:
            decoded = base64.b64decode(auth.auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return Credentials(username=user, password=password.strip("\x00")) if sep else None
    if auth.registry_token:
        return Credentials(registry_token=auth.registry_token)
    return None


@dataclass(frozen=True)
class _Entry:
    credentials: Credentials = field(repr=False)
    server: str  # normalized host from server_address; "" = any host of this image
    expires: float


class CriKeychain:
    """Thread-safe map (registry, repository) -> credentials of the latest pull, with expiry.

    Lookups come from the registry client's asyncio thread, updates from the gRPC server's
    loop; one lock keeps them consistent. ``clock`` is injectable so tests drive expiry.
    """

    def __init__(self, ttl_seconds: float, clock: Clock = time.monotonic) -> None:
        if ttl_seconds <= 0:
            raise InvalidArgument(f"credential TTL must be positive, got {ttl_seconds}")
        self.ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}

    def remember(self, image: str, auth: PullAuth) -> bool:
        """Keep ``auth`` for ``image``'s repository (renewing its expiry); False when the
        image reference or the credentials are unusable (nothing is kept then)."""
        creds = credentials_of(auth)
        if creds is None:
            return False
        try:
            ref = parse_reference(image)
        except InvalidArgument:
            return False
        server = normalize_auth_key(auth.server_address) if auth.server_address else ""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            self._entries[(ref.registry, ref.repository)] = _Entry(creds, server, now + self.ttl)
        return True

    def credentials(self, image: Reference, host: str) -> Credentials | None:
        """The Keychain protocol: the latest unexpired pull credentials of ``image``'s
        repository, if they may go to ``host``."""
        key = (image.registry, image.repository)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires <= now:
                del self._entries[key]
                return None
        if entry.server and entry.server != host:
            return None
        return entry.credentials

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._entries)

    def __repr__(self) -> str:
        return f"CriKeychain(ttl={self.ttl}, entries={len(self)})"

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[key]
