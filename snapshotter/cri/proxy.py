"""The CRI ImageService proxy: every call goes to containerd's CRI plugin, byte for byte.

Requests and responses are forwarded as serialized bytes, so fields clip's proto does not
describe (a newer kubelet's) reach containerd and come back untouched. Two calls are read on
the way: ``PullImage`` (its ``auth`` is kept in the keychain *before* the pull is forwarded,
because containerd's unpack already asks clip for the layers) and ``ImageFsInfo`` (clip's
storage is added to the answer). Metadata, the caller's deadline and cancellation pass
through (a cancelled caller cancels the forwarded call: it is awaited in the handler's task);
containerd's errors reach the caller with their code, details and trailing metadata.

Both ``runtime.v1`` and ``runtime.v1alpha2`` (kubelet before 1.26 may use it; containerd 1.6
serves both) are proxied: the messages read here are wire-identical in the two.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from snapshotter.api.cri.runtime.v1 import api_pb2
from snapshotter.cri.fsinfo import Usage, add_clip_storage
from snapshotter.cri.keychain import CriKeychain, PullAuth

log = logging.getLogger(__name__)

SERVICES = ("runtime.v1.ImageService", "runtime.v1alpha2.ImageService")
METHODS = ("ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo")
# Metadata the gRPC transport owns; everything else a caller sends is forwarded.
_TRANSPORT_KEYS = frozenset({"content-type", "user-agent", "te", "authority"})

Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]
UsageProbe = Callable[[], Usage]


def _outgoing(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[tuple[str, str | bytes], ...]:
    """The metadata worth forwarding (grpc's aio API takes tuples, not lists)."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if key not in _TRANSPORT_KEYS and not key.startswith((":", "grpc-"))
    )


class ImageServiceProxy:
    """Generic gRPC handlers forwarding the ImageService to ``channel`` (containerd)."""

    def __init__(
        self, channel: grpc.aio.Channel, keychain: CriKeychain, root: Path, usage: UsageProbe
    ) -> None:
        self.channel = channel
        self.keychain = keychain
        self.root = root
        self.usage = usage

    def handlers(self) -> list[grpc.GenericRpcHandler[bytes, bytes]]:
        """One generic handler per proxied service (raw bytes in and out)."""
        out = []
        for service in SERVICES:
            methods = {
                name: grpc.unary_unary_rpc_method_handler(self._handler(f"/{service}/{name}"))
                for name in METHODS
            }
            out.append(grpc.method_handlers_generic_handler(service, methods))
        return out

    def _handler(self, path: str) -> Handler:
        method = path.rsplit("/", 1)[1]

        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            if method == "PullImage":
                self._keep_credentials(request)
            response = await self._forward(path, request, context)
            if method == "ImageFsInfo":
                response = await self._with_clip_storage(response)
            return response

        return handle

    async def _forward(
        self, path: str, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        call = self.channel.unary_unary(path, None, None)(
            request,
            metadata=_outgoing(context.invocation_metadata()),  # type: ignore[arg-type]
            timeout=context.time_remaining(),
        )
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as err:
            trailing = _outgoing(err.trailing_metadata())  # type: ignore[arg-type]
            await context.abort(err.code(), err.details() or "", trailing)
        context.set_trailing_metadata(_outgoing(await call.trailing_metadata()))  # type: ignore[arg-type]
        return response

    def _keep_credentials(self, request: bytes) -> None:
        """Remember the pull's credentials for its repository; never log them."""
        try:
            pull = api_pb2.PullImageRequest.FromString(request)
        except DecodeError:
            return  # containerd rejects it with the right code
        image = pull.image.image
        if not pull.HasField("auth"):
            log.debug("PullImage without credentials", extra={"fields": {"image": image}})
            return
        a = pull.auth
        kept = self.keychain.remember(
            image,
            PullAuth(
                username=a.username,
                password=a.password,
                auth=a.auth,
                server_address=a.server_address,
                identity_token=a.identity_token,
                registry_token=a.registry_token,
            ),
        )
        fields = {"image": image, "server": a.server_address, "kept": kept}
        log.info("PullImage credentials", extra={"fields": fields})

    async def _with_clip_storage(self, response: bytes) -> bytes:
        try:
            info = api_pb2.ImageFsInfoResponse.FromString(response)
        except DecodeError:
            log.warning("ImageFsInfo: containerd's answer does not parse; forwarded as it is")
            return response
        usage = await asyncio.to_thread(self.usage)
        add_clip_storage(info, self.root, usage)
        return info.SerializeToString()
