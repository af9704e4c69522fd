"""containerd's Snapshots gRPC service on grpc.aio, backed by a Snapshotter.

Each RPC reads the namespace from the ``containerd-namespace`` metadata, calls the
snapshotter, maps ClipError subclasses to the gRPC codes containerd's errdefs expects, and
logs one debug line with key, parent, duration and result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.errors import ClipError
from snapshotter.snapshots import validate
from snapshotter.snapshots.layout import Mount
from snapshotter.snapshots.snapshotter import Snapshotter
from snapshotter.snapshots.store import Record

log = logging.getLogger("clip.rpc")
NAMESPACE_HEADER = "containerd-namespace"
LIST_BATCH = 100

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def namespace_of(context: Context) -> str | None:
    """The caller's namespace, or None when absent (containerd's GC sends none)."""
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return validate.namespace(str(value))
    return None


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def info_of(record: Record) -> pb.Info:
    return pb.Info(
        name=record.key,
        parent=record.parent,
        kind=int(record.kind),  # type: ignore[arg-type]
        created_at=_timestamp(record.created_ns),
        updated_at=_timestamp(record.updated_ns),
        labels=record.labels,
    )


def mounts_of(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


#: Status details travel as gRPC metadata (8 KiB by default in grpc-go, containerd's client):
#: longer details would turn the real error into RESOURCE_EXHAUSTED on the client.
MAX_DETAILS = 2048


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    return message[: MAX_DETAILS - 40] + f"... ({len(message)} characters)"


async def _call(
    rpc: str, context: Context, fields: dict[str, str], body: Callable[[], Awaitable[T]]
) -> T:
    """Run one RPC body: error mapping and the per-RPC log line."""
    start = time.perf_counter()
    result = "OK"
    try:
        return await body()
    except ClipError as exc:
        result = exc.grpc_code.name
        await context.abort(exc.grpc_code, _details(str(exc)))
        raise  # unreachable: abort raises
    except Exception as exc:
        result = "INTERNAL"
        log.exception("%s failed", rpc, extra={"fields": fields})
        await context.abort(grpc.StatusCode.INTERNAL, _details(f"{rpc}: internal error: {exc}"))
        raise
    finally:
        if log.isEnabledFor(logging.DEBUG):
            ms = round((time.perf_counter() - start) * 1000, 3)
            extra = {"rpc": rpc, **fields, "duration_ms": ms, "result": result}
            log.debug("%s %s", rpc, result, extra={"fields": extra})


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """The Snapshots API over one Snapshotter."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    async def Prepare(
        self, request: pb.PrepareSnapshotRequest, context: Context
    ) -> pb.PrepareSnapshotResponse:
        async def body() -> pb.PrepareSnapshotResponse:
            ns = namespace_of(context)
            mounts = await self.sn.prepare(ns, request.key, request.parent, request.labels)
            return pb.PrepareSnapshotResponse(mounts=mounts_of(mounts))

        fields = {"key": request.key, "parent": request.parent}
        return await _call("Prepare", context, fields, body)

    async def View(
        self, request: pb.ViewSnapshotRequest, context: Context
    ) -> pb.ViewSnapshotResponse:
        async def body() -> pb.ViewSnapshotResponse:
            ns = namespace_of(context)
            mounts = await self.sn.view(ns, request.key, request.parent, request.labels)
            return pb.ViewSnapshotResponse(mounts=mounts_of(mounts))

        fields = {"key": request.key, "parent": request.parent}
        return await _call("View", context, fields, body)

    async def Mounts(self, request: pb.MountsRequest, context: Context) -> pb.MountsResponse:
        async def body() -> pb.MountsResponse:
            mounts = self.sn.mounts(namespace_of(context), request.key)
            return pb.MountsResponse(mounts=mounts_of(mounts))

        return await _call("Mounts", context, {"key": request.key}, body)

    async def Commit(self, request: pb.CommitSnapshotRequest, context: Context) -> empty_pb2.Empty:
        async def body() -> empty_pb2.Empty:
            await self.sn.commit(namespace_of(context), request.name, request.key, request.labels)
            return empty_pb2.Empty()

        return await _call("Commit", context, {"key": request.key, "name": request.name}, body)

    async def Remove(self, request: pb.RemoveSnapshotRequest, context: Context) -> empty_pb2.Empty:
        async def body() -> empty_pb2.Empty:
            await self.sn.remove(namespace_of(context), request.key)
            return empty_pb2.Empty()

        return await _call("Remove", context, {"key": request.key}, body)

    async def Stat(
        self, request: pb.StatSnapshotRequest, context: Context
    ) -> pb.StatSnapshotResponse:
        async def body() -> pb.StatSnapshotResponse:
            record = self.sn.stat(namespace_of(context), request.key)
            return pb.StatSnapshotResponse(info=info_of(record))

        return await _call("Stat", context, {"key": request.key}, body)

    async def Update(
        self, request: pb.UpdateSnapshotRequest, context: Context
    ) -> pb.UpdateSnapshotResponse:
        async def body() -> pb.UpdateSnapshotResponse:
            paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
            record = self.sn.update(
                namespace_of(context), request.info.name, request.info.labels, paths
            )
            return pb.UpdateSnapshotResponse(info=info_of(record))

        return await _call("Update", context, {"key": request.info.name}, body)

    async def List(
        self, request: pb.ListSnapshotsRequest, context: Context
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        async def body() -> list[Record]:
            return self.sn.walk(namespace_of(context), list(request.filters))

        records = await _call("List", context, {"filters": ",".join(request.filters)}, body)
        for start in range(0, len(records), LIST_BATCH):
            batch = records[start : start + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[info_of(r) for r in batch])

    async def Usage(self, request: pb.UsageRequest, context: Context) -> pb.UsageResponse:
        async def body() -> pb.UsageResponse:
            size, inodes = await self.sn.usage(namespace_of(context), request.key)
            return pb.UsageResponse(size=size, inodes=inodes)

        return await _call("Usage", context, {"key": request.key}, body)

    async def Cleanup(self, request: pb.CleanupRequest, context: Context) -> empty_pb2.Empty:
        async def body() -> empty_pb2.Empty:
            await self.sn.cleanup()
            return empty_pb2.Empty()

        return await _call("Cleanup", context, {}, body)
