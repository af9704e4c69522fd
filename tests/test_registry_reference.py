"""Reference parsing, platforms, docker config credentials and auth challenges."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.registry import Credentials, DockerConfig, Platform
from snapshotter.registry.auth import normalize_auth_key, parse_challenge
from snapshotter.registry.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", Reference("docker.io", "library/busybox", "latest")),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36")),
        ("user/app", Reference("docker.io", "user/app", "latest")),
        ("docker.io/library/debian:12", Reference("docker.io", "library/debian", "12")),
        ("index.docker.io/x/y", Reference("docker.io", "x/y", "latest")),
        ("localhost/app", Reference("localhost", "app", "latest")),
        ("127.0.0.1:5000/a/b/c:v1", Reference("127.0.0.1:5000", "a/b/c", "v1")),
        ("ghcr.io/o/r@" + DIGEST, Reference("ghcr.io", "o/r", None, DIGEST)),
        ("ghcr.io/o/r:t@" + DIGEST, Reference("ghcr.io", "o/r", "t", DIGEST)),
        ("[::1]:5000/app:t", Reference("[::1]:5000", "app", "t")),
        (
            "reg.example:443/a_b/c.d-e__f:T.1-x",
            Reference("reg.example:443", "a_b/c.d-e__f", "T.1-x"),
        ),
    ],
)
def test_parse_reference_normalizes(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "reg:5000/UPPER:t",
        "a//b",
        "a:bad tag",
        "a@sha256:short",
        "a:" + "t" * 129,
        "-lead",
        "reg_x:5000/a",
    ],
)
def test_parse_reference_rejects_bad_input_naming_it(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        parse_reference(text)


def test_reference_string_endpoint_and_pinning() -> None:
    ref = parse_reference("debian")
    assert str(ref) == "docker.io/library/debian:latest"
    assert ref.endpoint_host == "registry-1.docker.io"
    assert ref.reference == "latest"
    pinned = ref.with_digest(DIGEST)
    assert pinned.reference == DIGEST
    assert str(pinned) == f"docker.io/library/debian:latest@{DIGEST}"
    assert parse_reference("127.0.0.1:5/x").endpoint_host == "127.0.0.1:5"


def test_platform_parse_normalize_and_match() -> None:
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    assert Platform.parse("linux/aarch64") == Platform("linux", "arm64")
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64")
    assert Platform.parse("linux/arm") == Platform("linux", "arm", "v7")
    assert Platform.parse("linux/arm64").matches(Platform.normalize("linux", "arm64", "v8"))
    assert Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v6"))
    assert not Platform.parse("linux/arm/v6").matches(Platform("linux", "arm", "v7"))
    assert not Platform.parse("linux/amd64").matches(Platform("windows", "amd64"))
    assert str(Platform.parse("linux/arm/v6")) == "linux/arm/v6"
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(InvalidArgument, match="invalid platform"):
            Platform.parse(bad)


def test_parse_challenge_quoted_and_bare() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    basic = parse_challenge('Basic realm="clip \\"test\\""')
    assert basic.scheme == "basic" and basic.params["realm"] == 'clip "test"'
    assert parse_challenge("Bearer realm=x, service=y").params == {"realm": "x", "service": "y"}


def test_normalize_auth_keys() -> None:
    assert normalize_auth_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_auth_key("registry-1.docker.io") == "docker.io"
    assert normalize_auth_key("http://reg:5000/v2/") == "reg:5000"
    assert normalize_auth_key("ghcr.io") == "ghcr.io"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_docker_config_auths(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _b64("hubuser:hub:pass")},
                    "http://reg:5000": {"username": "u", "password": "p"},
                    "tok.example": {"identitytoken": "refresh-me"},
                    "empty.example": {},
                }
            }
        )
    )
    cfg = DockerConfig.load(path)
    assert cfg.credentials("docker.io") == Credentials("hubuser", "hub:pass")
    assert cfg.credentials("reg:5000") == Credentials("u", "p")
    assert cfg.credentials("tok.example") == Credentials(identity_token="refresh-me")
    assert cfg.credentials("empty.example") is None
    assert cfg.credentials("other.example") is None
    assert Credentials("u", "p").basic_header() == "Basic " + _b64("u:p")


def test_docker_config_missing_and_broken(tmp_path: Path) -> None:
    assert DockerConfig.load(tmp_path / "absent.json").credentials("x.io") is None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InvalidArgument, match=str(broken)):
        DockerConfig.load(broken)
    bad_auth = tmp_path / "bad.json"
    bad_auth.write_text(json.dumps({"auths": {"r.io": {"auth": "!!!"}}}))
    with pytest.raises(InvalidArgument, match=r"r\.io"):
        DockerConfig.load(bad_auth).credentials("r.io")


def test_docker_config_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": _b64("a:b")}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert DockerConfig.load(None).credentials("r.io") == Credentials("a", "b")


def test_docker_config_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real helper program on PATH, run the way docker runs it (server on stdin)."""
    helper = tmp_path / "docker-credential-fake"
    helper.write_text(
        "#!/bin/sh\nread server\n"
        'case "$server" in\n'
        '  helped.io) echo \'{"Username":"hu","Secret":"hs"}\' ;;\n'
        '  store.io) echo \'{"Username":"<token>","Secret":"idtok"}\' ;;\n'
        "  *) echo 'credentials not found in native keychain'; exit 1 ;;\n"
        "esac\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = DockerConfig({"credHelpers": {"helped.io": "fake"}, "credsStore": "fake"})
    assert cfg.credentials("helped.io") == Credentials("hu", "hs")
    assert cfg.credentials("store.io") == Credentials(identity_token="idtok")
    assert cfg.credentials("unknown.io") is None


def test_hosts_from_config_with_a_plain_http_override() -> None:
    from snapshotter.config import RegistryConfig
    from snapshotter.registry import HostEndpoint, hosts_from_config

    tables = {
        "mirrored:5000": RegistryConfig(plain_http=False, mirrors=("http://m:5000",)),
        "other:443": RegistryConfig(plain_http=True),
    }
    hosts = hosts_from_config(tables, plain_http_host="mirrored:5000")
    assert hosts.endpoints("mirrored:5000") == [
        HostEndpoint("http", "m:5000", mirror=True),
        HostEndpoint("http", "mirrored:5000"),
    ]
    assert hosts.endpoints("other:443") == [HostEndpoint("http", "other:443")]
    assert hosts_from_config(tables, plain_http_host="new:80").endpoints("new:80")[0].scheme == (
        "http"
    )
    assert hosts_from_config(tables).endpoints("mirrored:5000")[-1].scheme == "https"
    assert hosts_from_config({}).endpoints("docker.io") == [
        HostEndpoint("https", "registry-1.docker.io")
    ]
