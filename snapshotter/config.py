"""The daemon's TOML configuration: schema, defaults, validation, flag overrides.

Every key and its default is documented in config/clip.toml. Loading is strict: an unknown
table or key, or a value of the wrong type or range, raises InvalidArgument naming the file
and the dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from snapshotter.contentcache.settings import ContentCacheSettings
from snapshotter.errors import InvalidArgument

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class DaemonConfig:
    root: str = "/var/lib/clip"
    address: str = "/run/clip/clip.sock"
    socket_mode: int = 0o660
    log_level: str = "info"
    log_format: str = "json"
    metrics_address: str = ""


@dataclass(frozen=True)
class RegistryConfig:
    """One ``[registry."HOST"]`` table: overrides over containerd's configuration for HOST
    (the one definition of a host's settings; the registry client reads it directly)."""

    plain_http: bool = False
    mirrors: tuple[str, ...] = ()
    skip_verify: bool = False


@dataclass(frozen=True)
class RegistrySettings:
    """The ``[registry]`` table's own keys: where containerd's registry configuration is and
    how long registry operations may take (docs/operations.md "Bounds" derives the bounds)."""

    containerd_config: str = "/etc/containerd/config.toml"
    connect_timeout_seconds: float = 2.0
    response_timeout_seconds: float = 3.0
    operation_timeout_seconds: float = 12.0
    attempts: int = 3
    failure_threshold: int = 3
    cooldown_seconds: float = 10.0
    redirect_ttl_seconds: float = 60.0


#: The `[content_cache]` section is the content cache's own settings type (one definition).
ContentCacheConfig = ContentCacheSettings


@dataclass(frozen=True)
class BackgroundFetchConfig:
    enabled: bool = True
    bytes_per_second: int = 32 * 1024**2
    concurrency: int = 4
    profile_seconds: float = 10.0
    quiet_seconds: float = 3.0


@dataclass(frozen=True)
class TelemetryConfig:
    otlp_endpoint: str = ""
    trace_log: bool = False
    slow_read_seconds: float = 0.5


@dataclass(frozen=True)
class MemoryCacheConfig:
    limit_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class FuseConfig:
    allow_other: bool = True
    read_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class LayersConfig:
    """Bounds a remote layer must respect before clip stores or serves it."""

    #: Largest uncompressed tar stream accepted (0: no bound).
    max_layer_bytes: int = 64 * 1024**3
    #: Largest uncompressed/compressed ratio accepted once a layer passes RATIO_FLOOR bytes.
    max_compression_ratio: float = 250.0


#: How remote layers are served: "erofs" (the kernel serves each layer from an EROFS image over
#: the layer's stream), "fuse" (clip's FUSE tree serves every file operation), "auto" (erofs where
#: the kernel mounts file-backed EROFS, else fuse; decided at start and logged).
FS_MODES = ("auto", "erofs", "fuse")


@dataclass(frozen=True)
class FsConfig:
    mode: str = "auto"


@dataclass(frozen=True)
class DiskCacheConfig:
    dir: str = ""
    limit_bytes: int = 10 * 1024**3


@dataclass(frozen=True)
class CriConfig:
    """The CRI image-service proxy (snapshotter/cri/, docs/deploy.md); off while the address
    is empty."""

    image_service_address: str = ""
    containerd_cri_address: str = "/run/containerd/containerd.sock"
    credential_ttl_seconds: float = 86400.0


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    registry: dict[str, RegistryConfig] = field(default_factory=dict)
    registry_settings: RegistrySettings = field(default_factory=RegistrySettings)
    content_cache: ContentCacheConfig = field(default_factory=ContentCacheConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    fs: FsConfig = field(default_factory=FsConfig)
    disk_cache: DiskCacheConfig = field(default_factory=DiskCacheConfig)
    memory_cache: MemoryCacheConfig = field(default_factory=MemoryCacheConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    cri: CriConfig = field(default_factory=CriConfig)

    def registry_for(self, host: str) -> RegistryConfig:
        return self.registry.get(host, RegistryConfig())

    def cache_dir(self) -> Path:
        """The disk cache directory: configured, or <root>/cache."""
        return Path(self.disk_cache.dir or Path(self.daemon.root) / "cache")


#: Durations where 0 means "none" rather than an error.
_MAY_BE_ZERO = (".profile_seconds", ".quiet_seconds")


class _Loader:
    """Converts one parsed TOML document into a Config, naming every fault."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, why: str) -> InvalidArgument:
        return InvalidArgument(f"config {self.source}: {key}: {why}")

    def table(self, name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(name, "expected a table")
        return value

    def section(self, cls: Any, name: str, raw: Any) -> Any:
        values = self.table(name, raw)
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise self.fail(f"{name}.{key}", "unknown key")
            out[key] = self.value(f"{name}.{key}", getattr(cls(), key), value)
        instance = cls(**out)
        self.check(name, instance)
        return instance

    def value(self, key: str, default: Any, value: Any) -> Any:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise self.fail(key, f"expected true or false, got {value!r}")
            return value
        if key.endswith("_bytes"):
            return self.size(key, value)
        if isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, f"expected an integer, got {value!r}")
            return value
        if isinstance(default, float):
            if key.endswith(_MAY_BE_ZERO):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise self.fail(key, f"expected a number >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise self.fail(key, f"expected a positive number, got {value!r}")
            return float(value)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, f"expected a list of strings, got {value!r}")
            return tuple(value)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        return value

    def size(self, key: str, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise self.fail(key, f"expected a size like 10GiB or a byte count, got {value!r}")
        return int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]

    def check(self, name: str, section: Any) -> None:
        if isinstance(section, DaemonConfig):
            if section.log_level not in LOG_LEVELS:
                raise self.fail(f"{name}.log_level", f"expected one of {', '.join(LOG_LEVELS)}")
            if section.log_format not in LOG_FORMATS:
                raise self.fail(f"{name}.log_format", f"expected one of {', '.join(LOG_FORMATS)}")
            if not 0 <= section.socket_mode <= 0o777:
                raise self.fail(f"{name}.socket_mode", "expected a file mode such as 0o660")
        if isinstance(section, RegistryConfig):
            for mirror in section.mirrors:
                if not re.match(r"^https?://[^/\s]+", mirror):
                    raise self.fail(f"{name}.mirrors", f"{mirror!r} is not an http(s) URL")
        if isinstance(section, RegistrySettings):
            for key in ("attempts", "failure_threshold"):
                if getattr(section, key) < 1:
                    raise self.fail(f"{name}.{key}", "expected a positive integer")
        if isinstance(section, ContentCacheConfig):
            self.check_content_cache(name, section)
        if isinstance(section, LayersConfig) and section.max_compression_ratio < 1:
            raise self.fail(f"{name}.max_compression_ratio", "expected a number of at least 1")
        if isinstance(section, CriConfig):
            for key in ("image_service_address", "containerd_cri_address"):
                value = getattr(section, key)
                if value and not value.startswith("/"):
                    raise self.fail(f"{name}.{key}", f"{value!r}: expected an absolute socket path")
        if isinstance(section, FsConfig) and section.mode not in FS_MODES:
            raise self.fail(f"{name}.mode", f"expected one of {', '.join(FS_MODES)}")
        if isinstance(section, BackgroundFetchConfig):
            for key in ("bytes_per_second", "concurrency"):
                if getattr(section, key) < 1:
                    raise self.fail(f"{name}.{key}", "expected a positive integer")

    def check_content_cache(self, name: str, section: ContentCacheConfig) -> None:
        if section.url and not re.match(r"^(redis|rediss|unix)://", section.url):
            raise self.fail(f"{name}.url", f"{section.url!r}: expected redis:// or rediss://")
        try:
            section.validate()
        except InvalidArgument as exc:
            raise InvalidArgument(f"config {self.source}: {exc}") from None

    def config(self, doc: dict[str, Any]) -> Config:
        kinds: dict[str, Any] = {
            "daemon": DaemonConfig,
            "content_cache": ContentCacheConfig,
            "fuse": FuseConfig,
            "fs": FsConfig,
            "disk_cache": DiskCacheConfig,
            "memory_cache": MemoryCacheConfig,
            "layers": LayersConfig,
            "background_fetch": BackgroundFetchConfig,
            "telemetry": TelemetryConfig,
            "cri": CriConfig,
        }
        out: dict[str, Any] = {}
        for name, raw in doc.items():
            if name == "registry":
                table = self.table(name, raw)
                hosts = {k: v for k, v in table.items() if isinstance(v, dict)}
                own = {k: v for k, v in table.items() if not isinstance(v, dict)}
                out["registry"] = {h: self.registry(h, value) for h, value in hosts.items()}
                out["registry_settings"] = self.section(RegistrySettings, name, own)
            elif name in kinds:
                out[name] = self.section(kinds[name], name, raw)
            else:
                raise self.fail(name, "unknown table")
        return Config(**out)

    def registry(self, host: str, raw: Any) -> RegistryConfig:
        if not _HOST_RE.match(host):
            raise self.fail(f'registry."{host}"', "expected HOST or HOST:PORT")
        section: RegistryConfig = self.section(RegistryConfig, f'registry."{host}"', raw)
        return section


def parse_size(source: str, value: Any) -> int:
    """A size like "10GiB" or a byte count; InvalidArgument naming `source` otherwise."""
    loader = _Loader(source)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    try:
        return loader.size(source, value)
    except InvalidArgument:
        raise InvalidArgument(
            f"{source}: expected a size like 10GiB or a byte count, got {value!r}"
        ) from None


def load(path: Path | None) -> Config:
    """Read a config file (None: all defaults)."""
    if path is None:
        return Config()
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"config {path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"config {path}: not valid TOML: {exc}") from None
    return _Loader(str(path)).config(doc)


def with_overrides(config: Config, **daemon: Any) -> Config:
    """Apply command-line flags (None = not given) over the file's daemon settings."""
    given = {k: v for k, v in daemon.items() if v is not None}
    return replace(config, daemon=replace(config.daemon, **given))
