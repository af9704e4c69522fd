"""Config loading: documented defaults, strict keys and values, flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clip.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_exactly_the_defaults() -> None:
    """config/clip.toml documents every default; loading it changes nothing."""
    shipped = config.load(REPO / "config" / "clip.toml")
    assert shipped == config.Config()


def test_shipped_config_mentions_every_key() -> None:
    text = (REPO / "config" / "clip.toml").read_text()
    for section in (
        "daemon", "content_cache", "fuse", "disk_cache", "memory_cache", "layers",
        "background_fetch", "telemetry",
    ):
        cls = type(getattr(config.Config(), section))
        for name in cls.__dataclass_fields__:
            assert f"{name} =" in text, f"{section}.{name} is not documented"
    assert "plain_http" in text and "mirrors" in text


def test_full_config(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            """
[daemon]
root = "/srv/clip"
address = "/run/x.sock"
socket_mode = 0o600
log_level = "debug"
log_format = "text"

[registry."127.0.0.1:5000"]
plain_http = true
mirrors = ["http://10.0.0.1:5000"]

[registry."docker.io"]
mirrors = ["https://mirror.example"]

[content_cache]
url = "redis://127.0.0.1:6379/0"

[fuse]
read_timeout_seconds = 5
allow_other = false

[disk_cache]
dir = "/var/cache/clip"
limit_bytes = "2GiB"
""",
        )
    )
    assert cfg.daemon.root == "/srv/clip" and cfg.daemon.socket_mode == 0o600
    assert cfg.registry_for("127.0.0.1:5000") == config.RegistryConfig(
        plain_http=True, mirrors=("http://10.0.0.1:5000",)
    )
    assert cfg.registry_for("unknown:1") == config.RegistryConfig()
    assert cfg.content_cache.url == "redis://127.0.0.1:6379/0"
    assert cfg.fuse.read_timeout_seconds == 5.0 and cfg.fuse.allow_other is False
    assert cfg.disk_cache.limit_bytes == 2 * 1024**3
    assert cfg.cache_dir() == Path("/var/cache/clip")
    assert config.Config().cache_dir() == Path("/var/lib/clip/cache")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nrooot = 1\n", "daemon.rooot: unknown key"),
        ("[deamon]\n", "deamon: unknown table"),
        ('[daemon]\nlog_level = "loud"\n', "daemon.log_level: expected one of"),
        ("[daemon]\nroot = 3\n", "daemon.root: expected a string"),
        ('[registry."h:1"]\nplain_http = "yes"\n', 'registry."h:1".plain_http: expected true'),
        ('[registry."h:1"]\nmirrors = "http://x"\n', 'registry."h:1".mirrors: expected a list'),
        ('[registry."h:1"]\nmirrors = ["ftp://x"]\n', "is not an http(s) URL"),
        ('[registry."h:1"]\nplane_http = true\n', 'registry."h:1".plane_http: unknown key'),
        ('[registry."bad host/x"]\n', "expected HOST or HOST:PORT"),
        ('[content_cache]\nurl = "memcached://x"\n', "content_cache.url"),
        ("[fuse]\nread_timeout_seconds = -1\n", "fuse.read_timeout_seconds: expected a positive"),
        ('[disk_cache]\nlimit_bytes = "lots"\n', "disk_cache.limit_bytes: expected a size"),
        ("[daemon\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_fault(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as err:
        config.load(path)
    assert str(err.value).startswith(f"config {path}: ")
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[daemon]\nroot = "/a"\naddress = "/b"\n'))
    new = config.with_overrides(cfg, root="/flag", address=None, log_level="debug")
    assert (new.daemon.root, new.daemon.address, new.daemon.log_level) == ("/flag", "/b", "debug")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[content_cache]\ntimeout_seconds = 0\n", "content_cache.timeout_seconds"),
        ('[content_cache]\nurl = "rediss://h:1/0"\n', "needs content_cache.tls_ca_file"),
        ('[content_cache]\ntls_ca_file = "/nonexistent/ca.pem"\n', "no such file"),
        ("[background_fetch]\nconcurrency = 0\n", "background_fetch.concurrency"),
        ('[memory_cache]\nlimit_bytes = "x"\n', "memory_cache.limit_bytes"),
    ],
)
def test_cache_sections_name_the_fault(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as err:
        config.load(path)
    assert str(err.value).startswith(f"config {path}: ") and message in str(err.value)


def test_cache_sections(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            '[content_cache]\nurl = "redis://10.0.0.1:6379/0"\ncluster = true\n'
            'put_queue_bytes = "16MiB"\n[background_fetch]\nbytes_per_second = 1000\n'
            '[memory_cache]\nlimit_bytes = "8MiB"\n',
        )
    )
    assert cfg.content_cache.cluster and cfg.content_cache.put_queue_bytes == 16 << 20
    assert cfg.background_fetch.bytes_per_second == 1000
    assert cfg.memory_cache.limit_bytes == 8 << 20
