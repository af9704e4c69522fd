"""``[cri] image_service_address``: the CRI image-service proxy as a daemon BackgroundService.

It listens on its own unix socket (kubelet's ``--image-service-endpoint``), separate from the
Snapshots socket containerd dials, and opens one channel to containerd's socket. It starts
with the daemon and stops before the remote-layer provider it feeds credentials to.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from snapshotter.config import Config
from snapshotter.cri.fsinfo import Usage, storage_dirs, storage_usage
from snapshotter.cri.keychain import CriKeychain
from snapshotter.cri.proxy import ImageServiceProxy
from snapshotter.errors import Unavailable

if TYPE_CHECKING:
    from snapshotter.service.daemon import Daemon

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 10.0
# kubelet's CRI client allows 16 MiB messages (ListImages on a node with many images is big);
# both hops of the proxy allow the same, gRPC's default is 4 MiB.
MAX_MESSAGE = 16 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


class CriImageService:
    """Serve the proxied ImageService for the daemon's lifetime."""

    name = "cri-image-service"

    def __init__(self, config: Config, keychain: CriKeychain) -> None:
        self.config = config
        self.keychain = keychain
        self.address = Path(config.cri.image_service_address)
        self.upstream = config.cri.containerd_cri_address
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    def _usage(self) -> Usage:
        return storage_usage(storage_dirs(self.config))

    async def start(self, daemon: Daemon) -> None:
        from snapshotter.service.daemon import _prepare_socket_path

        _prepare_socket_path(self.address)
        self._channel = grpc.aio.insecure_channel(f"unix:{self.upstream}", options=_OPTIONS)
        root = Path(self.config.daemon.root)
        proxy = ImageServiceProxy(self._channel, self.keychain, root, self._usage)
        server = grpc.aio.server(handlers=proxy.handlers(), options=_OPTIONS)
        mode = self.config.daemon.socket_mode
        old_umask = os.umask(0o777 & ~mode)
        try:
            server.add_insecure_port(f"unix:{self.address}")
            await server.start()
        except RuntimeError as exc:
            await self.stop()
            raise Unavailable(f"[cri] address {self.address}: cannot listen: {exc}") from None
        finally:
            os.umask(old_umask)
        self._server = server
        os.chmod(self.address, mode)
        fields = {"address": str(self.address), "containerd": self.upstream}
        log.info("serving the CRI image service", extra={"fields": fields})

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(STOP_GRACE_SECONDS)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.address.unlink()
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
