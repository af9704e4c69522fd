"""Where a registry's requests go: containerd's own registry configuration, then clip.toml.

containerd (and its CRI plugin) already know how a node reaches its registries, so clip reads
the same files instead of asking for a second copy:

- the CRI plugin's ``registry.config_path``: one directory per registry host holding a
  ``hosts.toml`` (``server``, ordered ``[host."URL"]`` mirrors with ``capabilities``, ``ca``,
  ``client``, ``skip_verify``, ``header``, ``override_path``), or, without a ``hosts.toml``,
  docker-style certificate files (``*.crt`` CAs, ``*.cert``/``*.key`` client pairs);
- containerd 1.6's older CRI tables ``registry.mirrors."HOST".endpoint`` and
  ``registry.configs."HOST"`` (``auth`` and ``tls``), and ``registry.headers``.

clip.toml's ``[registry."HOST"]`` tables are applied on top (overrides only): ``mirrors``
replaces the mirror list, ``plain_http`` and ``skip_verify`` apply to the registry itself.

Lookups follow containerd's rules: for ``host:port`` the directories ``host_port_``,
``host:port`` and then ``_default`` are tried; mirrors come first in file order and the server
last; a mirror is used only for the operations its capabilities allow (``resolve`` turns a tag
into a digest, ``pull`` fetches by digest, ``push`` uploads). ``hosts.toml`` files are re-read
when they change (checked at most every few seconds), as containerd does without a restart.
"""

from __future__ import annotations

import base64
import binascii
import glob
import logging
import os
import posixpath
import ssl
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yarl import URL

from snapshotter.config import RegistryConfig
from snapshotter.errors import InvalidArgument
from snapshotter.registry.auth import Credentials
from snapshotter.registry.reference import DOCKER_HUB, DOCKER_HUB_ENDPOINT

log = logging.getLogger(__name__)

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
CRI_PLUGINS = ("io.containerd.grpc.v1.cri", "cri")  # config version 2, version 1
RECHECK_SECONDS = 5.0
UNSUPPORTED = frozenset({"proxy", "dial_timeout"})  # newer hosts.toml keys clip does not apply


@dataclass(frozen=True)
class HostEndpoint:
    """One place to send a registry's requests: a mirror or the registry (server) itself."""

    scheme: str
    host: str  # host[:port]
    path: str = "/v2"  # API root
    capabilities: frozenset[str] = ALL_CAPABILITIES
    mirror: bool = False
    ca_files: tuple[str, ...] = ()
    client_pairs: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" = in the cert file
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def api(self) -> str:
        """``scheme://host/<api root>`` that request paths (after ``/v2``) are appended to."""
        return f"{self.scheme}://{self.host}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What aiohttp's ``ssl=`` gets: True (system CAs), False (skip_verify) or a context
        with this host's extra CAs and client certificates."""
        if self.scheme != "https":
            return True
        if not self.ca_files and not self.client_pairs:
            return not self.skip_verify
        ctx = ssl.create_default_context()
        try:
            for ca in self.ca_files:
                ctx.load_verify_locations(cafile=ca)
            for cert, key in self.client_pairs:
                ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"registry host {self.host}: TLS files: {exc}") from None
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(frozen=True)
class TLSFiles:
    """containerd 1.6 ``registry.configs."HOST".tls``."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    insecure_skip_verify: bool = False


@dataclass
class ContainerdRegistry:
    """The registry part of containerd's config (CRI plugin); empty when there is none."""

    source: str = "<none>"
    config_paths: tuple[Path, ...] = ()
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    auths: dict[str, Credentials] = field(default_factory=dict)
    tls: dict[str, TLSFiles] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def load(cls, path: Path | None) -> ContainerdRegistry:
        """Read containerd's config file; a missing file (or None) means no configuration."""
        if path is None:
            return cls()
        doc = _read_toml(path)
        if doc is None:
            return cls()
        imports = doc.get("imports") or []
        for pattern in _strings(imports, str(path), "imports"):
            # containerd merges imported files over the main one, in order
            full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
            for name in sorted(glob.glob(full)):
                _merge(doc, _read_toml(Path(name)) or {})
        return cls.from_document(doc, str(path))

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], source: str) -> ContainerdRegistry:
        plugins = doc.get("plugins") or {}
        found = [plugins[k] for k in CRI_PLUGINS if isinstance(plugins.get(k), dict)]
        cri: dict[str, Any] = found[0] if found else {}
        reg = cri.get("registry") or {}
        if not isinstance(reg, dict):
            raise InvalidArgument(f"containerd config {source}: registry is not a table")
        out = cls(source=source)
        config_path = str(reg.get("config_path") or "")
        out.config_paths = tuple(Path(p) for p in config_path.split(os.pathsep) if p)
        for host, entry in _tables(reg.get("mirrors"), source, "mirrors"):
            out.mirrors[host] = tuple(_strings(entry.get("endpoint", []), source, host))
        for host, entry in _tables(reg.get("configs"), source, "configs"):
            auth = entry.get("auth")
            if isinstance(auth, dict):
                creds = _auth(auth, source, host)
                if creds is not None:
                    out.auths[host] = creds
            tls = entry.get("tls")
            if isinstance(tls, dict):
                out.tls[host] = TLSFiles(
                    ca_file=str(tls.get("ca_file", "")),
                    cert_file=str(tls.get("cert_file", "")),
                    key_file=str(tls.get("key_file", "")),
                    insecure_skip_verify=bool(tls.get("insecure_skip_verify", False)),
                )
        headers = reg.get("headers") or {}
        out.headers = tuple(
            (str(k), v) for k, vals in dict(headers).items() for v in _strings(vals, source, k)
        )
        if out.config_paths and (out.mirrors or out.tls):
            # containerd refuses to load its CRI plugin with both; so do we, naming the file
            raise InvalidArgument(
                f"containerd config {source}: registry.mirrors/configs.tls cannot be set "
                "together with registry.config_path"
            )
        return out


def _read_toml(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidArgument(f"containerd config {path}: cannot read: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"containerd config {path}: not valid TOML: {exc}") from None


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Deep-merge ``other`` over ``into`` (tables merge, other values are replaced)."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _tables(value: Any, source: str, name: str) -> Iterable[tuple[str, dict[str, Any]]]:
    if value is None:
        return []
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InvalidArgument(f"containerd config {source}: registry.{name}: expected tables")
    return value.items()


def _strings(value: Any, source: str, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{source}: {key}: expected a string or a list of strings")
    return list(value)


def _auth(auth: Mapping[str, Any], source: str, host: str) -> Credentials | None:
    """``username``/``password``, ``auth`` (base64 user:password) or ``identitytoken``."""
    if auth.get("identitytoken"):
        return Credentials(identity_token=str(auth["identitytoken"]))
    if auth.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(auth["auth"])).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise InvalidArgument(
                f"containerd config {source}: configs.{host}.auth.auth is not base64 user:password"
            )
        return Credentials(user, password)
    if auth.get("username"):
        return Credentials(str(auth["username"]), str(auth.get("password", "")))
    return None


# ---------------------------------------------------------------- hosts.toml


def host_dirs(root: Path, host: str) -> list[Path]:
    """containerd's lookup order for a host's directory under ``config_path``."""
    names = [host]
    head, sep, port = host.rpartition(":")
    if sep and head and port.isdigit():
        names.insert(0, f"{head}_{port}_")
    return [root / name for name in [*names, "_default"]]


def parse_hosts_toml(text: str, directory: Path, source: str) -> list[HostEndpoint]:
    """Endpoints of a hosts.toml in file order, the server last (with host "" when ``server``
    is absent: the caller fills in the registry itself; the root settings still apply)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{source}: not valid TOML: {exc}") from None
    hosts = doc.get("host") or {}
    if not isinstance(hosts, dict):
        raise InvalidArgument(f"{source}: host: expected tables")
    out: list[HostEndpoint] = []
    for url, table in hosts.items():  # tomllib keeps the file's order
        if not isinstance(table, dict):
            raise InvalidArgument(f"{source}: host.{url!r}: expected a table")
        out.append(_endpoint(url, table, directory, f"{source}: host.{url!r}", mirror=True))
    server = str(doc.get("server") or "")
    out.append(_endpoint(server, doc, directory, f"{source}: server", mirror=False))
    return out


def _endpoint(
    server: str, table: Mapping[str, Any], directory: Path, where: str, mirror: bool
) -> HostEndpoint:
    """One host entry (or the file's root table for ``server``); ``server`` may be ""."""
    scheme, host, path = "https", "", "/v2"
    override = bool(table.get("override_path", False))
    if server:
        url = URL(server if "://" in server else f"https://{server}")
        if url.scheme not in ("http", "https") or not url.raw_authority:
            raise InvalidArgument(f"{where}: {server!r} is not an http(s) URL")
        scheme, host = url.scheme, url.raw_authority
        path = posixpath.normpath(url.raw_path) if url.raw_path not in ("", "/") else ""
        if not override and not path.endswith("/v2"):
            path = f"{path}/v2"
    for key in UNSUPPORTED & set(table):
        log.warning("%s: %s is not supported by clip and is ignored", where, key)
    caps = [c.lower() for c in _strings(table.get("capabilities", []), where, "capabilities")]
    unknown = set(caps) - ALL_CAPABILITIES
    if unknown:
        raise InvalidArgument(f"{where}: unknown capabilities {sorted(unknown)}")
    return HostEndpoint(
        scheme=scheme,
        host=host,
        path=path,
        capabilities=frozenset(caps) or ALL_CAPABILITIES,
        mirror=mirror,
        ca_files=tuple(_abs(p, directory) for p in _strings(table.get("ca", []), where, "ca")),
        client_pairs=_client_pairs(table.get("client"), directory, where),
        skip_verify=bool(table.get("skip_verify", False)),
        headers=tuple(
            (str(k), v)
            for k, vals in dict(table.get("header") or {}).items()
            for v in _strings(vals, where, f"header.{k}")
        ),
    )


def _client_pairs(value: Any, directory: Path, where: str) -> tuple[tuple[str, str], ...]:
    """``client = "both.pem"``, ``["a.pem", "b.pem"]`` or ``[["cert", "key"], ...]``."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidArgument(f"{where}: client: expected a path, a list or [cert, key] pairs")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, directory), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_abs(item[0], directory), _abs(item[1], directory) if item[1] else ""))
        else:
            raise InvalidArgument(f"{where}: client: invalid entry {item!r}")
    return tuple(pairs)


def _abs(path: str, directory: Path) -> str:
    return path if os.path.isabs(path) else str(directory / path)


def cert_files(directory: Path) -> HostEndpoint | None:
    """Docker's certificate layout in a host directory without hosts.toml (server settings)."""
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return None
    cas = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    pairs = tuple(
        (str(directory / n), str(directory / (n[: -len(".cert")] + ".key")))
        for n in names
        if n.endswith(".cert") and n[: -len(".cert")] + ".key" in names
    )
    if not cas and not pairs:
        return None
    return HostEndpoint("https", "", ca_files=cas, client_pairs=pairs)


# ---------------------------------------------------------------- the resolver


@dataclass
class _Cached:
    endpoints: list[HostEndpoint]
    stamp: tuple[tuple[str, int], ...]
    checked: float


class RegistryHosts:
    """Endpoints and host credentials for each registry host (see module docstring)."""

    def __init__(
        self,
        overrides: Mapping[str, RegistryConfig] | None = None,
        containerd: ContainerdRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.overrides = dict(overrides or {})
        self.containerd = containerd or ContainerdRegistry()
        self._clock = clock
        self._cache: dict[str, _Cached] = {}

    def override(self, host: str) -> RegistryConfig:
        return self.overrides.get(host) or RegistryConfig()

    def with_plain_http(self, host: str) -> RegistryHosts:
        """A copy where ``host`` itself speaks HTTP (a command's ``--plain-http``)."""
        overrides = dict(self.overrides)
        overrides[host] = replace(self.override(host), plain_http=True)
        return RegistryHosts(overrides, self.containerd, self._clock)

    def credentials(self, host: str) -> Credentials | None:
        """containerd's ``registry.configs."HOST".auth`` for an endpoint host."""
        return self.containerd.auths.get(host)

    def endpoints(self, registry: str, capability: str | None = None) -> list[HostEndpoint]:
        """Where to send ``registry``'s requests, mirrors first; only those with
        ``capability`` when one is given (the registry itself always qualifies for pull)."""
        found = self._containerd_endpoints(registry)
        found = self._apply_override(registry, found)
        if self.containerd.headers:
            found = [replace(ep, headers=self.containerd.headers + ep.headers) for ep in found]
        if capability is None:
            return found
        return [ep for ep in found if ep.can(capability)]

    # containerd's view ------------------------------------------------------------------

    def _containerd_endpoints(self, registry: str) -> list[HostEndpoint]:
        if self.containerd.config_paths:
            return self._from_hosts_dir(registry)
        return self._from_cri_mirrors(registry)

    def _default_server(self, registry: str) -> HostEndpoint:
        host = DOCKER_HUB_ENDPOINT if registry == DOCKER_HUB else registry
        return self._with_cri_tls(HostEndpoint("https", host))

    def _from_hosts_dir(self, registry: str) -> list[HostEndpoint]:
        now = self._clock()
        cached = self._cache.get(registry)
        if cached is not None and now - cached.checked < RECHECK_SECONDS:
            return cached.endpoints
        directory = self._host_dir(registry)
        stamp = _stamp(directory)
        if cached is not None and cached.stamp == stamp:
            cached.checked = now
            return cached.endpoints
        endpoints = self._load_dir(registry, directory)
        self._cache[registry] = _Cached(endpoints, stamp, now)
        return endpoints

    def _host_dir(self, registry: str) -> Path | None:
        for root in self.containerd.config_paths:
            for candidate in host_dirs(root, registry):
                if candidate.is_dir():
                    return candidate
        return None

    def _load_dir(self, registry: str, directory: Path | None) -> list[HostEndpoint]:
        server = self._default_server(registry)
        if directory is None:
            return [server]
        toml = directory / "hosts.toml"
        try:
            text = toml.read_text()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise InvalidArgument(f"{toml}: cannot read: {exc}") from None
        if not text.strip():
            certs = cert_files(directory)
            return [replace(certs, host=server.host) if certs else server]
        try:
            out = parse_hosts_toml(text, directory, str(toml))
        except InvalidArgument as exc:
            # containerd logs the error and falls back to certificate files: so do we
            log.error("ignoring %s: %s", toml, exc)
            certs = cert_files(directory)
            return [replace(certs, host=server.host) if certs else server]
        if not out[-1].host:  # root settings (ca, skip_verify, ...) without a server URL
            out[-1] = replace(out[-1], scheme=server.scheme, host=server.host)
        return out

    def _from_cri_mirrors(self, registry: str) -> list[HostEndpoint]:
        """containerd 1.6's ``registry.mirrors``: the endpoints in order, then the registry
        itself unless one of them already is it; ``*`` applies to hosts without an entry."""
        mirrors = self.containerd.mirrors
        urls = mirrors.get(registry, mirrors.get("*", ()))
        out: list[HostEndpoint] = []
        for raw in urls:
            text = raw if "://" in raw else f"{_default_scheme(raw)}://{raw}"
            url = URL(text)
            path = url.raw_path if url.raw_path not in ("", "/") else "/v2"
            ep = HostEndpoint(url.scheme, url.raw_authority, path, mirror=True)
            out.append(self._with_cri_tls(ep))
        if any(ep.host == registry for ep in out):
            return [replace(ep, mirror=ep.host != registry) for ep in out]
        return [*out, self._default_server(registry)]

    def _with_cri_tls(self, ep: HostEndpoint) -> HostEndpoint:
        tls = self.containerd.tls.get(ep.host)
        if tls is None:
            return ep
        pairs = ((tls.cert_file, tls.key_file),) if tls.cert_file else ()
        return replace(
            ep,
            ca_files=(tls.ca_file,) if tls.ca_file else (),
            client_pairs=pairs,
            skip_verify=tls.insecure_skip_verify,
        )

    # clip.toml overrides ----------------------------------------------------------------

    def _apply_override(self, registry: str, found: list[HostEndpoint]) -> list[HostEndpoint]:
        cfg = self.overrides.get(registry)
        if cfg is None:
            return found
        server = found[-1]
        if cfg.plain_http:
            server = replace(server, scheme="http")
        if cfg.skip_verify:
            server = replace(server, skip_verify=True)
        mirrors = found[:-1]
        if cfg.mirrors:
            mirrors = [self._mirror(m) for m in cfg.mirrors]
        return [*mirrors, server]

    def _mirror(self, mirror: str) -> HostEndpoint:
        """A clip.toml mirror: a URL (with optional path prefix) or ``host[:port]`` whose
        scheme comes from that host's own table."""
        if "://" in mirror:
            url = URL(mirror.rstrip("/"))
            cfg = self.override(url.raw_authority)
            prefix = url.raw_path.rstrip("/")
            return HostEndpoint(
                url.scheme, url.raw_authority, f"{prefix}/v2", mirror=True,
                skip_verify=cfg.skip_verify,
            )  # fmt: skip
        cfg = self.override(mirror)
        scheme = "http" if cfg.plain_http else "https"
        return HostEndpoint(scheme, mirror, mirror=True, skip_verify=cfg.skip_verify)


def _default_scheme(host: str) -> str:
    """containerd's CRI: loopback registries speak HTTP unless told otherwise."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return "http" if name in ("localhost", "127.0.0.1", "[::1]", "::1") else "https"


def _stamp(directory: Path | None) -> tuple[tuple[str, int], ...]:
    """What changes when a host directory's configuration changes (names and mtimes)."""
    if directory is None:
        return ()
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        return ((str(directory), 0), *((e.name, e.stat().st_mtime_ns) for e in entries))
    except OSError:
        return ()


def hosts_from_config(
    tables: Mapping[str, RegistryConfig],
    plain_http_host: str | None = None,
    containerd_config: str = "",
) -> RegistryHosts:
    """The client's hosts from clip.toml's ``[registry."HOST"]`` tables, over containerd's
    registry configuration when ``containerd_config`` names its file.

    ``plain_http_host`` (a command's ``--plain-http`` for its image's registry) makes that host
    talk HTTP, keeping any mirrors.
    """
    containerd = ContainerdRegistry.load(Path(containerd_config) if containerd_config else None)
    hosts = RegistryHosts(tables, containerd)
    return hosts if plain_http_host is None else hosts.with_plain_http(plain_http_host)
