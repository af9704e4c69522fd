"""clip.v1.Status and `clip status`: the report, against a real daemon, FUSE mount and socket."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import grpc
import pytest
from test_service_daemon import ClipDaemon

from snapshotter import __version__
from snapshotter.api.clip.v1 import status_pb2 as spb
from snapshotter.api.clip.v1 import status_pb2_grpc as spb_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.cli import main
from snapshotter.cli.status import human_bytes, human_duration, render
from snapshotter.config import Config, DaemonConfig, DiskCacheConfig
from snapshotter.contentcache import ContentCacheHealth, NoContentCache
from snapshotter.index import build_index
from snapshotter.remote.provider import RemoteLayerProvider, layer_id
from snapshotter.service.daemon import Daemon
from snapshotter.service.status import TierHealth, tier_health
from snapshotter.snapshots.remote import RemoteLayer

NS = (("containerd-namespace", "default"),)
IMAGE = "registry.invalid/app:1"


def test_status_proto_is_clip_v1_with_one_unary_get() -> None:
    file = spb.DESCRIPTOR
    assert file.package == "clip.v1"
    method = file.services_by_name["Status"].methods_by_name["Get"]
    assert not method.client_streaming and not method.server_streaming
    assert method.output_type.full_name == "clip.v1.GetStatusResponse"


def _layer_blob(path: Path) -> tuple[str, bytes]:
    """A gzip layer with a few MiB of files; returns its digest and uncompressed tar."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate((10, 3 << 20, 1 << 20)):
            info = tarfile.TarInfo(f"f{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
    blob = gzip.compress(raw.getvalue(), compresslevel=1)
    path.write_bytes(blob)
    return "sha256:" + hashlib.sha256(blob).hexdigest(), raw.getvalue()


def _seed_index(root: Path, blob: Path, digest: str) -> None:
    indexes = root / "indexes"
    indexes.mkdir(parents=True, exist_ok=True)
    with open(blob, "rb") as f:
        build_index(f, indexes / digest.removeprefix("sha256:"))


def test_get_reports_snapshots_layers_caches_and_fuse(tmp_path: Path) -> None:
    """In-process daemon with the real provider: a layer attached from a seeded index shows
    0 bytes cached, then complete once its bytes are on disk; snapshot kinds are counted."""
    root, sock = tmp_path / "root", tmp_path / "clip.sock"
    digest, tar = _layer_blob(tmp_path / "layer.tar.gz")
    _seed_index(root, tmp_path / "layer.tar.gz", digest)
    cfg = Config(
        daemon=DaemonConfig(root=str(root), address=str(sock)),
        disk_cache=DiskCacheConfig(limit_bytes=123 << 20),
    )

    async def scenario() -> list[spb.GetStatusResponse]:
        provider = RemoteLayerProvider(cfg)
        daemon = Daemon(cfg, provider)
        daemon.add_service(provider)
        await daemon.start()
        reports = []
        try:
            async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
                status = spb_grpc.StatusStub(channel)
                snaps = pb_grpc.SnapshotsStub(channel)
                reports.append(await status.Get(spb.GetStatusRequest()))
                layer = RemoteLayer("k", "", "sha256:" + "c" * 64, IMAGE, digest)
                await provider.restore(layer, "")
                reports.append(await status.Get(spb.GetStatusRequest()))
                writer = provider.cache.layer(digest).writer()
                writer.write(0, tar)
                writer.finish(len(tar))
                await snaps.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
                await snaps.Commit(pb.CommitSnapshotRequest(name="c", key="a"), metadata=NS)
                await snaps.Prepare(pb.PrepareSnapshotRequest(key="b", parent="c"), metadata=NS)
                await snaps.View(pb.ViewSnapshotRequest(key="v", parent="c"), metadata=NS)
                reports.append(await status.Get(spb.GetStatusRequest()))
        finally:
            await daemon.stop()
        return reports

    fresh, attached, filled = asyncio.run(scenario())
    assert (fresh.version, fresh.root, fresh.address) == (__version__, str(root), str(sock))
    assert fresh.pid == os.getpid() and fresh.uptime_seconds >= 0
    assert fresh.fuse.mounted and fresh.fuse.mountpoint == str(root / "mnt")
    assert (fresh.content_cache.backend, fresh.content_cache.configured) == ("none", False)
    assert fresh.disk_cache.limit_bytes == 123 << 20
    assert fresh.disk_cache.dir == str(root / "cache")
    assert not fresh.layers
    assert (fresh.snapshots.view, fresh.snapshots.active, fresh.snapshots.committed) == (0, 0, 0)

    [layer] = attached.layers
    assert (layer.digest, layer.layer_id, layer.image_ref) == (digest, layer_id(digest), IMAGE)
    assert (layer.cached_bytes, layer.uncompressed_size, layer.complete) == (0, len(tar), False)

    [layer] = filled.layers
    assert (layer.cached_bytes, layer.complete) == (len(tar), True)
    assert filled.disk_cache.used_bytes >= len(tar)
    assert (filled.snapshots.view, filled.snapshots.active, filled.snapshots.committed) == (1, 1, 1)


def test_get_without_a_provider_reports_no_mount(tmp_path: Path) -> None:
    cfg = Config(daemon=DaemonConfig(root=str(tmp_path / "r"), address=str(tmp_path / "s")))

    async def scenario() -> spb.GetStatusResponse:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 's'}") as channel:
                return await spb_grpc.StatusStub(channel).Get(spb.GetStatusRequest())
        finally:
            await daemon.stop()

    report = asyncio.run(scenario())
    assert not report.fuse.mounted and not report.layers
    assert report.content_cache.backend == "none"
    assert report.disk_cache.dir == str(tmp_path / "r" / "cache")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> object:
    daemon = ClipDaemon(tmp_path_factory.mktemp("status"))
    with daemon:
        yield daemon


def test_cli_prints_a_report(served: ClipDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--address", str(served.socket)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"clip {__version__} serving {served.root} on {served.socket}")
    assert f"fuse:          mounted at {served.root / 'mnt'}" in out
    # clip serve's default [fs] mode is auto: on this kernel the kernel serves the layers,
    # complete ones read from the disk cache (on ext4 here) with direct I/O
    assert ("layers served: by the kernel (EROFS images over the layer streams); complete "
            "layers read from the disk cache with direct I/O\n") in out
    assert "content cache: none" in out
    assert "remote layers: 0" in out


def test_cli_json_has_every_field(served: ClipDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--address", str(served.socket), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == __version__ and data["root"] == str(served.root)
    assert data["snapshots"] == {"view": 0, "active": 0, "committed": 0}
    assert data["disk_cache"]["limit_bytes"] == 10 * 1024**3  # a number, not a string
    assert data["content_cache"] == {
        "backend": "none",
        "configured": False,
        "healthy": False,
        "detail": "",
    }
    assert data["fuse"]["mounted"] is True and data["layers"] == []
    assert data["fuse"]["fs_mode"] == "erofs" and data["fuse"]["direct_io"] is True


@pytest.mark.parametrize("case", ["missing", "not-a-socket", "nobody-listens"])
def test_cli_fails_with_one_line_when_no_daemon_answers(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = tmp_path / "clip.sock"
    if case == "not-a-socket":
        address.write_text("")
    if case == "nobody-listens":
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(address))
        stale.close()
    assert main(["status", "--address", str(address), "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip: ") and str(address) in lines[0]


def test_render_layers_and_an_unhealthy_tier() -> None:
    report = spb.GetStatusResponse(
        version="9.9.9",
        root="/r",
        address="/s",
        pid=7,
        uptime_seconds=3725,
        layers=[
            spb.RemoteLayer(
                digest="sha256:" + "a" * 64,
                layer_id="a" * 16,
                image_ref="reg/app:1",
                cached_bytes=1 << 20,
                uncompressed_size=3 << 30,
            )
        ],
        disk_cache=spb.DiskCache(dir="/r/cache", used_bytes=1 << 20, limit_bytes=10 << 30),
        content_cache=spb.TierHealth(
            backend="redis", configured=True, healthy=False, detail="breaker open"
        ),
    )
    text = render(report)
    assert "(pid 7, up 1h02m)" in text
    assert "fuse:          not mounted" in text
    assert "disk cache:    1.0 MiB used of 10.0 GiB (/r/cache)" in text
    assert "content cache: redis (UNHEALTHY): breaker open" in text
    assert f"  {'a' * 16}     1.0 MiB     3.0 GiB  no        reg/app:1" in text


def test_human_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 TiB",
    ]
    assert [human_duration(s) for s in (5, 61, 90061)] == ["0m05s", "1m01s", "1d01h01m"]


def test_tier_health_from_a_content_cache_report() -> None:
    assert tier_health(NoContentCache().health()) == TierHealth()
    ok = ContentCacheHealth("redis", "redis://10.0.0.1:6379/0", "closed", True, queued_puts=2)
    assert tier_health(ok) == TierHealth(
        "redis", True, True, "redis://10.0.0.1:6379/0, breaker closed, 2 puts queued"
    )
    down = ContentCacheHealth(
        "redis-cluster",
        "redis://10.0.0.1:7000/0",
        "open",
        False,
        consecutive_failures=3,
        last_error="connection refused",
        retry_in_seconds=4.5,
    )
    assert tier_health(down) == TierHealth(
        "redis-cluster",
        True,
        False,
        "redis://10.0.0.1:7000/0, breaker open after 3 failures (last: connection refused), "
        "retry in 4.5s",
    )
