"""The CRI image-service proxy's forwarding, against a recording upstream gRPC server.

containerd cannot show what it received, so these tests put a small upstream server behind
the proxy that records each call's bytes, metadata and deadline, and can fail or block on
demand. (The same proxy against containerd 1.6's real CRI plugin: integration/
test_cri_credentials.py.) Both servers and the client run on unix sockets in the test's
temp dir, in one event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from snapshotter.api.cri.runtime.v1 import api_pb2 as cri
from snapshotter.config import Config, CriConfig, DaemonConfig, load
from snapshotter.cri.fsinfo import Usage, add_clip_storage, storage_usage
from snapshotter.cri.keychain import CriKeychain
from snapshotter.cri.proxy import ImageServiceProxy
from snapshotter.cri.service import MAX_MESSAGE, CriImageService
from snapshotter.errors import FailedPrecondition, InvalidArgument
from snapshotter.registry import Credentials
from snapshotter.registry.reference import parse_reference

IMAGE = "r.example/team/app:1"
NOTHING = Usage(bytes=0, inodes=0)
Context = grpc.aio.ServicerContext[bytes, bytes]


@dataclass
class Upstream:
    """Records calls; ``behaviour`` maps a method name to an async override."""

    calls: list[tuple[str, bytes, dict[str, str], float | None]] = field(default_factory=list)
    behaviour: dict[str, Callable[[bytes, Context], Awaitable[bytes]]] = field(
        default_factory=dict
    )
    responses: dict[str, bytes] = field(default_factory=dict)

    def handler(self, service: str) -> grpc.GenericRpcHandler[bytes, bytes]:
        def make(name: str) -> grpc.RpcMethodHandler[bytes, bytes]:
            async def handle(request: bytes, context: Context) -> bytes:
                md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
                self.calls.append((name, request, md, context.time_remaining()))
                if name in self.behaviour:
                    return await self.behaviour[name](request, context)
                return self.responses.get(name, b"")

            return grpc.unary_unary_rpc_method_handler(handle)

        names = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")
        return grpc.method_handlers_generic_handler(service, {n: make(n) for n in names})


@dataclass
class Rig:
    upstream: Upstream
    keychain: CriKeychain
    channel: grpc.aio.Channel

    def call(self, method: str, service: str = "runtime.v1.ImageService") -> Callable[..., object]:
        return self.channel.unary_unary(f"/{service}/{method}", None, None)


@asynccontextmanager
async def rig(tmp_path: Path, usage: Usage = NOTHING) -> AsyncIterator[Rig]:
    upstream = Upstream()
    up_server = grpc.aio.server(
        handlers=[upstream.handler("runtime.v1.ImageService"),
                  upstream.handler("runtime.v1alpha2.ImageService")]
    )  # fmt: skip
    up_server.add_insecure_port(f"unix:{tmp_path / 'containerd.sock'}")
    await up_server.start()
    to_upstream = grpc.aio.insecure_channel(f"unix:{tmp_path / 'containerd.sock'}")
    keychain = CriKeychain(600)
    proxy = ImageServiceProxy(to_upstream, keychain, tmp_path, lambda: usage)
    server = grpc.aio.server(handlers=proxy.handlers())
    server.add_insecure_port(f"unix:{tmp_path / 'cri.sock'}")
    await server.start()
    client = grpc.aio.insecure_channel(f"unix:{tmp_path / 'cri.sock'}")
    try:
        yield Rig(upstream, keychain, client)
    finally:
        await client.close(None)
        await server.stop(None)
        await to_upstream.close(None)
        await up_server.stop(None)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_bytes_metadata_and_deadline_pass_through(tmp_path: Path) -> None:
    # Field 99 is unknown to every proto here: a newer kubelet's field must reach containerd.
    request = cri.ListImagesRequest(filter=cri.ImageFilter(image=cri.ImageSpec(image=IMAGE)))
    raw = request.SerializeToString() + bytes([0x9A, 0x06, 0x03]) + b"new"
    answer = cri.ListImagesResponse(images=[cri.Image(id="sha256:1", size=7)]).SerializeToString()

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.upstream.responses["ListImages"] = answer + bytes([0x9A, 0x06, 0x01]) + b"x"
            got = await r.call("ListImages")(
                raw, metadata=(("x-request-id", "abc"),), timeout=30
            )  # type: ignore[operator]
            assert got == answer + bytes([0x9A, 0x06, 0x01]) + b"x"
            name, seen, md, remaining = r.upstream.calls[0]
            assert (name, seen, md["x-request-id"]) == ("ListImages", raw, "abc")
            # the caller's 30 s deadline reached containerd (gRPC's timeout encoding may round
            # it up a little; without a deadline `remaining` would be None)
            assert remaining is not None and 0 < remaining < 31

    run(main())


def test_errors_keep_code_details_and_trailing_metadata(tmp_path: Path) -> None:
    async def refuse(request: bytes, context: Context) -> bytes:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, "image r.example/x not found", (("why", "gone"),)
        )

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.upstream.behaviour["ImageStatus"] = refuse
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await r.call("ImageStatus")(b"", timeout=30)  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == "image r.example/x not found"
            assert ("why", "gone") in tuple(err.value.trailing_metadata() or ())

    run(main())


def test_unreachable_containerd_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        keychain = CriKeychain(600)
        to_nowhere = grpc.aio.insecure_channel(f"unix:{tmp_path / 'absent.sock'}")
        proxy = ImageServiceProxy(to_nowhere, keychain, tmp_path, lambda: NOTHING)
        server = grpc.aio.server(handlers=proxy.handlers())
        server.add_insecure_port(f"unix:{tmp_path / 'cri.sock'}")
        await server.start()
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'cri.sock'}") as client:
            call = client.unary_unary("/runtime.v1.ImageService/ListImages", None, None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(b"", timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await server.stop(None)
        await to_nowhere.close(None)

    run(main())


def test_cancelled_caller_cancels_the_forwarded_call(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            started, cancelled = asyncio.Event(), asyncio.Event()

            async def hang(request: bytes, context: Context) -> bytes:
                started.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
                return b""

            r.upstream.behaviour["PullImage"] = hang
            call = r.call("PullImage")(cri.PullImageRequest().SerializeToString())
            await started.wait()
            call.cancel()  # type: ignore[attr-defined]
            await cancelled.wait()  # the upstream handler saw the cancellation

    run(main())


def test_pull_credentials_are_kept_before_containerd_pulls(tmp_path: Path) -> None:
    """containerd's unpack asks clip for layers during the pull: the keychain must already
    hold the credentials when the forwarded PullImage arrives."""
    seen: list[Credentials | None] = []

    async def main() -> None:
        async with rig(tmp_path) as r:

            async def check(request: bytes, context: Context) -> bytes:
                seen.append(r.keychain.credentials(parse_reference(IMAGE), "r.example"))
                return cri.PullImageResponse(image_ref="sha256:2").SerializeToString()

            r.upstream.behaviour["PullImage"] = check
            pull = cri.PullImageRequest(
                image=cri.ImageSpec(image=IMAGE),
                auth=cri.AuthConfig(username="u", password="p"),
            )
            for service in ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService"):
                call = r.call("PullImage", service)
                got = await call(pull.SerializeToString())  # type: ignore[operator]
                assert cri.PullImageResponse.FromString(got).image_ref == "sha256:2"
            assert r.upstream.calls[0][1] == pull.SerializeToString()

    run(main())
    assert seen == [Credentials(username="u", password="p")] * 2


def test_image_fs_info_adds_clip_storage(tmp_path: Path) -> None:
    missing = str(tmp_path / "containerd-root" / "io.containerd.snapshotter.v1.clip")
    theirs = cri.ImageFsInfoResponse(
        image_filesystems=[
            cri.FilesystemUsage(
                timestamp=1,
                fs_id=cri.FilesystemIdentifier(mountpoint=missing),
                used_bytes=cri.UInt64Value(value=100),
                inodes_used=cri.UInt64Value(value=3),
            )
        ]
    )

    async def main() -> None:
        async with rig(tmp_path, Usage(bytes=4096, inodes=5)) as r:
            r.upstream.responses["ImageFsInfo"] = theirs.SerializeToString()
            got = cri.ImageFsInfoResponse.FromString(
                await r.call("ImageFsInfo")(b"")  # type: ignore[operator,arg-type]
            )
            (first,) = got.image_filesystems
            # clip's root replaces containerd's path, which does not exist on the node
            assert first.fs_id.mountpoint == str(tmp_path)
            assert (first.used_bytes.value, first.inodes_used.value) == (4196, 8)

    run(main())


def test_add_clip_storage_on_the_same_and_on_another_filesystem(tmp_path: Path) -> None:
    usage = Usage(bytes=10, inodes=2)
    same = cri.ImageFsInfoResponse()
    entry = same.image_filesystems.add()
    entry.fs_id.mountpoint = str(tmp_path)
    entry.used_bytes.value = 5
    add_clip_storage(same, tmp_path, usage)
    assert len(same.image_filesystems) == 1
    assert same.image_filesystems[0].used_bytes.value == 15

    other = cri.ImageFsInfoResponse()
    entry = other.image_filesystems.add()
    entry.fs_id.mountpoint = "/proc"  # a filesystem that never holds clip's root
    entry.used_bytes.value = 5
    add_clip_storage(other, tmp_path, usage)
    assert [e.fs_id.mountpoint for e in other.image_filesystems] == ["/proc", str(tmp_path)]
    assert other.image_filesystems[0].used_bytes.value == 5
    clip_entry = other.image_filesystems[1]
    assert (clip_entry.used_bytes.value, clip_entry.inodes_used.value) == (10, 2)

    empty = cri.ImageFsInfoResponse()
    add_clip_storage(empty, tmp_path, usage)
    assert empty.image_filesystems[0].fs_id.mountpoint == str(tmp_path)


def test_storage_usage_counts_allocated_bytes_and_inodes_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    sparse = cache / "layer.data"
    with sparse.open("wb") as f:
        f.truncate(64 << 20)  # a sparse cache file: only what it holds counts
        f.seek(1 << 20)
        f.write(b"x" * 8192)
    os.link(sparse, cache / "hardlink")
    (tmp_path / "indexes").mkdir()
    (tmp_path / "indexes" / "sha256-aa").write_bytes(b"i" * 4096)
    usage = storage_usage([cache, tmp_path / "indexes", tmp_path / "erofs-absent"])
    paths = (sparse, tmp_path / "indexes" / "sha256-aa", cache, tmp_path / "indexes")
    assert usage.bytes == sum(p.stat().st_blocks * 512 for p in paths)
    assert usage.bytes < 1 << 20
    assert usage.inodes == 4  # two directories, the data file (linked twice), the index


def test_service_listens_and_stops_on_its_socket(tmp_path: Path) -> None:
    cfg = Config(
        daemon=DaemonConfig(root=str(tmp_path / "root"), socket_mode=0o600),
        cri=CriConfig(
            image_service_address=str(tmp_path / "run" / "cri.sock"),
            containerd_cri_address=str(tmp_path / "containerd.sock"),
        ),
    )
    (tmp_path / "root").mkdir()

    async def main() -> None:
        service = CriImageService(cfg, CriKeychain(600))
        await service.start(None)  # type: ignore[arg-type]
        socket = tmp_path / "run" / "cri.sock"
        assert socket.is_socket() and (socket.stat().st_mode & 0o777) == 0o600
        second = CriImageService(cfg, CriKeychain(600))
        with pytest.raises(FailedPrecondition, match="in use"):
            await second.start(None)  # type: ignore[arg-type]
        await service.stop()
        assert not socket.exists()

    run(main())


def test_cri_config_table(tmp_path: Path) -> None:
    path = tmp_path / "clip.toml"
    path.write_text('[cri]\nimage_service_address = "/run/clip/cri-image.sock"\n')
    cfg = load(path)
    assert cfg.cri == CriConfig(image_service_address="/run/clip/cri-image.sock")
    path.write_text('[cri]\nimage_service_address = "run/cri.sock"\n')
    with pytest.raises(InvalidArgument, match=r"cri.image_service_address: .*absolute"):
        load(path)
    path.write_text("[cri]\ncredential_ttl_seconds = 0\n")
    with pytest.raises(InvalidArgument, match=r"cri\.credential_ttl_seconds"):
        load(path)


def test_service_carries_messages_larger_than_grpc_default(tmp_path: Path) -> None:
    """A ListImages answer of a node with many images passes gRPC's default 4 MiB limit."""
    tags = ["r.example/" + "x" * 400]
    images = [cri.Image(id=f"sha256:{i:064x}", repo_tags=tags) for i in range(12000)]
    big = cri.ListImagesResponse(images=images).SerializeToString()
    assert 4 << 20 < len(big) < MAX_MESSAGE
    options = [("grpc.max_send_message_length", MAX_MESSAGE)]
    cfg = Config(
        daemon=DaemonConfig(root=str(tmp_path)),
        cri=CriConfig(
            image_service_address=str(tmp_path / "cri.sock"),
            containerd_cri_address=str(tmp_path / "containerd.sock"),
        ),
    )

    async def main() -> None:
        upstream = Upstream(responses={"ListImages": big})
        up_server = grpc.aio.server(
            handlers=[upstream.handler("runtime.v1.ImageService")], options=options
        )
        up_server.add_insecure_port(f"unix:{tmp_path / 'containerd.sock'}")
        await up_server.start()
        service = CriImageService(cfg, CriKeychain(600))
        await service.start(None)  # type: ignore[arg-type]
        try:
            client_options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
            async with grpc.aio.insecure_channel(
                f"unix:{tmp_path / 'cri.sock'}", options=client_options
            ) as client:
                call = client.unary_unary("/runtime.v1.ImageService/ListImages", None, None)
                assert await call(b"", timeout=30) == big
        finally:
            await service.stop()
            await up_server.stop(None)

    run(main())
