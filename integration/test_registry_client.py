"""The registry client and the test harness against Debian's docker-registry on loopback.

Images are built here from real files (GNU tar and Python tarfile, gzip/zstd/plain), pushed
byte for byte, and read back through the client; a counting proxy in front of the registry
measures what crossed the wire and simulates outages.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from integration.conftest import BuildTestImage
from integration.harness.clipd import clip_pull
from integration.harness.containerd import Containerd
from integration.harness.images import (
    BuiltImage,
    build_image,
    make_layer_tar,
    push_image,
    push_index,
)
from integration.harness.proxy import CountingProxy
from integration.harness.registry import RegistryServer
from snapshotter.config import Config, RegistryConfig, RegistrySettings
from snapshotter.errors import NotFound, Unavailable
from snapshotter.registry import AccessDenied, DigestMismatch, RegistryClient, RetryPolicy
from snapshotter.registry import mediatypes as mt

T = TypeVar("T")
NO_DOCKER_CONFIG = Path("/nonexistent/config.json")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 120)

    return asyncio.run(bounded())


def client_for(*hosts: str, **kwargs: object) -> RegistryClient:
    config = {h: RegistryConfig(plain_http=True) for h in hosts}
    kwargs.setdefault("docker_config", NO_DOCKER_CONFIG)
    kwargs.setdefault("backoff", 0.02)
    return RegistryClient(config, **kwargs)  # type: ignore[arg-type]


def special_tree(root: Path) -> Path:
    """Hardlink, symlink, fifo, setuid file, an xattr, a whiteout and an opaque marker."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("hello from clip\n")
    os.link(root / "etc" / "motd", root / "etc" / "motd.link")
    os.symlink("motd", root / "etc" / "motd.sym")
    os.mkfifo(root / "etc" / "fifo")
    tool = root / "tool"
    tool.write_bytes(b"\x7fELF fake")
    tool.chmod(0o4755)
    os.setxattr(tool, "user.clip", b"\x00\xffbinary")
    (root / ".wh.gone").write_bytes(b"")
    (root / "opaque").mkdir()
    (root / "opaque" / ".wh..wh..opq").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def three_layer_image(
    tmp_path_factory: pytest.TempPathFactory, registry: RegistryServer, host_tools_tree: Path
) -> BuiltImage:
    """gzip (GNU tar) + zstd (Python tarfile) + plain layers, one with a 1 MiB random file."""
    work = tmp_path_factory.mktemp("img3")
    big = work / "big"
    (big / "data").mkdir(parents=True)
    (big / "data" / "random.bin").write_bytes(os.urandom(1 << 20))
    layers = [
        make_layer_tar(host_tools_tree, work / "l0.tar.gz", compression="gzip", tool="gnu"),
        make_layer_tar(
            special_tree(work / "special"), work / "l1.tar.zst", compression="zstd", tool="python"
        ),
        make_layer_tar(big, work / "l2.tar", compression="none", tool="gnu"),
    ]
    oci = build_image(layers, work / "oci", cmd=["/bin/cat", "/etc/motd"], env=["A=1"])
    return push_image(oci, registry.host, "clip/three", "v1")


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[CountingProxy]:
    with CountingProxy(registry.host) as p:
        yield p


# ---------------------------------------------------------------- harness sanity


def test_pushed_image_is_what_skopeo_sees(three_layer_image: BuiltImage) -> None:
    """An independent client (skopeo) agrees with BuiltImage on digests and layers."""
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{three_layer_image.ref}"],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(out.stdout)
    assert info["Digest"] == three_layer_image.manifest_digest
    assert info["Layers"] == three_layer_image.layer_digests
    assert info["Env"] == ["A=1"]


def test_layer_tars_keep_special_entries(three_layer_image: BuiltImage) -> None:
    import zstandard

    blob = three_layer_image.layer_blobs[1].read_bytes()
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    import io

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["etc/motd.link"].islnk() and members["etc/motd.link"].linkname == "etc/motd"
    assert members["etc/motd.sym"].issym() and members["etc/fifo"].isfifo()
    assert members["tool"].mode & 0o4000
    assert "SCHILY.xattr.user.clip" in members["tool"].pax_headers
    assert ".wh.gone" in members and "opaque/.wh..wh..opq" in members
    assert three_layer_image.layer_media_types == [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
    ]


def test_host_rootfs_tree_runs_in_chroot(host_tools_tree: Path) -> None:
    out = subprocess.run(
        [
            "chroot",
            str(host_tools_tree),
            "/bin/sh",
            "-c",
            "echo hi | /usr/bin/sha256sum; /bin/ls /",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.startswith("98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4")
    assert "bin" in out.stdout.split()


def test_build_test_image_fixture(build_test_image: BuildTestImage, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("x")
    img = build_test_image([tree, tree], "clip/fixture", "t1", compression="zstd")
    assert len(img.layer_digests) == 2 and img.layer_digests[0] == img.layer_digests[1]

    async def check() -> None:
        async with client_for(img.registry_host) as client:
            resolved = await client.resolve(img.ref)
            assert [d.digest for d in resolved.layers] == img.layer_digests

    run(check())


# ---------------------------------------------------------------- client: pull


def test_resolve_matches_pushed_image(three_layer_image: BuiltImage) -> None:
    img = three_layer_image

    async def check() -> None:
        async with client_for(img.registry_host) as client:
            resolved = await client.resolve(img.ref)
            assert resolved.manifest_digest == img.manifest_digest
            assert resolved.media_type == mt.OCI_MANIFEST
            assert resolved.config.digest == img.config_digest
            assert [d.digest for d in resolved.layers] == img.layer_digests
            assert [d.size for d in resolved.layers] == img.layer_sizes
            assert [d.media_type for d in resolved.layers] == img.layer_media_types
            config = json.loads(resolved.config_bytes)
            assert config["config"]["Cmd"] == ["/bin/cat", "/etc/motd"]
            by_digest = await client.resolve(
                f"{img.registry_host}/{img.repo}@{img.manifest_digest}"
            )
            assert by_digest.manifest_bytes == resolved.manifest_bytes

    run(check())


def test_blobs_stream_and_ranges_are_byte_identical(three_layer_image: BuiltImage) -> None:
    img = three_layer_image

    async def check() -> None:
        async with client_for(img.registry_host) as client:
            for digest, size, path in zip(
                img.layer_digests, img.layer_sizes, img.layer_blobs, strict=True
            ):
                blob = path.read_bytes()
                streamed = b"".join([c async for c in client.open_blob(img.ref, digest, size=size)])
                assert streamed == blob
                for offset, length in ((0, 1), (size // 2, 4096), (size - 7, 7), (size - 3, 100)):
                    got = await client.read_range(img.ref, digest, offset, length)
                    assert got == blob[offset : offset + length]
            small = await client.fetch_blob(img.ref, img.config_digest)
            assert json.loads(small)["rootfs"]["type"] == "layers"

    run(check())


def test_errors_name_the_image(registry: RegistryServer, three_layer_image: BuiltImage) -> None:
    async def check() -> None:
        async with client_for(registry.host) as client:
            with pytest.raises(NotFound, match=f"image {registry.host}/clip/three:nope: manifest"):
                await client.resolve(f"{registry.host}/clip/three:nope")
            with pytest.raises(NotFound, match=f"image {registry.host}/clip/absent:v1"):
                await client.resolve(f"{registry.host}/clip/absent:v1")
            missing = "sha256:" + "1" * 64
            with pytest.raises(NotFound, match=f"blob {missing}"):
                await client.read_range(three_layer_image.ref, missing, 0, 10)
            with pytest.raises(
                NotFound, match="image is for platform linux/amd64, not linux/arm64"
            ):
                await client.resolve(three_layer_image.ref, platform="linux/arm64")

    run(check())


def test_index_platform_selection(
    tmp_path: Path, registry: RegistryServer, host_tools_tree: Path
) -> None:
    layer = make_layer_tar(host_tools_tree, tmp_path / "l.tar.gz")
    amd = push_image(build_image([layer], tmp_path / "amd"), registry.host, "clip/multi", "amd")
    arm_oci = build_image([layer], tmp_path / "arm", platform="linux/arm64/v8")
    arm = push_image(arm_oci, registry.host, "clip/multi", "arm")
    index_digest = push_index([amd, arm], "v1")
    only_arm = push_index([arm], "armonly", media_type=mt.DOCKER_MANIFEST_LIST)

    async def check() -> None:
        async with client_for(registry.host) as client:
            ref = f"{registry.host}/clip/multi:v1"
            got = await client.resolve(ref)
            assert got.manifest_digest == amd.manifest_digest and got.index_digest == index_digest
            got = await client.resolve(ref, platform="linux/arm64")
            assert got.manifest_digest == arm.manifest_digest
            with pytest.raises(NotFound, match=r"clip/multi:armonly: no manifest for platform "):
                await client.resolve(f"{registry.host}/clip/multi:armonly")
            assert only_arm

    run(check())


# ---------------------------------------------------------------- client: push


def test_push_then_read_with_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    """What the client pushes is a valid image for an independent client."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    artifact = tmp_path / "blob"
    artifact.write_bytes(os.urandom(300_000))
    ref = f"{registry.host}/clip/pushed:v1"

    async def push() -> str:
        async with client_for(registry.host) as client:
            cfg = await client.push_blob(ref, config)
            blob = await client.push_blob(ref, artifact)
            again = await client.push_blob(ref, artifact)
            assert again.digest == blob.digest
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": mt.OCI_MANIFEST,
                    "config": {"mediaType": mt.OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
                    "layers": [
                        {
                            "mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": blob.digest,
                            "size": blob.size,
                        }
                    ],
                }
            ).encode()
            digest = await client.push_manifest(ref, manifest, mt.OCI_MANIFEST)
            assert await client.read_range(ref, blob.digest, 5, 10) == artifact.read_bytes()[5:15]
            assert await client.blob_exists(ref, blob.digest)
            assert not await client.blob_exists(ref, "sha256:" + "2" * 64)
            return digest

    digest = run(push())
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True,
        capture_output=True,
    )
    assert "sha256:" + __import__("hashlib").sha256(out.stdout).hexdigest() == digest


# ---------------------------------------------------------------- basic auth (htpasswd)


@pytest.fixture(scope="module")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, host_tools_tree: Path
) -> Iterator[tuple[RegistryServer, BuiltImage]]:
    work = tmp_path_factory.mktemp("authreg")
    with RegistryServer(work / "reg", htpasswd=("clip", "s3cret")) as server:
        layer = make_layer_tar(host_tools_tree, work / "l.tar.gz")
        img = push_image(
            build_image([layer], work / "oci"),
            server.host,
            "private/app",
            "v1",
            auth=("clip", "s3cret"),
        )
        yield server, img


def test_basic_auth_from_docker_config(
    auth_registry: tuple[RegistryServer, BuiltImage], tmp_path: Path
) -> None:
    server, img = auth_registry
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(
        json.dumps({"auths": {f"http://{server.host}": {"username": "clip", "password": "s3cret"}}})
    )
    bad.write_text(json.dumps({"auths": {server.host: {"username": "clip", "password": "no"}}}))

    async def check() -> None:
        async with client_for(server.host, docker_config=good) as client:
            resolved = await client.resolve(img.ref)
            assert resolved.layers[0].digest == img.layer_digests[0]
            data = await client.read_range(img.ref, img.layer_digests[0], 100, 50)
            assert data == img.layer_blobs[0].read_bytes()[100:150]
            pushed = await client.push_blob(img.ref, b"pushed with basic auth")
            assert await client.fetch_blob(img.ref, pushed.digest) == b"pushed with basic auth"
        for config in (bad, NO_DOCKER_CONFIG):
            async with client_for(server.host, docker_config=config) as client:
                with pytest.raises(AccessDenied, match=f"image {img.ref}: access denied .*401"):
                    await client.resolve(img.ref)

    run(check())


# ---------------------------------------------------------------- through the counting proxy


def test_range_reads_move_only_the_asked_bytes_over_one_connection(
    proxy: CountingProxy, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    digest, size = img.layer_digests[2], img.layer_sizes[2]
    proxied = f"{proxy.host}/{img.repo}:{img.tag}"

    async def check() -> None:
        async with client_for(proxy.host) as client:
            for i in range(20):
                await client.read_range(proxied, digest, i * 4096, 4096)

    run(check())
    assert proxy.blob_requests(digest) == 20
    assert proxy.blob_bytes(digest) == 20 * 4096 < size
    assert proxy.connections == 1


def test_stream_counts_each_blob_once(proxy: CountingProxy, three_layer_image: BuiltImage) -> None:
    img = three_layer_image
    proxied = f"{proxy.host}/{img.repo}:{img.tag}"

    async def check() -> None:
        async with client_for(proxy.host) as client:
            resolved = await client.resolve(proxied)
            for layer in resolved.layers:
                async for _ in client.open_blob(resolved.pinned, layer.digest, size=layer.size):
                    pass

    run(check())
    for digest, size in zip(img.layer_digests, img.layer_sizes, strict=True):
        assert proxy.blob_requests(digest) == 1
        assert proxy.blob_bytes(digest) == size


@pytest.mark.parametrize("mode", ["refuse", "hang", "error"])
def test_outage_fails_naming_the_blob_then_recovers(
    proxy: CountingProxy, three_layer_image: BuiltImage, mode: str
) -> None:
    img = three_layer_image
    proxied = f"{proxy.host}/{img.repo}:{img.tag}"
    digest = img.layer_digests[0]
    blob = img.layer_blobs[0].read_bytes()
    offset = [0.0]

    async def check() -> None:
        async with client_for(
            proxy.host, timeout=0.5, retries=2, clock=lambda: time.monotonic() + offset[0]
        ) as client:
            assert await client.read_range(proxied, digest, 0, 10) == blob[:10]
            proxy.pause(mode)
            with pytest.raises(Unavailable, match=f"image {proxied}: blob {digest}"):
                await client.read_range(proxied, digest, 10, 10)
            # the breaker is open now: the next read fails at once, without a request
            requests = proxy.total_requests
            with pytest.raises(Unavailable, match=f"{proxy.host} is failing"):
                await client.read_range(proxied, digest, 10, 10)
            assert proxy.total_requests == requests
            proxy.resume()
            offset[0] += client.policy.cooldown  # the cool-down passes: one probe goes out
            assert await client.read_range(proxied, digest, 10, 10) == blob[10:20]

    run(check())


def test_mirror_serves_then_upstream_takes_over(
    proxy: CountingProxy, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    hosts = {
        img.registry_host: RegistryConfig(plain_http=True, mirrors=(f"http://{proxy.host}",)),
    }

    async def check() -> None:
        async with RegistryClient(hosts, NO_DOCKER_CONFIG, timeout=2, retries=0) as client:
            await client.read_range(img.ref, img.layer_digests[0], 0, 100)
            assert proxy.blob_bytes(img.layer_digests[0]) == 100
            proxy.pause("refuse")
            data = await client.read_range(img.ref, img.layer_digests[0], 100, 100)
            assert data == img.layer_blobs[0].read_bytes()[100:200]
            proxy.resume()
        assert proxy.blob_bytes(img.layer_digests[0]) == 100

    run(check())


def test_registry_restart_keeps_storage(tmp_path: Path, host_tools_tree: Path) -> None:
    with RegistryServer(tmp_path / "reg") as server:
        layer = make_layer_tar(host_tools_tree, tmp_path / "l.tar.gz", compression="zstd")
        img = push_image(build_image([layer], tmp_path / "oci"), server.host, "r/app", "v1")
        pid = server.pid
        server.stop()
        assert server.pid is None

        async def down() -> None:
            async with client_for(server.host, retries=0) as client:
                with pytest.raises(Unavailable, match="cannot connect"):
                    await client.resolve(img.ref)

        run(down())
        server.start()
        assert server.pid != pid

        async def up() -> None:
            async with client_for(server.host) as client:
                assert (await client.resolve(img.ref)).manifest_digest == img.manifest_digest

        run(up())


def test_tampered_and_truncated_blobs_from_a_real_registry(
    tmp_path: Path, host_tools_tree: Path
) -> None:
    """The registry serves whatever is on its disk; the client must notice and name it."""
    with RegistryServer(tmp_path / "reg") as server:
        layer = make_layer_tar(host_tools_tree, tmp_path / "l.tar.gz")
        img = push_image(build_image([layer], tmp_path / "oci"), server.host, "bad/app", "v1")
        digest, size = img.layer_digests[0], img.layer_sizes[0]
        blob = img.layer_blobs[0].read_bytes()
        server.replace_blob(digest, blob[:-1] + bytes([blob[-1] ^ 0xFF]))

        async def check() -> None:
            async with client_for(server.host) as client:
                resolved = await client.resolve(img.ref)
                with pytest.raises(DigestMismatch, match=f"{digest} does not match its content"):
                    async for _ in client.open_blob(resolved.pinned, digest, size=size):
                        pass
                server.replace_blob(digest, blob[: size // 2])
                with pytest.raises(DigestMismatch, match=f"is {size // 2} bytes, the manifest"):
                    async for _ in client.open_blob(resolved.pinned, digest, size=size):
                        pass

        run(check())


# ---------------------------------------------------------------- containerd's hosts.toml


def write_containerd_config(tmp_path: Path, hosts: dict[str, str]) -> Config:
    """containerd's config.toml with a config_path of hosts.toml files, as clip.toml names it."""
    certs = tmp_path / "certs.d"
    for host, text in hosts.items():
        (certs / host).mkdir(parents=True)
        (certs / host / "hosts.toml").write_text(text)
    path = tmp_path / "containerd.toml"
    path.write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'  config_path = "{certs}"\n'
    )
    return Config(registry_settings=RegistrySettings(containerd_config=str(path)))


def test_host_reachable_only_through_a_hosts_toml_mirror(
    tmp_path: Path, registry: RegistryServer, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    # a registry name that resolves nowhere: only containerd's mirror entry reaches it
    name = "clip-only.invalid:5000"
    config = write_containerd_config(
        tmp_path,
        {name: f'[host."http://{registry.host}"]\n  capabilities = ["pull", "resolve"]\n'},
    )
    ref = f"{name}/{img.repo}:{img.tag}"
    blob = img.layer_blobs[1].read_bytes()

    async def check() -> None:
        async with RegistryClient.from_config(config, docker_config=NO_DOCKER_CONFIG) as client:
            image = await client.resolve(ref)
            assert image.manifest_digest == img.manifest_digest
            assert [d.digest for d in image.layers] == img.layer_digests
            data = await client.read_range(image.pinned, img.layer_digests[1], 100, 5000)
            assert data == blob[100:5100]
            assert await client.blob_exists(image.pinned, img.layer_digests[1])

    run(check())


def test_hung_mirror_hands_over_to_the_registry(
    tmp_path: Path, proxy: CountingProxy, registry: RegistryServer, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    config = write_containerd_config(
        tmp_path,
        {
            registry.host: f'server = "http://{registry.host}"\n'
            f'[host."http://{proxy.host}"]\n  capabilities = ["pull", "resolve"]\n'
        },
    )
    digest = img.layer_digests[0]
    blob = img.layer_blobs[0].read_bytes()
    policy = RetryPolicy(connect_timeout=0.5, response_timeout=0.5, operation_timeout=5.0)

    async def check() -> None:
        async with RegistryClient.from_config(config, docker_config=NO_DOCKER_CONFIG) as client:
            client.policy = policy
            assert await client.read_range(img.ref, digest, 0, 100) == blob[:100]
            assert proxy.blob_requests(digest) == 1  # the mirror served it
            proxy.pause("hang")
            sent = []
            for i in range(1, 5):
                before = client.stats["requests"]
                data = await client.read_range(img.ref, digest, i * 100, 100)
                assert data == blob[i * 100 : (i + 1) * 100]
                sent.append(client.stats["requests"] - before)
            # three reads each lost one first-byte timeout to the mirror and went on to the
            # registry at once; then the mirror's breaker was open and the fourth read went
            # straight to the registry
            assert sent == [2, 2, 2, 1]
            assert client.breaker_state(proxy.host) == "open"
            assert client.stats["retries"] == 0
            proxy.resume()

    run(check())


def test_404_mirror_hands_over_at_once_and_optional_lookups_stop_there(
    tmp_path: Path, proxy: CountingProxy, registry: RegistryServer, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    config = write_containerd_config(
        tmp_path,
        {
            registry.host: f'server = "http://{registry.host}"\n'
            f'[host."http://{proxy.host}"]\n  capabilities = ["pull", "resolve"]\n'
        },
    )
    digest = img.layer_digests[2]
    blob = img.layer_blobs[2].read_bytes()

    async def check() -> None:
        async with RegistryClient.from_config(config, docker_config=NO_DOCKER_CONFIG) as client:
            proxy.pause("notfound")
            assert await client.read_range(img.ref, digest, 7, 70) == blob[7:77]
            image = await client.resolve(img.ref)
            assert image.manifest_digest == img.manifest_digest
            # a tag that exists nowhere: the registry's 404 after the mirror's is the answer
            with pytest.raises(NotFound, match=f"manifest nope not found on {registry.host}"):
                await client.fetch_manifest(img.ref, "nope", optional=True)
            assert await client.fetch_referrers(img.ref, img.manifest_digest, "x/y") is None
            assert client.stats["retries"] == 0
            assert client.breaker_state(proxy.host) == "closed"  # 404 is an answer
            proxy.resume()

    run(check())
    assert proxy.total_requests >= 4  # the mirror was asked first every time


# ---------------------------------------------------------------- clip pull's error line


def test_clip_pull_tells_clip_unreachable_from_containerd_unreachable(
    tmp_path: Path, three_layer_image: BuiltImage
) -> None:
    img = three_layer_image
    dead_clip = tmp_path / "no-clip.sock"
    with Containerd(tmp_path / "containerd", dead_clip, tmp_path / "clip-root") as containerd:
        result = clip_pull(containerd.socket, "default", img.ref, timeout=120)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("clip: clip (containerd's 'clip' snapshotter) is unreachable"), line
    assert str(dead_clip) in line and f"layer {img.layer_digests[0]} of {img.ref}" in line
    assert "Traceback" not in line and len(line.splitlines()) == 1

    result = clip_pull(tmp_path / "no-containerd.sock", "default", img.ref, timeout=120)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"clip: containerd at {tmp_path / 'no-containerd.sock'} is unreachable")
    assert "Traceback" not in line
