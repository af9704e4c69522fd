"""The registry client against real HTTP peers: aiohttp servers started on loopback by the test.

These cover what Debian's docker-registry cannot be made to do: bearer-token auth, redirects
to separate blob storage, 5xx bursts, stalls, connections cut mid-blob, servers that ignore
Range, mirrors, TLS failures, manifest lists with several platforms.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from snapshotter.config import RegistryConfig
from snapshotter.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from snapshotter.registry import (
    AccessDenied,
    ContainerdRegistry,
    Credentials,
    DigestMismatch,
    RegistryClient,
    RegistryHosts,
)
from snapshotter.registry import mediatypes as mt

BLOB = bytes(range(256)) * 1200  # 300 KiB, every offset distinguishable mod 256
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@dataclass
class Behaviour:
    """Knobs a test turns on the fake registry; counters it reads back."""

    token_auth: bool = False
    token_creds: tuple[str, str] | None = None
    fail_next: int = 0
    fail_status: int = 503
    stall_seconds: float = 0.0
    cut_after: int | None = None
    cut_times: int = 0
    ignore_range: bool = False
    redirect_blobs_to: str | None = None
    redirect_query: str = "sig=1"
    tamper: bool = False
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    token_requests: int = 0


class Peer:
    """An aiohttp application on 127.0.0.1:<free port> inside the test's event loop."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.host = ""

    async def __aenter__(self) -> Peer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.host = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


class FakeRegistry:
    """Just enough of the distribution API: manifests, blobs with Range, a token endpoint."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.b = behaviour or Behaviour()
        self.blobs: dict[str, bytes] = {BLOB_DIGEST: BLOB}
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.app = web.Application()
        self.app.router.add_get("/token", self.token)
        self.app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", self.manifest)
        self.app.router.add_post("/v2/{name:.+}/blobs/uploads/", self.start_upload)
        self.app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self.blob)
        self.host = ""

    def add_image(
        self, repo_tag: str, *, platform: tuple[str, str, str] = ("linux", "amd64", "")
    ) -> tuple[bytes, str]:
        """Store config + manifest (layer = BLOB) under a tag; returns manifest bytes, digest."""
        os_, arch, variant = platform
        config = canonical({"os": os_, "architecture": arch, "variant": variant, "rootfs": {}})
        self.blobs[sha(config)] = config
        manifest = canonical(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_MANIFEST,
                "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(config), "size": len(config)},
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": BLOB_DIGEST,
                        "size": len(BLOB),
                        "annotations": {"a": "b"},
                    }
                ],
            }
        )
        self.manifests[sha(manifest)] = (manifest, mt.OCI_MANIFEST)
        self.manifests[repo_tag] = (manifest, mt.OCI_MANIFEST)
        return manifest, sha(manifest)

    def add_index(self, tag: str, entries: list[tuple[str, tuple[str, str, str]]]) -> bytes:
        manifests = []
        for digest, (os_, arch, variant) in entries:
            plat = {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})}
            size = len(self.manifests[digest][0])
            manifests.append(
                {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": size, "platform": plat}
            )
        index = canonical(
            {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": manifests}
        )
        self.manifests[tag] = (index, mt.DOCKER_MANIFEST_LIST)
        return index

    def challenge(self, request: web.Request) -> web.Response | None:
        name = request.match_info["name"]
        if not self.b.token_auth or request.headers.get("Authorization") == f"Bearer tok-{name}":
            return None
        realm = f"http://{self.host}/token"
        header = f'Bearer realm="{realm}",service="fake",scope="repository:{name}:pull"'
        return web.Response(status=401, headers={"WWW-Authenticate": header})

    async def token(self, request: web.Request) -> web.Response:
        self.b.token_requests += 1
        if self.b.token_creds is not None:
            user, password = self.b.token_creds
            if request.headers.get("Authorization") != Credentials(user, password).basic_header():
                return web.Response(status=401)
        name = request.query["scope"].split(":")[1]
        assert request.query["service"] == "fake"
        return web.json_response({"token": f"tok-{name}", "expires_in": 300})

    async def gate(self, request: web.Request) -> web.StreamResponse | None:
        self.b.seen.append((request.method, request.path, dict(request.headers)))
        if self.b.stall_seconds:
            await asyncio.sleep(self.b.stall_seconds)
        if self.b.fail_next:
            self.b.fail_next -= 1
            return web.Response(status=self.b.fail_status)
        return self.challenge(request)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        early = await self.gate(request)
        if early is not None:
            return early
        name, ref = request.match_info["name"], request.match_info["ref"]
        if request.method == "PUT":
            body = await request.read()
            self.manifests[f"{name}:{ref}"] = (body, request.content_type)
            return web.Response(status=201, headers={"Docker-Content-Digest": sha(body)})
        key = ref if ref.startswith("sha256:") else f"{name}:{ref}"
        if key not in self.manifests:
            return web.Response(status=404)
        body, media_type = self.manifests[key]
        return web.Response(body=body, headers={"Content-Type": media_type})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        early = await self.gate(request)
        if early is not None:
            return early
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(self.blobs[digest]))})
        if self.b.redirect_blobs_to:
            target = f"http://{self.b.redirect_blobs_to}/storage/{digest}?{self.b.redirect_query}"
            raise web.HTTPTemporaryRedirect(target)
        data = self.blobs[digest]
        if self.b.tamper:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return await serve_bytes(request, data, self.b)

    async def start_upload(self, request: web.Request) -> web.StreamResponse:
        early = await self.gate(request)
        if early is not None:
            return early
        name = request.match_info["name"]
        return web.Response(status=202, headers={"Location": f"/upload/{name}/u1?state=s"})


async def serve_bytes(request: web.Request, data: bytes, b: Behaviour) -> web.StreamResponse:
    """Serve ``data`` honouring one Range header, optionally cutting the connection short."""
    range_header = request.headers.get("Range")
    status, start = 200, 0
    if range_header and not b.ignore_range:
        first, _, last = range_header.removeprefix("bytes=").partition("-")
        start = int(first)
        end = min(int(last), len(data) - 1) if last else len(data) - 1
        if start >= len(data):
            return web.Response(status=416)
        status, data = 206, data[start : end + 1]
    resp = web.StreamResponse(status=status)
    resp.content_length = len(data)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/*"
    await resp.prepare(request)
    if b.cut_after is not None and b.cut_times > 0 and len(data) > b.cut_after:
        b.cut_times -= 1
        await resp.write(data[: b.cut_after])
        assert request.transport is not None
        request.transport.close()
        return resp
    await resp.write(data)
    return resp


def add_upload_routes(reg: FakeRegistry) -> None:
    async def put(request: web.Request) -> web.Response:
        assert request.query["state"] == "s"
        body = await request.read()
        assert sha(body) == request.query["digest"]
        reg.blobs[request.query["digest"]] = body
        return web.Response(status=201)

    reg.app.router.add_put("/upload/{name:.+}/u1", put)


Scenario = Callable[[FakeRegistry, RegistryClient], Awaitable[None]]


def with_registry(
    scenario: Scenario, behaviour: Behaviour | None = None, **client_kwargs: Any
) -> None:
    """Run ``scenario`` against a fresh fake registry and a client configured for it."""

    async def main() -> None:
        reg = FakeRegistry(behaviour)
        add_upload_routes(reg)
        reg.add_image("app:v1")
        async with Peer(reg.app) as peer:
            reg.host = peer.host
            hosts = client_kwargs.pop("hosts", {peer.host: RegistryConfig(plain_http=True)})
            client_kwargs.setdefault("backoff", 0.01)
            async with RegistryClient(
                hosts, docker_config=Path("/nonexistent"), **client_kwargs
            ) as client:
                await scenario(reg, client)

    run(main())


# ---------------------------------------------------------------- resolve


def test_resolve_single_manifest_and_fetch_layer() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        img = await client.resolve(f"{reg.host}/app:v1")
        manifest, digest = reg.manifests["app:v1"][0], sha(reg.manifests["app:v1"][0])
        assert img.manifest_digest == digest and img.manifest_bytes == manifest
        assert img.media_type == mt.OCI_MANIFEST and img.index_digest is None
        assert [(d.digest, d.size, dict(d.annotations)) for d in img.layers] == [
            (BLOB_DIGEST, len(BLOB), {"a": "b"})
        ]
        assert json.loads(img.config_bytes)["architecture"] == "amd64"
        assert img.pinned.digest == digest
        assert await client.fetch_blob(img.pinned, BLOB_DIGEST, size=len(BLOB)) == BLOB
        accept = reg.b.seen[0][2]["Accept"]
        assert mt.OCI_INDEX in accept and mt.DOCKER_MANIFEST in accept

    with_registry(scenario)


def test_resolve_index_picks_platform_and_reports_missing_one() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        _, amd = reg.add_image("multi:amd", platform=("linux", "amd64", ""))
        _, arm = reg.add_image("multi:arm", platform=("linux", "arm64", "v8"))
        _, arm7 = reg.add_image("multi:arm7", platform=("linux", "arm", "v7"))
        index = reg.add_index(
            "multi:latest",
            [
                (arm7, ("linux", "arm", "v7")),
                (arm, ("linux", "arm64", "v8")),
                (amd, ("linux", "amd64", "")),
            ],
        )
        img = await client.resolve(f"{reg.host}/multi")
        assert img.manifest_digest == amd
        assert img.index_digest == sha(index) and img.index_bytes == index
        assert (await client.resolve(f"{reg.host}/multi", "linux/arm64")).manifest_digest == arm
        assert (await client.resolve(f"{reg.host}/multi", "linux/arm")).manifest_digest == arm7
        with pytest.raises(
            NotFound,
            match=r"multi:latest: no manifest for platform linux/s390x "
            r"\(index offers linux/arm/v7, linux/arm64, linux/amd64\)",
        ):
            await client.resolve(f"{reg.host}/multi", "linux/s390x")
        with pytest.raises(NotFound, match="image is for platform linux/arm64, not linux/amd64"):
            await client.resolve(f"{reg.host}/multi:arm")

    with_registry(scenario)


def test_resolve_rejects_schema1_and_tampered_manifest() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        reg.manifests["old:v1"] = (b'{"schemaVersion":1,"fsLayers":[]}', mt.DOCKER_SCHEMA1[1])
        with pytest.raises(InvalidArgument, match="old:v1: Docker schema 1"):
            await client.resolve(f"{reg.host}/old:v1")
        good = "sha256:" + "0" * 64
        reg.manifests[good] = reg.manifests["app:v1"]
        with pytest.raises(DigestMismatch, match=f"manifest {good} has digest"):
            await client.resolve(f"{reg.host}/app@{good}")
        with pytest.raises(NotFound, match=f"{reg.host}/app:nope: manifest nope not found"):
            await client.resolve(f"{reg.host}/app:nope")

    with_registry(scenario)


# ---------------------------------------------------------------- auth


def test_anonymous_bearer_token_fetched_once_and_reused() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        img = await client.resolve(f"{reg.host}/app:v1")
        await client.read_range(img.pinned, BLOB_DIGEST, 0, 10)
        await client.fetch_blob(img.pinned, BLOB_DIGEST)
        assert reg.b.token_requests == 1
        assert reg.b.seen[-1][2]["Authorization"] == "Bearer tok-app"

    with_registry(scenario, Behaviour(token_auth=True))


def test_concurrent_cold_requests_share_one_token() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        ref = f"{reg.host}/app:v1"
        reads = [client.read_range(ref, BLOB_DIGEST, i * 100, 100) for i in range(16)]
        results = await asyncio.gather(*reads)
        assert results == [BLOB[i * 100 : (i + 1) * 100] for i in range(16)]
        assert reg.b.token_requests == 1

    with_registry(scenario, Behaviour(token_auth=True))


def test_bearer_token_with_docker_config_credentials(tmp_path: Path) -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {reg.host: {"username": "u", "password": "pw"}}}))
        hosts = {reg.host: RegistryConfig(plain_http=True)}
        async with RegistryClient(hosts, docker_config=config, backoff=0.01) as authed:
            assert (await authed.resolve(f"{reg.host}/app:v1")).layers[0].digest == BLOB_DIGEST
        with pytest.raises(AccessDenied, match=f"image {reg.host}/app:v1: access denied by token"):
            await client.resolve(f"{reg.host}/app:v1")

    with_registry(scenario, Behaviour(token_auth=True, token_creds=("u", "pw")))


def test_containerd_configs_auth_beats_docker_config(tmp_path: Path) -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {reg.host: {"username": "u", "password": "bad"}}}))
        containerd = ContainerdRegistry(auths={reg.host: Credentials("u", "pw")})
        hosts = RegistryHosts({reg.host: RegistryConfig(plain_http=True)}, containerd)
        async with RegistryClient(hosts, docker_config=config, backoff=0.01) as authed:
            await authed.resolve(f"{reg.host}/app:v1")

    with_registry(scenario, Behaviour(token_auth=True, token_creds=("u", "pw")))


def test_403_is_access_denied_naming_image() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        with pytest.raises(AccessDenied, match=f"image {reg.host}/app:v1: access denied .*403"):
            await client.resolve(f"{reg.host}/app:v1")

    with_registry(scenario, Behaviour(fail_next=1, fail_status=403))


# ---------------------------------------------------------------- redirects and ranges


def test_redirect_to_storage_keeps_range_and_drops_authorization() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        storage_seen: list[dict[str, str]] = []

        async def storage(request: web.Request) -> web.StreamResponse:
            storage_seen.append(dict(request.headers))
            return await serve_bytes(request, reg.blobs[request.match_info["digest"]], Behaviour())

        app = web.Application()
        app.router.add_get("/storage/{digest}", storage)
        async with Peer(app) as store:
            reg.b.redirect_blobs_to = store.host
            img = await client.resolve(f"{reg.host}/app:v1")  # config is redirected too
            assert await client.read_range(img.pinned, BLOB_DIGEST, 1000, 777) == BLOB[1000:1777]
            streamed = b"".join([c async for c in client.open_blob(img.pinned, BLOB_DIGEST)])
            assert streamed == BLOB
        assert len(storage_seen) == 3
        assert all("Authorization" not in h for h in storage_seen)
        assert storage_seen[1]["Range"] == "bytes=1000-1776"
        blob_requests = [h for m, p, h in reg.b.seen if "/blobs/" in p and "Authorization" in h]
        assert blob_requests, "the registry itself must still get the token"

    with_registry(scenario, Behaviour(token_auth=True))


def test_read_range_edges() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        ref = f"{reg.host}/app:v1"
        assert await client.read_range(ref, BLOB_DIGEST, 0, 1) == BLOB[:1]
        assert await client.read_range(ref, BLOB_DIGEST, len(BLOB) - 5, 100) == BLOB[-5:]
        assert await client.read_range(ref, BLOB_DIGEST, 5, 0) == b""
        with pytest.raises(InvalidArgument, match="outside the blob"):
            await client.read_range(ref, BLOB_DIGEST, len(BLOB) + 10, 10)
        with pytest.raises(InvalidArgument, match="bad range"):
            await client.read_range(ref, BLOB_DIGEST, -1, 10)
        with pytest.raises(NotFound, match=r"blob sha256:0+ range 0\+10 not found"):
            await client.read_range(ref, "sha256:" + "0" * 64, 0, 10)

    with_registry(scenario)


def test_read_range_when_server_ignores_range() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        ref = f"{reg.host}/app:v1"
        assert await client.read_range(ref, BLOB_DIGEST, 200_000, 5000) == BLOB[200_000:205_000]

    with_registry(scenario, Behaviour(ignore_range=True))


# ---------------------------------------------------------------- failures and retries


def test_5xx_burst_is_retried() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        data = await client.read_range(f"{reg.host}/app:v1", BLOB_DIGEST, 10, 10)
        assert data == BLOB[10:20]
        assert client.stats["retries"] == 2

    with_registry(scenario, Behaviour(fail_next=2), retries=3)


def test_5xx_beyond_retry_budget_is_unavailable() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        with pytest.raises(
            Unavailable,
            match=r"app:v1: manifest v1 failed after 3 attempts in .*s \(deadline .*s\): "
            r"127\.0\.0\.1:\d+: HTTP 502$",
        ):
            await client.resolve(f"{reg.host}/app:v1")
        assert len(reg.b.seen) == 3

    with_registry(scenario, Behaviour(fail_next=10, fail_status=502), retries=2)


def test_other_4xx_is_failed_precondition() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        with pytest.raises(FailedPrecondition, match="HTTP 400"):
            await client.resolve(f"{reg.host}/app:v1")

    with_registry(scenario, Behaviour(fail_next=1, fail_status=400))


def test_stalled_server_is_unavailable_naming_the_blob() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        with pytest.raises(
            Unavailable, match=r"app:v1: blob .* failed after 2 attempts in .*s \(deadline .*s\): "
            r".*timed out"
        ):
            await client.read_range(f"{reg.host}/app:v1", BLOB_DIGEST, 0, 10)

    with_registry(scenario, Behaviour(stall_seconds=30), timeout=0.3, retries=1)


def test_connection_refused_is_unavailable() -> None:
    async def main() -> None:
        hosts = {"127.0.0.1:9": RegistryConfig(plain_http=True)}
        async with RegistryClient(
            hosts, docker_config=Path("/nonexistent"), retries=1, backoff=0.01
        ) as client:
            with pytest.raises(
                Unavailable,
                match=r"image 127\.0\.0\.1:9/x:y: manifest y failed after 2 attempts in .*s "
                r"\(deadline .*s\): "
                r"127\.0\.0\.1:9: cannot connect",
            ):
                await client.resolve("127.0.0.1:9/x:y")

    run(main())


def test_stream_resumes_after_connection_cut() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        chunks = [
            c async for c in client.open_blob(f"{reg.host}/app:v1", BLOB_DIGEST, size=len(BLOB))
        ]
        assert b"".join(chunks) == BLOB
        ranges = [h.get("Range") for m, p, h in reg.b.seen if p.endswith(BLOB_DIGEST)]
        assert ranges[0] is None and (ranges[1] or "").startswith("bytes=")
        assert len(ranges) == 3

    with_registry(scenario, Behaviour(cut_after=100_000, cut_times=2))


def test_stream_gives_up_after_retry_budget() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        with pytest.raises(Unavailable, match="stream broke 2 times"):
            async for _ in client.open_blob(f"{reg.host}/app:v1", BLOB_DIGEST):
                pass

    with_registry(scenario, Behaviour(cut_after=10, cut_times=100), retries=1)


def test_tampered_and_truncated_blobs_are_rejected() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        ref = f"{reg.host}/app:v1"
        with pytest.raises(DigestMismatch, match=f"{BLOB_DIGEST} does not match its content"):
            async for _ in client.open_blob(ref, BLOB_DIGEST):
                pass
        with pytest.raises(DigestMismatch, match="does not match its content"):
            await client.fetch_blob(ref, BLOB_DIGEST)
        reg.b.tamper = False
        with pytest.raises(DigestMismatch, match=f"is {len(BLOB)} bytes, the manifest says 5"):
            await client.fetch_blob(ref, BLOB_DIGEST, size=5)

    with_registry(scenario, Behaviour(tamper=True))


# ---------------------------------------------------------------- mirrors


def test_mirrors_tried_in_order_then_upstream() -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        empty = FakeRegistry()
        empty.blobs.clear()
        served = FakeRegistry()
        served.add_image("app:v1")
        async with Peer(empty.app) as dead_mirror, Peer(served.app) as mirror:
            empty.host, served.host = dead_mirror.host, mirror.host
            hosts = {
                reg.host: RegistryConfig(
                    plain_http=True,
                    mirrors=("127.0.0.1:9", f"http://{dead_mirror.host}", mirror.host),
                )
            }
            hosts[mirror.host] = RegistryConfig(plain_http=True)
            hosts["127.0.0.1:9"] = RegistryConfig(plain_http=True)
            async with RegistryClient(
                hosts, docker_config=Path("/none"), retries=0, backoff=0.01
            ) as mirrored:
                img = await mirrored.resolve(f"{reg.host}/app:v1")
                assert img.layers[0].digest == BLOB_DIGEST
                assert reg.b.seen == []  # the mirror served everything
                served.manifests.clear()
                await mirrored.resolve(f"{reg.host}/app:v1")  # falls back to upstream
                assert [p for _, p, _ in reg.b.seen] == ["/v2/app/manifests/v1"]
            assert len(empty.b.seen) == 4  # manifest + config, twice

    with_registry(scenario)


# ---------------------------------------------------------------- push


def test_push_blob_and_manifest(tmp_path: Path) -> None:
    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        ref = f"{reg.host}/pushed:v2"
        desc = await client.push_blob(ref, b"new blob")
        assert desc.digest == sha(b"new blob") and reg.blobs[desc.digest] == b"new blob"
        path = tmp_path / "f"
        path.write_bytes(b"from a file" * 1000)
        assert (await client.push_blob(ref, path)).digest == sha(path.read_bytes())
        assert reg.blobs[sha(path.read_bytes())] == path.read_bytes()
        puts = len(reg.b.seen)
        await client.push_blob(ref, b"new blob")  # already there: HEAD only
        assert [m for m, _, _ in reg.b.seen[puts:]] == ["HEAD"]
        digest = await client.push_manifest(ref, b'{"schemaVersion":2}', mt.OCI_MANIFEST)
        assert reg.manifests["pushed:v2"] == (b'{"schemaVersion":2}', mt.OCI_MANIFEST)
        assert digest == sha(b'{"schemaVersion":2}')

    with_registry(scenario)


# ---------------------------------------------------------------- TLS


def test_tls_certificate_error_is_unavailable(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def main() -> None:
        reg = FakeRegistry()
        reg.add_image("app:v1")
        async with Peer(reg.app, ssl_context=ctx) as peer:
            reg.host = peer.host
            async with RegistryClient(docker_config=Path("/none"), backoff=0.01) as client:
                with pytest.raises(
                    Unavailable,
                    match=f"image {peer.host}/app:v1: TLS error talking to {peer.host}: "
                    "CERTIFICATE_VERIFY_FAILED",
                ):
                    await client.resolve(f"{peer.host}/app:v1")
            plain_reg = FakeRegistry()
            async with (
                Peer(plain_reg.app) as plain,
                RegistryClient(docker_config=Path("/none"), retries=0) as client,
            ):
                with pytest.raises(Unavailable, match="set plain_http for this host"):
                    await client.resolve(f"{plain.host}/app:v1")
            insecure = {peer.host: RegistryConfig(skip_verify=True)}
            async with RegistryClient(insecure, docker_config=Path("/none")) as client:
                assert (await client.resolve(f"{peer.host}/app:v1")).layers

    run(main())


# ---------------------------------------------------------------- redirect cache


class Storage:
    """Blob storage behind a registry's redirects: counts requests, can refuse the next ones."""

    def __init__(self, reg: FakeRegistry) -> None:
        self.reg = reg
        self.seen: list[str | None] = []
        self.refuse_next = 0
        self.app = web.Application()
        self.app.router.add_get("/storage/{digest}", self.get)

    async def get(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Range"))
        if self.refuse_next:
            self.refuse_next -= 1
            return web.Response(status=403, text="signature expired")
        return await serve_bytes(request, self.reg.blobs[request.match_info["digest"]], Behaviour())


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def registry_blob_gets(reg: FakeRegistry) -> int:
    return sum(1 for m, p, _ in reg.b.seen if m == "GET" and p.endswith(BLOB_DIGEST))


def with_storage(
    scenario: Callable[[FakeRegistry, Storage, RegistryClient, Clock, Clock], Awaitable[None]],
    behaviour: Behaviour | None = None,
) -> None:
    async def main() -> None:
        reg = FakeRegistry(behaviour)
        reg.add_image("app:v1")
        storage = Storage(reg)
        clock, wall = Clock(), Clock(1_700_000_000.0)
        async with Peer(reg.app) as peer, Peer(storage.app) as store:
            reg.host, reg.b.redirect_blobs_to = peer.host, store.host
            hosts = {peer.host: RegistryConfig(plain_http=True)}
            async with RegistryClient(
                hosts, Path("/nonexistent"), clock=clock, wall_clock=wall
            ) as client:
                await scenario(reg, storage, client, clock, wall)

    run(main())


def test_redirect_is_reused_until_its_ttl_then_the_registry_is_asked_again() -> None:
    async def scenario(
        reg: FakeRegistry, storage: Storage, client: RegistryClient, clock: Clock, _: Clock
    ) -> None:
        ref = f"{reg.host}/app:v1"
        for i in range(5):
            assert await client.read_range(ref, BLOB_DIGEST, i * 100, 100) == BLOB[i * 100 :][:100]
        assert registry_blob_gets(reg) == 2  # the 401 challenge, then with the token
        assert len(storage.seen) == 5 and storage.seen[4] == "bytes=400-499"
        assert client.stats["redirect_hits"] == 4
        clock.now += client.policy.redirect_ttl - 1
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        assert registry_blob_gets(reg) == 2  # still valid
        clock.now += 2
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        assert registry_blob_gets(reg) == 3  # expired: through the registry again

    with_storage(scenario, Behaviour(token_auth=True))


def test_redirect_refused_by_storage_goes_through_the_registry_again() -> None:
    async def scenario(
        reg: FakeRegistry, storage: Storage, client: RegistryClient, clock: Clock, _: Clock
    ) -> None:
        ref = f"{reg.host}/app:v1"
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        storage.refuse_next = 1
        assert await client.read_range(ref, BLOB_DIGEST, 10, 10) == BLOB[10:20]
        assert registry_blob_gets(reg) == 2 and len(storage.seen) == 3
        await client.read_range(ref, BLOB_DIGEST, 20, 10)
        assert registry_blob_gets(reg) == 2  # the fresh redirect is reused again
        streamed = b"".join([c async for c in client.open_blob(ref, BLOB_DIGEST)])
        assert streamed == BLOB and registry_blob_gets(reg) == 2

    with_storage(scenario)


def test_redirect_expiry_hint_in_the_signed_url_is_honoured() -> None:
    async def scenario(
        reg: FakeRegistry, storage: Storage, client: RegistryClient, clock: Clock, wall: Clock
    ) -> None:
        signed = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall.now))
        reg.b.redirect_query = f"X-Amz-Date={signed}&X-Amz-Expires=30&X-Amz-Signature=x"
        ref = f"{reg.host}/app:v1"
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        clock.now += 20  # within 30 s minus the safety margin
        wall.now += 20
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        assert registry_blob_gets(reg) == 1
        clock.now += 6  # past 30 s - 5 s: not used any more, although the TTL is 60 s
        wall.now += 6
        await client.read_range(ref, BLOB_DIGEST, 0, 10)
        assert registry_blob_gets(reg) == 2

    with_storage(scenario)


def test_redirect_expiry_parsing() -> None:
    from yarl import URL

    from snapshotter.registry.client import redirect_expiry

    amz = URL("https://s3/x?X-Amz-Date=20240101T000000Z&X-Amz-Expires=600")
    assert redirect_expiry(amz) == 1704067200 + 600
    goog = URL("https://gcs/x?X-Goog-Date=20240101T000000Z&X-Goog-Expires=60")
    assert redirect_expiry(goog) == 1704067200 + 60
    assert redirect_expiry(URL("https://cf/x?Expires=1704067800&Signature=s")) == 1704067800
    assert redirect_expiry(URL("https://az/x?se=2024-01-01T00:10:00Z&sig=s")) == 1704067800
    assert redirect_expiry(URL("https://plain/x?sig=1")) is None


# ---------------------------------------------------------------- a real hung socket


class HungServer:
    """Accepts connections and reads requests; answers nothing until ``answering`` is set."""

    def __init__(self) -> None:
        self.answering = False
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.host = ""
        self._release = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            self.requests += 1
            if not self.answering:
                await self._release.wait()
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> HungServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.host = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self.server is not None
        self.server.close()


def test_hung_registry_socket_fails_with_the_configured_deadline_then_recovers() -> None:
    from snapshotter.registry import RetryPolicy

    policy = RetryPolicy(connect_timeout=0.2, response_timeout=0.3, operation_timeout=5.0)

    async def main() -> None:
        offset = [0.0]
        async with HungServer() as hung:
            ref = f"{hung.host}/app:v1"
            async with RegistryClient(
                {hung.host: RegistryConfig(plain_http=True)},
                Path("/nonexistent"),
                policy=policy,
                clock=lambda: time.monotonic() + offset[0],
            ) as client:
                with pytest.raises(Unavailable) as err:
                    await client.blob_exists(ref, BLOB_DIGEST)
                message = str(err.value)
                assert message.startswith(f"image {ref}: blob {BLOB_DIGEST} failed after 3 ")
                assert "(deadline 5.0s)" in message and f"{hung.host}: timed out" in message
                assert hung.requests == 3
                with pytest.raises(Unavailable, match=f"{hung.host} is failing"):
                    await client.blob_exists(ref, BLOB_DIGEST)
                assert hung.requests == 3
                hung.answering = True
                offset[0] += policy.cooldown
                assert await client.blob_exists(ref, BLOB_DIGEST) is True

    run(main())


# ---------------------------------------------------------------- the host's platform


@pytest.mark.parametrize(
    ("machine", "platform", "wanted"),
    [("aarch64", "linux/arm64", "arm"), ("x86_64", "linux/amd64", "amd"),
     ("armv7l", "linux/arm/v7", "arm7")],
)  # fmt: skip
def test_default_platform_is_the_hosts(
    monkeypatch: pytest.MonkeyPatch, machine: str, platform: str, wanted: str
) -> None:
    import platform as platform_mod

    from snapshotter.registry import host_platform

    monkeypatch.setattr(platform_mod, "machine", lambda: machine)
    assert str(host_platform()) == platform

    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        digests = {}
        for tag, plat in (("amd", ("linux", "amd64", "")), ("arm", ("linux", "arm64", "v8")),
                          ("arm7", ("linux", "arm", "v7"))):  # fmt: skip
            digests[tag] = reg.add_image(f"multi:{tag}", platform=plat)[1]
        reg.add_index("multi:latest", [(digests[t], p) for t, p in (
            ("amd", ("linux", "amd64", "")), ("arm", ("linux", "arm64", "v8")),
            ("arm7", ("linux", "arm", "v7")))])  # fmt: skip
        image = await client.resolve(f"{reg.host}/multi")
        assert image.manifest_digest == digests[wanted] and image.platform == platform

    with_registry(scenario)


# ---------------------------------------------------------------- the keychain hook


def test_keychain_is_asked_first_for_the_images_own_credentials(tmp_path: Path) -> None:
    from snapshotter.registry.reference import Reference

    asked: list[tuple[str, str]] = []

    class PullSecrets:
        def credentials(self, image: Reference, host: str) -> Credentials | None:
            asked.append((str(image), host))
            return Credentials("u", "pw") if image.repository == "app" else None

    async def scenario(reg: FakeRegistry, client: RegistryClient) -> None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {reg.host: {"username": "u", "password": "bad"}}}))
        hosts = {reg.host: RegistryConfig(plain_http=True)}
        async with RegistryClient(hosts, config, keychain=PullSecrets()) as authed:
            assert (await authed.resolve(f"{reg.host}/app:v1")).layers
        assert asked and all(host == reg.host for _, host in asked)
        assert asked[0][0] == f"{reg.host}/app:v1"

    with_registry(scenario, Behaviour(token_auth=True, token_creds=("u", "pw")))
