"""clip.toml's [registry] table: its own keys (containerd's config, timeouts), one definition of
a host's overrides, and the shipped file documenting both."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapshotter import config
from snapshotter.errors import InvalidArgument
from snapshotter.registry import RegistryClient, RetryPolicy

REPO = Path(__file__).resolve().parents[1]


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "clip.toml"
    path.write_text(text)
    return config.load(path)


def test_registry_table_holds_settings_and_host_overrides(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[registry]
containerd_config = "/srv/containerd.toml"
operation_timeout_seconds = 8
attempts = 2

[registry."127.0.0.1:5000"]
plain_http = true
skip_verify = true
mirrors = ["http://10.0.0.1:5000"]
""",
    )
    assert cfg.registry_settings == config.RegistrySettings(
        containerd_config="/srv/containerd.toml", operation_timeout_seconds=8.0, attempts=2
    )
    assert cfg.registry_for("127.0.0.1:5000") == config.RegistryConfig(
        plain_http=True, skip_verify=True, mirrors=("http://10.0.0.1:5000",)
    )
    policy = RetryPolicy.from_settings(cfg.registry_settings)
    assert policy.operation_timeout == 8.0 and policy.attempts == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[registry]\nattempts = 0\n", "registry.attempts: expected a positive integer"),
        ("[registry]\nconect_timeout_seconds = 1\n", "registry.conect_timeout_seconds: unknown"),
        ("[registry]\nresponse_timeout_seconds = -1\n", "expected a positive number"),
        ('[registry."h:1"]\nskip_verify = "no"\n', 'registry."h:1".skip_verify: expected true'),
    ],
)
def test_registry_table_faults(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load(tmp_path, text)


def test_shipped_config_documents_every_registry_key() -> None:
    text = (REPO / "config" / "clip.toml").read_text()
    for cls in (config.RegistrySettings, config.RegistryConfig):
        for name in cls.__dataclass_fields__:
            assert f"{name} =" in text, f"registry.{name} is not documented"
    assert config.load(REPO / "config" / "clip.toml").registry_settings == (
        config.RegistrySettings()
    )


def test_client_from_config_reads_containerds_file(tmp_path: Path) -> None:
    containerd = tmp_path / "containerd.toml"
    containerd.write_text(
        '[plugins."io.containerd.grpc.v1.cri".registry.mirrors."r.example"]\n'
        'endpoint = ["https://m.example"]\n'
    )
    cfg = load(tmp_path, f'[registry]\ncontainerd_config = "{containerd}"\n')
    client = RegistryClient.from_config(cfg, plain_http_host="r.example")
    endpoints = client.hosts.endpoints("r.example")
    assert [(e.scheme, e.host) for e in endpoints] == [
        ("https", "m.example"), ("http", "r.example"),
    ]  # fmt: skip
    assert client.policy == RetryPolicy()
    none = load(tmp_path, '[registry]\ncontainerd_config = ""\n')
    assert [e.host for e in RegistryClient.from_config(none).hosts.endpoints("r.example")] == [
        "r.example"
    ]
