"""A small client for containerd's own gRPC API (content, images, leases, snapshots).

`clip pull` talks to containerd, not to clip: containerd's metadata layer must record the
image, its content and its snapshots, and it forwards each snapshot call to clip through the
proxy plugin. Only the calls a lazy pull needs are wrapped here; gRPC errors become the typed
errors of :mod:`snapshotter.errors` with a message that names the object.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from snapshotter.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from snapshotter.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from snapshotter.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.api.containerd.types import descriptor_pb2, mount_pb2
from snapshotter.errors import (
    AlreadyExists,
    ClipError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
GC_EXPIRE_LABEL = "containerd.io/gc.expire"

_CODE_TO_ERROR: dict[grpc.StatusCode, type[ClipError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> ClipError:
    """The typed error for a failed containerd call; ``what`` names the object."""
    cls = _CODE_TO_ERROR.get(exc.code(), ClipError)
    return cls(f"{what}: {exc.details() or exc.code().name.lower()}")


class ContainerdClient:
    """One channel to containerd's socket with the namespace (and optional lease) attached."""

    def __init__(self, address: str, namespace: str, *, timeout: float = 60.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease_id = ""
        self._channel = grpc.aio.insecure_channel(f"unix://{address}")
        self.content = content_pb2_grpc.ContentStub(self._channel)
        self.images = images_pb2_grpc.ImagesStub(self._channel)
        self.leases = leases_pb2_grpc.LeasesStub(self._channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)

    async def __aenter__(self) -> ContainerdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        md: tuple[tuple[str, str], ...] = ((NAMESPACE_HEADER, self.namespace),)
        if self.lease_id:
            md += ((LEASE_HEADER, self.lease_id),)
        return md

    async def _call(self, method: Any, request: Any, what: str) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"containerd at {self.address} is unreachable ({what}): {exc.details()}"
                ) from None
            raise error_from_rpc(exc, what) from None

    # leases -------------------------------------------------------------------------------

    async def create_lease(self, expire_after: datetime.timedelta) -> str:
        """Create a lease that protects what this client writes until :meth:`delete_lease`."""
        expire = datetime.datetime.now(datetime.UTC) + expire_after
        labels = {GC_EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        request = leases_pb2.CreateRequest(id=f"clip-{secrets.token_hex(8)}", labels=labels)
        response = await self._call(self.leases.Create, request, "create lease")
        self.lease_id = str(response.lease.id)
        return self.lease_id

    async def delete_lease(self) -> None:
        if self.lease_id:
            lease_id, self.lease_id = self.lease_id, ""
            request = leases_pb2.DeleteRequest(id=lease_id)
            await self._call(self.leases.Delete, request, f"lease {lease_id}")

    # content ------------------------------------------------------------------------------

    async def content_labels(self, digest: str) -> dict[str, str] | None:
        """The labels of a blob in the content store, or None if it is not there."""
        try:
            response = await self._call(
                self.content.Info, content_pb2.InfoRequest(digest=digest), f"content {digest}"
            )
        except NotFound:
            return None
        return dict(response.info.labels)

    async def write_content(self, digest: str, data: bytes, labels: Mapping[str, str]) -> None:
        """Put a small blob in the content store with labels (merged if it is already there)."""
        if await self.content_labels(digest) is None:
            request = content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                ref=f"clip-pull-{digest}",
                total=len(data),
                expected=digest,
                offset=0,
                data=data,
                labels=dict(labels),
            )
            try:
                async for _ in self.content.Write(
                    iter([request]), metadata=self.metadata, timeout=self.timeout
                ):
                    pass
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise error_from_rpc(exc, f"write content {digest}") from None
        await self.update_content_labels(digest, labels)

    async def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        if not labels:
            return
        info = content_pb2.Info(digest=digest, labels=dict(labels))
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{key}" for key in sorted(labels)])
        request = content_pb2.UpdateRequest(info=info, update_mask=mask)
        await self._call(self.content.Update, request, f"content {digest}")

    # images -------------------------------------------------------------------------------

    async def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: Mapping[str, str]
    ) -> None:
        """Create the image record, or point an existing one at the new target."""
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        image = images_pb2.Image(name=name, target=target, labels=dict(labels))
        try:
            await self._call(
                self.images.Create, images_pb2.CreateImageRequest(image=image), f"image {name}"
            )
        except AlreadyExists:
            mask = field_mask_pb2.FieldMask(paths=["target", "labels"])
            request = images_pb2.UpdateImageRequest(image=image, update_mask=mask)
            await self._call(self.images.Update, request, f"image {name}")

    # snapshots ----------------------------------------------------------------------------

    async def stat_snapshot(self, snapshotter: str, key: str) -> snapshots_pb2.Info | None:
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            response = await self._call(self.snapshots.Stat, request, f"snapshot {key}")
        except NotFound:
            return None
        info: snapshots_pb2.Info = response.info
        return info

    async def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[mount_pb2.Mount] | None:
        """Prepare through containerd; None when the snapshotter answered ALREADY_EXISTS."""
        request = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        try:
            response = await self._call(self.snapshots.Prepare, request, f"snapshot {key}")
        except AlreadyExists:
            return None
        return list(response.mounts)

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        await self._call(self.snapshots.Remove, request, f"snapshot {key}")
