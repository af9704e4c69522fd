"""The clip daemon: one asyncio loop running the gRPC server, plus pluggable services.

Other parts of clip plug in here: a LayerProvider (remote layers) and BackgroundServices
(e.g. the FUSE thread, the metrics endpoint) that start before the socket accepts calls and
stop after it has drained. ``run()`` serves until SIGTERM/SIGINT, then stops cleanly:
in-flight RPCs finish (each is atomic on disk), services stop, the socket and lock go.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import stat
from pathlib import Path
from typing import Protocol

import grpc

from snapshotter.api.clip.v1 import status_pb2_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.config import Config
from snapshotter.errors import FailedPrecondition, InvalidArgument, Unavailable
from snapshotter.service.servicer import SnapshotsService
from snapshotter.service.status import StatusService
from snapshotter.snapshots.remote import LayerProvider
from snapshotter.snapshots.snapshotter import Snapshotter

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 30.0
_MAX_MESSAGE = 16 * 1024 * 1024


class BackgroundService(Protocol):
    """Something that runs beside the gRPC server for the daemon's lifetime."""

    name: str

    async def start(self, daemon: Daemon) -> None:
        """Start (e.g. spawn a thread); return once the service is usable."""
        ...

    async def stop(self) -> None:
        """Stop and release everything started; must not raise for an unstarted service."""
        ...


class RootLock:
    """An exclusive flock on ``<root>/clip.lock`` so two daemons never share a root."""

    def __init__(self, root: Path) -> None:
        self.path = root / "clip.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FailedPrecondition(
                f"another clip daemon (pid {holder}) is already serving root {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _prepare_socket_path(path: Path) -> None:
    """Create parent dirs; replace a stale socket; refuse a live one or a non-socket."""
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"address {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise Unavailable(f"address {path}: cannot probe socket: {exc.strerror}") from None
        path.unlink()
        return
    finally:
        probe.close()
    raise FailedPrecondition(f"address {path} is in use by another server")


class Daemon:
    """``clip serve``: Snapshots service on a unix socket over one root."""

    def __init__(self, config: Config, provider: LayerProvider | None = None) -> None:
        self.config = config
        self.root = Path(config.daemon.root)
        self.address = Path(config.daemon.address)
        self.provider = provider
        self.services: list[BackgroundService] = []
        self.snapshotter: Snapshotter | None = None
        self._lock = RootLock(self.root)
        self._server: grpc.aio.Server | None = None
        self._started: list[BackgroundService] = []
        self._stop = asyncio.Event()

    def add_service(self, service: BackgroundService) -> None:
        """Register a background service (before start())."""
        self.services.append(service)

    async def start(self) -> None:
        """Lock the root, open the store, start services, restore remote layers, listen."""
        try:
            await self._start()
        except OSError as exc:
            where = exc.filename or self.root
            raise Unavailable(f"cannot start on {where}: {exc.strerror or exc}") from None
        except sqlite3.DatabaseError as exc:
            raise Unavailable(f"cannot open {self.root / 'metadata.db'}: {exc}") from None

    async def _start(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self.snapshotter = Snapshotter(self.root, self.provider)
            await self.snapshotter.cleanup()
            for service in self.services:
                await service.start(self)
                self._started.append(service)
            await self.snapshotter.restore_remote()
            await self._serve()
        except BaseException:
            await self._teardown(grace=0)
            raise
        fields = {"root": str(self.root), "address": str(self.address)}
        log.info("serving", extra={"fields": fields})

    async def _serve(self) -> None:
        assert self.snapshotter is not None
        _prepare_socket_path(self.address)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
            ]
        )
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(self.snapshotter), server)
        status_pb2_grpc.add_StatusServicer_to_server(StatusService(self), server)
        # The socket is born with its final mode: no window where it is wider or narrower.
        old_umask = os.umask(0o777 & ~self.config.daemon.socket_mode)
        try:
            server.add_insecure_port(f"unix:{self.address}")
            await server.start()
        except RuntimeError as exc:
            raise Unavailable(f"address {self.address}: cannot listen: {exc}") from None
        finally:
            os.umask(old_umask)
        self._server = server
        os.chmod(self.address, self.config.daemon.socket_mode)

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        await self._teardown(grace)

    async def _teardown(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.address.unlink()
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", service.name)
        if self.snapshotter is not None:
            self.snapshotter.close()
            self.snapshotter = None
        self._lock.release()

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
