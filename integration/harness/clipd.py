"""Start and stop ``clip serve`` for tests, and talk to it through the generated client.

The daemon runs as a child process on its own temporary root and socket; it is stopped by
PID (SIGTERM, then SIGKILL after a timeout). ``SnapshotsClient`` is a thin synchronous wrapper
over the generated stub that sends the ``containerd-namespace`` metadata like containerd does.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from integration.harness.process import log_tail, stop_process
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

# `clip serve` as the installed console script runs it.
CLIP = [sys.executable, "-m", "snapshotter"]


def clip_pull(
    containerd_socket: Path, namespace: str, ref: str, *, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`clip pull --plain-http REF` into a test's containerd (the registries here are HTTP)."""
    cmd = [*CLIP, "pull", "--plain-http", "--namespace", namespace,
           "--address", str(containerd_socket), ref]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class ClipDaemon:
    """``clip serve`` on ``<workdir>/root`` and ``<workdir>/run/clip.sock``.

    Pass a short ``workdir`` (e.g. under /tmp) when tests mount deep chains: overlay option
    strings hold every lowerdir path.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        config: Path | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "debug",
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="clipd-", dir="/tmp"))
        self.root = self.workdir / "root"
        self.socket = self.workdir / "run" / "clip.sock"
        self.log_path = self.workdir / "clipd.log"
        self.config = config
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        cmd = [*CLIP, "serve", "--root", str(self.root), "--address", str(self.socket)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return [*cmd, "--log-level", self.log_level, *self.extra_args]

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clip serve exited {self.proc.returncode}: {self.log()}")
            if self.socket.exists() and self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"clip serve did not listen on {self.socket}: {self.log()}")

    def _answers(self) -> bool:
        try:
            with SnapshotsClient(self.socket) as client:
                client.walk()
            return True
        except grpc.RpcError:
            return False

    def stop(self, timeout: float = 30.0, keep_mounts: bool = False) -> int | None:
        """SIGTERM by PID, wait, SIGKILL if needed; return the exit code. Unless
        ``keep_mounts`` (a restart test), also unmount the layer mounts the daemon leaves."""
        proc, self.proc = self.proc, None
        code = stop_process(proc, timeout)
        if not keep_mounts:
            self.unmount_leftovers()
        return code

    def kill(self) -> None:
        """SIGKILL by PID (crash simulation)."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return log_tail(self.log_path)

    def unmount_leftovers(self) -> list[str]:
        """Undo what a stopped daemon leaves under its root on purpose so running containers
        survive a restart: EROFS mounts of layers and the stream mount whose FUSE session a
        holder process keeps. Unmounts by path (deepest first, lazily: nothing may touch a
        FUSE mount nobody serves), then stops the holder by the PID in its pidfile. Returns the
        paths it unmounted."""
        prefix = str(self.root) + "/"
        left = sorted((p for p in iter_mountpoints() if p.startswith(prefix)), reverse=True)
        for path in left:
            subprocess.run(["umount", "-l", path], check=False, capture_output=True)
        stop_pidfile(self.root / "fuse-holder.pid")
        return left

    def __enter__(self) -> ClipDaemon:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


KIND_NAMES = {pb.VIEW: "view", pb.ACTIVE: "active", pb.COMMITTED: "committed"}


class SnapshotsClient:
    """Synchronous Snapshots client over a unix socket, one namespace per client."""

    def __init__(self, socket: Path, namespace: str | None = "default") -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (
            () if namespace is None else (("containerd-namespace", namespace),)
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SnapshotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _mounts(mounts: Sequence[object]) -> list[Mount]:
        return [Mount(m.type, m.source, tuple(m.options)) for m in mounts]  # type: ignore[attr-defined]

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter="clip", key=key, parent=parent, labels=labels)
        return self._mounts(self.stub.Prepare(req, metadata=self.metadata).mounts)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = pb.ViewSnapshotRequest(snapshotter="clip", key=key, parent=parent, labels=labels)
        return self._mounts(self.stub.View(req, metadata=self.metadata).mounts)

    def mounts(self, key: str) -> list[Mount]:
        req = pb.MountsRequest(snapshotter="clip", key=key)
        return self._mounts(self.stub.Mounts(req, metadata=self.metadata).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(snapshotter="clip", name=name, key=key, labels=labels)
        self.stub.Commit(req, metadata=self.metadata)

    def remove(self, key: str) -> None:
        self.stub.Remove(
            pb.RemoveSnapshotRequest(snapshotter="clip", key=key), metadata=self.metadata
        )

    def stat(self, key: str) -> pb.Info:
        req = pb.StatSnapshotRequest(snapshotter="clip", key=key)
        return self.stub.Stat(req, metadata=self.metadata).info

    def update(self, info: pb.Info, *paths: str) -> pb.Info:
        req = pb.UpdateSnapshotRequest(snapshotter="clip", info=info)
        if paths:
            req.update_mask.paths.extend(paths)
        return self.stub.Update(req, metadata=self.metadata).info

    def walk(self, *filters: str) -> list[pb.Info]:
        req = pb.ListSnapshotsRequest(snapshotter="clip", filters=list(filters))
        return [i for r in self.stub.List(req, metadata=self.metadata) for i in r.info]

    def usage(self, key: str) -> tuple[int, int]:
        resp = self.stub.Usage(pb.UsageRequest(snapshotter="clip", key=key), metadata=self.metadata)
        return resp.size, resp.inodes

    def cleanup(self) -> None:
        self.stub.Cleanup(pb.CleanupRequest(snapshotter="clip"), metadata=self.metadata)


def stop_pidfile(pidfile: Path, timeout: float = 10.0) -> None:
    """SIGTERM the process a pidfile names (if it still runs), SIGKILL it after ``timeout``.
    A pidfd tells when it has exited (it is not our child: no waitpid) and pins the PID."""
    try:
        pid = int(pidfile.read_text().split()[0])
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError, IndexError):
        return
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            if select.select([pidfd], [], [], timeout)[0]:
                return
    finally:
        os.close(pidfd)


def iter_mountpoints() -> Iterator[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            yield line.split()[4].replace("\\040", " ")
