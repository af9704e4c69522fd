"""containerd's registry configuration as clip's source of hosts: hosts.toml directories and
the CRI plugin's 1.6 tables, clip.toml overrides, and per-host TLS and headers really applied
(against aiohttp registries on loopback with their own certificates)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from snapshotter.config import RegistryConfig
from snapshotter.errors import InvalidArgument, Unavailable
from snapshotter.registry import (
    ContainerdRegistry,
    Credentials,
    HostEndpoint,
    RegistryClient,
    RegistryHosts,
)
from snapshotter.registry.hosts import host_dirs, parse_hosts_toml
from tests.test_registry_http import FakeRegistry, Peer


def containerd_config(tmp_path: Path, body: str) -> ContainerdRegistry:
    path = tmp_path / "config.toml"
    path.write_text(body)
    return ContainerdRegistry.load(path)


def hosts_dir(tmp_path: Path, host: str, text: str) -> Path:
    root = tmp_path / "certs.d"
    (root / host).mkdir(parents=True, exist_ok=True)
    (root / host / "hosts.toml").write_text(text)
    return root


# ---------------------------------------------------------------- containerd's config file


def test_config_path_and_cri_tables_are_read_from_containerd_config(tmp_path: Path) -> None:
    cfg = containerd_config(
        tmp_path,
        f"""
version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{tmp_path}/a:{tmp_path}/b"
[plugins."io.containerd.grpc.v1.cri".registry.configs."r.example".auth]
  username = "u"
  password = "p"
[plugins."io.containerd.grpc.v1.cri".registry.configs."t.example".auth]
  auth = "dXNlcjpwdw=="
[plugins."io.containerd.grpc.v1.cri".registry.headers]
  X-Node = ["n1"]
""",
    )
    assert cfg.config_paths == (tmp_path / "a", tmp_path / "b")
    assert cfg.auths == {"r.example": Credentials("u", "p"), "t.example": Credentials("user", "pw")}
    assert cfg.headers == (("X-Node", "n1"),)
    assert ContainerdRegistry.load(tmp_path / "missing.toml") == ContainerdRegistry()


def test_imported_files_merge_over_the_main_config(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-registry.toml").write_text(
        '[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/srv/certs.d"\n'
    )
    cfg = containerd_config(
        tmp_path,
        'version = 2\nimports = ["conf.d/*.toml"]\n'
        '[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/etc/certs.d"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry.configs."h".auth]\nusername = "u"\n',
    )
    assert cfg.config_paths == (Path("/srv/certs.d"),)
    assert cfg.auths == {"h": Credentials("u", "")}


def test_containerd_config_faults_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"config\.toml: not valid TOML"):
        containerd_config(tmp_path, "[plugins\n")
    with pytest.raises(InvalidArgument, match=r"cannot be set together with registry\.config_path"):
        containerd_config(
            tmp_path,
            """
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["https://m"]
""",
        )
    with pytest.raises(InvalidArgument, match="is not base64 user:password"):
        containerd_config(
            tmp_path,
            '[plugins.cri.registry.configs."h".auth]\nauth = "bm9jb2xvbg=="\n',
        )


def test_cri_mirrors_then_the_registry_with_tls_and_wildcard(tmp_path: Path) -> None:
    cfg = containerd_config(
        tmp_path,
        """
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.example/prefix", "10.0.0.5:5000", "localhost:5001"]
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."self.example:5000"]
  endpoint = ["http://self.example:5000"]
[plugins."io.containerd.grpc.v1.cri".registry.mirrors."*"]
  endpoint = ["https://any.example"]
[plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example".tls]
  ca_file = "/ca.pem"
  cert_file = "/c.pem"
  key_file = "/k.pem"
  insecure_skip_verify = true
""",
    )
    hosts = RegistryHosts(containerd=cfg)
    assert hosts.endpoints("docker.io") == [
        HostEndpoint(
            "https", "mirror.example", "/prefix", mirror=True, ca_files=("/ca.pem",),
            client_pairs=(("/c.pem", "/k.pem"),), skip_verify=True,
        ),
        HostEndpoint("https", "10.0.0.5:5000", mirror=True),
        HostEndpoint("http", "localhost:5001", mirror=True),
        HostEndpoint("https", "registry-1.docker.io"),
    ]  # fmt: skip
    assert hosts.endpoints("self.example:5000") == [HostEndpoint("http", "self.example:5000")]
    assert hosts.endpoints("other.example") == [
        HostEndpoint("https", "any.example", mirror=True),
        HostEndpoint("https", "other.example"),
    ]


# ---------------------------------------------------------------- hosts.toml


def test_hosts_toml_semantics(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    parsed = parse_hosts_toml(
        """
server = "https://registry.example:5000"
ca = "root.pem"

[host."https://pull-only.example"]
  capabilities = ["pull"]
  ca = ["a.pem", "/abs/b.pem"]
  skip_verify = true
  [host."https://pull-only.example".header]
    x-one = "1"
    x-two = ["a", "b"]

[host."http://plain.example:8080/mirror/path"]
  capabilities = ["pull", "resolve"]
  client = [["c.cert", "c.key"], ["both.pem", ""]]

[host."https://legacy.example/v2/upstream"]
  override_path = true
  client = "one.pem"
""",
        directory,
        "hosts.toml",
    )
    assert parsed == [
        HostEndpoint(
            "https", "pull-only.example", capabilities=frozenset({"pull"}), mirror=True,
            ca_files=(str(directory / "a.pem"), "/abs/b.pem"), skip_verify=True,
            headers=(("x-one", "1"), ("x-two", "a"), ("x-two", "b")),
        ),
        HostEndpoint(
            "http", "plain.example:8080", "/mirror/path/v2",
            capabilities=frozenset({"pull", "resolve"}), mirror=True,
            client_pairs=((str(directory / "c.cert"), str(directory / "c.key")),
                          (str(directory / "both.pem"), "")),
        ),
        HostEndpoint(
            "https", "legacy.example", "/v2/upstream", mirror=True,
            client_pairs=((str(directory / "one.pem"), ""),),
        ),
        HostEndpoint("https", "registry.example:5000", ca_files=(str(directory / "root.pem"),)),
    ]  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"unknown capabilities \['pul'\]"):
        parse_hosts_toml('[host."https://m"]\ncapabilities = ["pul"]\n', directory, "h")
    with pytest.raises(InvalidArgument, match="is not an http"):
        parse_hosts_toml('server = "ftp://x"\n', directory, "h")


def test_host_directory_lookup_order(tmp_path: Path) -> None:
    assert [p.name for p in host_dirs(tmp_path, "r.example:5000")] == [
        "r.example_5000_", "r.example:5000", "_default",
    ]  # fmt: skip
    assert [p.name for p in host_dirs(tmp_path, "r.example")] == ["r.example", "_default"]


def test_capabilities_filter_and_fallbacks(tmp_path: Path) -> None:
    root = hosts_dir(
        tmp_path,
        "r.example_5000_",
        '[host."https://pull.example"]\ncapabilities = ["pull"]\n',
    )
    hosts_dir(tmp_path, "_default", '[host."https://everything.example"]\n')
    (root / "certs.example").mkdir()
    (root / "certs.example" / "ca.crt").write_text("x")
    (root / "certs.example" / "client.cert").write_text("x")
    (root / "certs.example" / "client.key").write_text("x")
    hosts = RegistryHosts(containerd=ContainerdRegistry(config_paths=(root,)))
    assert [e.host for e in hosts.endpoints("r.example:5000")] == [
        "pull.example", "r.example:5000",
    ]  # fmt: skip
    assert [e.host for e in hosts.endpoints("r.example:5000", "resolve")] == ["r.example:5000"]
    assert [e.host for e in hosts.endpoints("docker.io")] == [
        "everything.example", "registry-1.docker.io",
    ]  # fmt: skip
    certs = root / "certs.example"
    assert hosts.endpoints("certs.example") == [
        HostEndpoint(
            "https", "certs.example", ca_files=(str(certs / "ca.crt"),),
            client_pairs=((str(certs / "client.cert"), str(certs / "client.key")),),
        )
    ]  # fmt: skip


def test_hosts_toml_changes_are_picked_up_without_restart(tmp_path: Path) -> None:
    now = [0.0]
    root = hosts_dir(tmp_path, "r.example", '[host."https://one.example"]\n')
    hosts = RegistryHosts(containerd=ContainerdRegistry(config_paths=(root,)), clock=lambda: now[0])
    assert hosts.endpoints("r.example")[0].host == "one.example"
    toml = root / "r.example" / "hosts.toml"
    toml.write_text('[host."https://two.example"]\n')
    stat = toml.stat()
    import os

    os.utime(toml, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert hosts.endpoints("r.example")[0].host == "one.example"  # checked every few seconds
    now[0] += 10
    assert hosts.endpoints("r.example")[0].host == "two.example"


def test_a_broken_hosts_toml_falls_back_like_containerd(tmp_path: Path) -> None:
    root = hosts_dir(tmp_path, "r.example", "[host\n")
    hosts = RegistryHosts(containerd=ContainerdRegistry(config_paths=(root,)))
    assert hosts.endpoints("r.example") == [HostEndpoint("https", "r.example")]


def test_clip_toml_tables_only_override(tmp_path: Path) -> None:
    root = hosts_dir(
        tmp_path,
        "r.example",
        'server = "https://r.example"\n[host."https://from-containerd.example"]\n',
    )
    containerd = ContainerdRegistry(config_paths=(root,))
    overrides = {
        "r.example": RegistryConfig(plain_http=True, skip_verify=True),
        "m.example": RegistryConfig(mirrors=("http://clip-mirror:5000/pre",)),
    }
    hosts = RegistryHosts(overrides, containerd)
    assert hosts.endpoints("r.example") == [
        HostEndpoint("https", "from-containerd.example", mirror=True),
        HostEndpoint("http", "r.example", skip_verify=True),
    ]
    assert hosts.endpoints("m.example") == [
        HostEndpoint("http", "clip-mirror:5000", "/pre/v2", mirror=True),
        HostEndpoint("https", "m.example"),
    ]


# ---------------------------------------------------------------- TLS and headers applied


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_hosts_toml_ca_client_certificate_and_headers_reach_the_registry(tmp_path: Path) -> None:
    server_cert, server_key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_cert)

    async def main() -> None:
        reg = FakeRegistry()
        reg.add_image("app:v1")
        async with Peer(reg.app, ssl_context=ctx) as peer:
            reg.host = peer.host
            root = tmp_path / "certs.d"
            (root / peer.host).mkdir(parents=True)
            (root / peer.host / "hosts.toml").write_text(
                f'server = "https://{peer.host}"\n'
                f'ca = "{server_cert}"\n'
                f'client = [["{client_cert}", "{client_key}"]]\n'
                '[header]\n  X-Clip-Test = "hello"\n'
            )
            hosts = RegistryHosts(containerd=ContainerdRegistry(config_paths=(root,)))
            async with RegistryClient(hosts, Path("/nonexistent")) as client:
                image = await client.resolve(f"{peer.host}/app:v1")
            assert image.layers and reg.b.seen[0][2]["X-Clip-Test"] == "hello"
            (root / peer.host / "hosts.toml").write_text(
                f'server = "https://{peer.host}"\nca = "{server_cert}"\n'
            )
            hosts = RegistryHosts(containerd=ContainerdRegistry(config_paths=(root,)))
            async with RegistryClient(hosts, Path("/nonexistent"), retries=0) as client:
                with pytest.raises(Unavailable, match=f"image {peer.host}/app:v1"):
                    await client.resolve(f"{peer.host}/app:v1")  # no client certificate

    asyncio.run(asyncio.wait_for(main(), 60))


def test_unreadable_tls_files_are_named() -> None:
    ep = HostEndpoint("https", "r.example", ca_files=("/nonexistent/ca.pem",))
    with pytest.raises(InvalidArgument, match=r"registry host r\.example: TLS files"):
        ep.ssl_context()
    assert HostEndpoint("https", "r.example", skip_verify=True).ssl_context() is False
    assert HostEndpoint("http", "r.example", ca_files=("/x",)).ssl_context() is True
