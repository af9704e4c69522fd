"""CriKeychain: what kubelet's pull credentials unlock, for how long, and for which hosts.

Expiry runs on an injected clock. The last test drives the real registry client against an
aiohttp registry on loopback that accepts only a CRI ``registry_token`` (docker-registry
cannot be configured for a fixed bearer token).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading

import pytest
from aiohttp import web

from snapshotter.config import RegistryConfig
from snapshotter.cri.keychain import CriKeychain, PullAuth, credentials_of
from snapshotter.errors import InvalidArgument
from snapshotter.registry import Credentials, RegistryClient
from snapshotter.registry.reference import parse_reference

TTL = 600.0
DIGEST = "sha256:" + "ab" * 32


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keychain() -> tuple[CriKeychain, FakeClock]:
    clock = FakeClock()
    return CriKeychain(TTL, clock=clock), clock


def basic(user: str = "u", password: str = "p", server: str = "") -> PullAuth:
    return PullAuth(username=user, password=password, server_address=server)


def test_matches_by_repository_for_tag_and_digest_refs() -> None:
    kc, _ = keychain()
    assert kc.remember("registry.example:5000/team/app:1.0", basic())
    want = Credentials(username="u", password="p")
    for ref in (
        "registry.example:5000/team/app:1.0",
        "registry.example:5000/team/app:other-tag",
        f"registry.example:5000/team/app@{DIGEST}",
        f"registry.example:5000/team/app:1.0@{DIGEST}",
    ):
        assert kc.credentials(parse_reference(ref), "registry.example:5000") == want, ref
    for ref in ("registry.example:5000/team/other:1.0", "elsewhere.example/team/app:1.0"):
        assert kc.credentials(parse_reference(ref), "registry.example:5000") is None, ref


def test_docker_hub_short_names_are_normalized() -> None:
    kc, _ = keychain()
    assert kc.remember("nginx", basic())
    assert kc.credentials(parse_reference("docker.io/library/nginx:latest"), "docker.io")


def test_expiry_and_renewal_on_the_injected_clock() -> None:
    kc, clock = keychain()
    ref = parse_reference("r.example/app:1")
    kc.remember("r.example/app:1", basic(password="first"))
    clock.now += TTL - 1
    assert kc.credentials(ref, "r.example") == Credentials(username="u", password="first")
    kc.remember("r.example/app:2", basic(password="second"))  # a new pull renews the entry
    clock.now += TTL - 1
    assert kc.credentials(ref, "r.example") == Credentials(username="u", password="second")
    clock.now += 1
    assert kc.credentials(ref, "r.example") is None
    assert len(kc) == 0


def test_expired_entries_are_dropped_on_the_next_pull() -> None:
    kc, clock = keychain()
    kc.remember("r.example/a:1", basic())
    clock.now += TTL
    kc.remember("r.example/b:1", basic())
    assert len(kc) == 1


def test_server_address_limits_the_hosts() -> None:
    kc, _ = keychain()
    kc.remember("r.example/app:1", basic(server="https://r.example"))
    ref = parse_reference("r.example/app:1")
    assert kc.credentials(ref, "r.example") is not None
    assert kc.credentials(ref, "mirror.example") is None
    kc.remember("docker.io/library/busybox", basic(server="https://index.docker.io/v1/"))
    assert kc.credentials(parse_reference("busybox"), "docker.io") is not None


def test_without_server_address_the_image_mirrors_get_them_too() -> None:
    kc, _ = keychain()
    kc.remember("r.example/app:1", basic())
    assert kc.credentials(parse_reference("r.example/app:1"), "mirror.example:5000") is not None


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (PullAuth(username="u", password="p"), Credentials(username="u", password="p")),
        (PullAuth(username="u", password="p", auth="eDp5"), Credentials("u", "p")),
        (PullAuth(auth=base64.b64encode(b"user:pa:ss\0").decode()), Credentials("user", "pa:ss")),
        (PullAuth(identity_token="refresh"), Credentials(identity_token="refresh")),
        (PullAuth(registry_token="bearer"), Credentials(registry_token="bearer")),
        (PullAuth(identity_token="i", registry_token="r"), Credentials(identity_token="i")),
        (PullAuth(auth="not base64!"), None),
        (PullAuth(auth=base64.b64encode(b"no-colon").decode()), None),
        (PullAuth(server_address="r.example"), None),
    ],
)
def test_auth_config_to_credentials(auth: PullAuth, expected: Credentials | None) -> None:
    """containerd's precedence: username, identity token, auth, then registry token."""
    assert credentials_of(auth) == expected


def test_unusable_pulls_keep_nothing() -> None:
    kc, _ = keychain()
    assert not kc.remember("r.example/app:1", PullAuth())
    assert not kc.remember("Not A Reference", basic())
    assert len(kc) == 0


def test_no_secret_in_any_repr() -> None:
    kc, _ = keychain()
    auth = PullAuth(
        username="u", password="pw-1", auth="YXV0aC0y", identity_token="it-3", registry_token="rt-4"
    )
    kc.remember("r.example/app:1", auth)
    creds = kc.credentials(parse_reference("r.example/app:1"), "r.example")
    texts = [repr(auth), repr(kc), repr(creds), repr(kc._entries)]
    for secret in ("pw-1", "YXV0aC0y", "it-3", "rt-4"):
        assert all(secret not in text for text in texts), secret


def test_ttl_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="TTL"):
        CriKeychain(0)


def test_concurrent_pulls_and_lookups() -> None:
    """Pulls (gRPC loop) and lookups (registry client loop) from several threads at once."""
    kc, _ = keychain()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(500):
                kc.remember(f"r.example/app{i % 7}:1", basic(password=f"{n}-{i}"))
                found = kc.credentials(parse_reference(f"r.example/app{i % 7}:1"), "r.example")
                assert found is not None and found.username == "u"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(kc) == 7


def test_registry_token_is_sent_as_a_bearer_token() -> None:
    """The registry client asks the keychain; a registry token goes out as it is, and no
    token server is asked."""
    blob = b"layer bytes" * 100
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    token_requests: list[str] = []

    async def main() -> None:
        async def get_blob(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != "Bearer kube-registry-token":
                realm = f"http://{request.host}/token"
                challenge = f'Bearer realm="{realm}",service="test"'
                return web.Response(status=401, headers={"WWW-Authenticate": challenge})
            return web.Response(body=blob)

        async def token(request: web.Request) -> web.StreamResponse:
            token_requests.append(request.path_qs)
            return web.json_response({"token": "not-the-one"})

        app = web.Application()
        app.router.add_get("/v2/team/app/blobs/{digest}", get_blob)
        app.router.add_get("/token", token)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        host = f"127.0.0.1:{port}"
        kc = CriKeychain(TTL)
        kc.remember(f"{host}/team/app:1", PullAuth(registry_token="kube-registry-token"))
        try:
            hosts = {host: RegistryConfig(plain_http=True)}
            async with RegistryClient(hosts, keychain=kc) as client:
                assert await client.fetch_blob(f"{host}/team/app:1", digest) == blob
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert token_requests == []
