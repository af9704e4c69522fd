"""clip's own Status service (``clip.v1.Status``), served beside Snapshots on the same socket.

``clip status`` and liveness probes ask one question: is the daemon up, and what is it
serving? The answer is assembled from parts that each know their own state — the metadata
store (snapshot counts), the remote layer provider (attached layers, FUSE mount, disk cache
directory, shared ContentCache tier) and the config (limits) — without changing any of them.

A provider reports through :class:`ProviderStatus`. Its ``content_cache`` field is a generic
:class:`TierHealth` (``backend="none"`` when no shared tier is configured), so another backend
fills the same fields instead of changing the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import grpc

from snapshotter import __version__
from snapshotter.api.clip.v1 import status_pb2 as pb
from snapshotter.api.clip.v1 import status_pb2_grpc as pb_grpc
from snapshotter.contentcache import ContentCacheHealth
from snapshotter.errors import ClipError
from snapshotter.snapshots.store import Kind

if TYPE_CHECKING:
    from snapshotter.service.daemon import Daemon

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class LayerStatus:
    """One remote layer attached to the FUSE mount."""

    digest: str
    layer_id: str
    image_ref: str
    cached_bytes: int
    uncompressed_size: int
    complete: bool


@dataclass(frozen=True)
class TierHealth:
    """A shared cache tier; the defaults describe "no tier configured"."""

    backend: str = "none"
    configured: bool = False
    healthy: bool = False
    detail: str = ""


def tier_health(health: ContentCacheHealth) -> TierHealth:
    """A ContentCache's own health report, as one line an operator can act on."""
    if health.backend == "none":
        return TierHealth()
    detail = f"{health.target}, breaker {health.state}"
    if not health.healthy:
        detail += f" after {health.consecutive_failures} failures"
        if health.last_error:
            detail += f" (last: {health.last_error})"
        if health.retry_in_seconds:
            detail += f", retry in {health.retry_in_seconds:g}s"
    if health.queued_puts:
        detail += f", {health.queued_puts} puts queued"
    return TierHealth(health.backend, configured=True, healthy=health.healthy, detail=detail)


@dataclass(frozen=True)
class ProviderStatus:
    """What a remote layer provider knows about itself, read without side effects."""

    fuse_mounted: bool
    mountpoint: str
    cache_dir: str
    layers: list[LayerStatus] = field(default_factory=list)
    content_cache: TierHealth = field(default_factory=TierHealth)
    fs_mode: str = "fuse"
    direct_io: bool = False  # EROFS mounts over complete cache files read with direct I/O


@runtime_checkable
class StatusSource(Protocol):
    """A provider that can report its status (RemoteLayerProvider does)."""

    def status(self) -> ProviderStatus: ...


def disk_usage(directory: Path) -> int:
    """Bytes allocated under ``directory``; cache files are sparse, so sizes would overstate."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue  # removed while we walked: it no longer uses space
    return total


class StatusService(pb_grpc.StatusServicer):
    """``clip.v1.Status/Get`` over the daemon's live state."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.started = time.monotonic()

    async def Get(self, request: pb.GetStatusRequest, context: Context) -> pb.GetStatusResponse:
        try:
            return await self.report()
        except ClipError as exc:
            await context.abort(exc.grpc_code, str(exc))
            raise  # unreachable: abort raises
        except (OSError, sqlite3.Error) as exc:
            log.exception("status: cannot build the report")
            await context.abort(grpc.StatusCode.INTERNAL, f"status: {exc}")
            raise

    async def report(self) -> pb.GetStatusResponse:
        daemon = self.daemon
        provider = self._provider_status()
        cache_dir = Path(provider.cache_dir) if provider else daemon.config.cache_dir()
        used = await asyncio.to_thread(disk_usage, cache_dir)
        return pb.GetStatusResponse(
            version=__version__,
            root=str(daemon.root),
            address=str(daemon.address),
            pid=os.getpid(),
            uptime_seconds=time.monotonic() - self.started,
            snapshots=self._snapshot_counts(),
            layers=[_layer_pb(layer) for layer in (provider.layers if provider else [])],
            disk_cache=pb.DiskCache(
                dir=str(cache_dir),
                used_bytes=used,
                limit_bytes=daemon.config.disk_cache.limit_bytes,
            ),
            content_cache=_tier_pb(provider.content_cache if provider else TierHealth()),
            fuse=pb.FuseMount(
                mounted=bool(provider and provider.fuse_mounted),
                mountpoint=provider.mountpoint if provider else "",
                fs_mode=provider.fs_mode if provider else "",
                direct_io=bool(provider and provider.direct_io),
            ),
        )

    def _provider_status(self) -> ProviderStatus | None:
        provider = self.daemon.provider
        if isinstance(provider, StatusSource):
            return provider.status()
        return None

    def _snapshot_counts(self) -> pb.SnapshotCounts:
        snapshotter = self.daemon.snapshotter
        counts = dict.fromkeys(Kind, 0)
        if snapshotter is not None:
            query = "SELECT kind, COUNT(*) FROM snapshots GROUP BY kind"
            rows = snapshotter.store.db.execute(query)
            for kind, count in rows:
                counts[Kind(kind)] = int(count)
        return pb.SnapshotCounts(
            view=counts[Kind.VIEW], active=counts[Kind.ACTIVE], committed=counts[Kind.COMMITTED]
        )


def _layer_pb(layer: LayerStatus) -> pb.RemoteLayer:
    return pb.RemoteLayer(
        digest=layer.digest,
        layer_id=layer.layer_id,
        image_ref=layer.image_ref,
        cached_bytes=layer.cached_bytes,
        uncompressed_size=layer.uncompressed_size,
        complete=layer.complete,
    )


def _tier_pb(tier: TierHealth) -> pb.TierHealth:
    return pb.TierHealth(
        backend=tier.backend, configured=tier.configured, healthy=tier.healthy, detail=tier.detail
    )
