"""`[content_cache]` settings and `open_content_cache()`, the one place a cache is chosen.

The config module owns the TOML schema; this module reads whatever section object it is given
with `getattr` and documented defaults, so it works with a section that only has `url` as well
as with one that carries every key proposed in docs/contentcache.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import unquote, urlsplit

from snapshotter.contentcache.base import ContentCache, NoContentCache
from snapshotter.errors import InvalidArgument

_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class ContentCacheSettings:
    """Every knob of the content cache with its default (see docs/contentcache.md)."""

    url: str = ""
    cluster: bool = False
    timeout_seconds: float = 0.2
    connect_timeout_seconds: float = 0.5
    index_timeout_seconds: float = 2.0
    failure_threshold: int = 3
    cooldown_seconds: float = 5.0
    max_value_bytes: int = 4 << 20
    ttl_seconds: int = 0
    put_queue_bytes: int = 64 << 20
    max_connections: int = 64
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def from_section(cls, section: Any) -> ContentCacheSettings:
        """Build from a config section object or a mapping; missing keys take defaults."""
        if isinstance(section, dict):
            values = {f.name: section.get(f.name, f.default) for f in fields(cls)}
        else:
            values = {f.name: getattr(section, f.name, f.default) for f in fields(cls)}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise InvalidArgument naming the first bad key (`content_cache.<key>`)."""
        for name in ("timeout_seconds", "connect_timeout_seconds", "index_timeout_seconds",
                     "cooldown_seconds"):
            if not float(getattr(self, name)) > 0:
                raise _bad(name, "expected a positive number of seconds")
        for name in ("failure_threshold", "max_value_bytes", "put_queue_bytes", "max_connections"):
            if int(getattr(self, name)) < 1:
                raise _bad(name, "expected a positive integer")
        if self.ttl_seconds < 0:
            raise _bad("ttl_seconds", "expected 0 (no expiry) or a number of seconds")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise _bad(name, f"{path}: no such file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise _bad("tls_cert_file", "tls_cert_file and tls_key_file go together")
        if self.url:
            parse_url(self.url, cluster=self.cluster, tls=self.tls_configured)

    @property
    def tls_configured(self) -> bool:
        return bool(self.tls_ca_file)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """The parts of a content cache URL; `display` never contains the password."""

    scheme: str
    host: str
    port: int
    db: int
    path: str

    @property
    def display(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.db}"


def parse_url(url: str, *, cluster: bool = False, tls: bool = False) -> RedisTarget:
    """Validate a `redis://[[user]:password@]HOST[:PORT][/DB]` style URL.

    `rediss://` needs `tls_ca_file`: a cache shared by a cluster is private infrastructure
    whose certificate is almost never signed by a public CA, and silently trusting any
    certificate would defeat TLS; so clip asks for the CA instead of guessing.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad("url", f"{_redact(url)}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise _bad("url", f"{_redact(url)}: expected redis://, rediss:// or unix://")
    if parts.scheme == "rediss" and not tls:
        raise _bad(
            "url", f"{_redact(url)}: rediss:// needs content_cache.tls_ca_file (the CA that "
            "signed the server's certificate)"
        )
    if parts.scheme == "unix":
        if cluster:
            raise _bad("url", "unix:// sockets cannot address a Redis Cluster")
        if not parts.path:
            raise _bad("url", f"{_redact(url)}: expected unix:///path/to/redis.sock")
        return RedisTarget("unix", "", 0, 0, parts.path)
    if not parts.hostname:
        raise _bad("url", f"{_redact(url)}: missing host")
    db_text = unquote(parts.path.lstrip("/")) or "0"
    if not db_text.isdigit():
        raise _bad("url", f"{_redact(url)}: database {db_text!r} is not a number")
    if cluster and int(db_text) != 0:
        raise _bad("url", f"{_redact(url)}: Redis Cluster only has database 0")
    return RedisTarget(parts.scheme, parts.hostname, port or 6379, int(db_text), "")


def open_content_cache(section: Any) -> ContentCache:
    """The content cache a config section asks for: NoContentCache when `url` is empty.

    Does not connect (the daemon must start while the cache is down); call `check()` to report
    an unreachable cache.
    """
    settings = section if isinstance(section, ContentCacheSettings) else (
        ContentCacheSettings.from_section(section)
    )
    if not settings.url:
        return NoContentCache()
    from snapshotter.contentcache.redis_backend import RedisContentCache

    return RedisContentCache(settings)


def _bad(key: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"content_cache.{key}: {why}")


def _redact(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
