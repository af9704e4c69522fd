"""`clip serve` as a process: socket, lock, signals, restart, config errors, draining."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.config import Config, DaemonConfig
from snapshotter.service.daemon import Daemon
from snapshotter.snapshots.remote import RemoteLayer


def _forward(stream: IO[str]) -> None:
    for line in stream:
        sys.stderr.write(line)


class ClipDaemon:
    """`clip serve` on <workdir>/root and <workdir>/run/clip.sock, stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / "root"
        self.socket = workdir / "run" / "clip.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start `clip serve` and return once it logged "serving" (it listens by then)."""
        args = ["serve", "--root", str(self.root), "--address", str(self.socket),
                "--log-format", "json"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapshotter", *args], stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            if '"serving"' in line:
                break
        else:
            raise AssertionError(f"clip serve exited ({self.proc.wait()}) before serving")
        # keep draining its log, so a full pipe never blocks the daemon
        threading.Thread(target=_forward, args=(self.proc.stderr,), daemon=True).start()
        assert self._listening()

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGTERM)
            assert self.proc.wait(30) == 0
            self.proc = None

    def __enter__(self) -> ClipDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class SnapshotsClient:
    def __init__(self, path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.md = (("containerd-namespace", "default"),)

    def __enter__(self) -> SnapshotsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def prepare(self, key: str, parent: str = "") -> None:
        self.stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent), metadata=self.md)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        req = pb.CommitSnapshotRequest(key=key, name=name, labels=labels)
        self.stub.Commit(req, metadata=self.md)

    def mounts(self, key: str) -> list[pb.Info]:
        return list(self.stub.Mounts(pb.MountsRequest(key=key), metadata=self.md).mounts)

    def walk(self) -> list[pb.Info]:
        req = pb.ListSnapshotsRequest()
        return [i for r in self.stub.List(req, metadata=self.md) for i in r.info]


def clip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapshotter", *args], capture_output=True, text=True, timeout=60
    )


def test_socket_is_created_with_parents_and_mode(tmp_path: Path) -> None:
    with ClipDaemon(tmp_path) as d:
        st = d.socket.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert d.socket.parent.is_dir()
    assert not d.socket.exists()  # removed on clean stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_and_restart_serves_the_same_snapshots(
    tmp_path: Path, sig: signal.Signals
) -> None:
    d = ClipDaemon(tmp_path)
    d.start()
    with SnapshotsClient(d.socket) as c:
        c.prepare("a")
        c.commit("A", "a", {"l": "1"})
        c.prepare("b", "A")
        before = (c.walk(), c.mounts("b"))
    assert d.proc is not None
    os.kill(d.proc.pid, sig)
    assert d.proc.wait(30) == 0
    d.proc = None
    assert not d.socket.exists()
    d.start()
    try:
        with SnapshotsClient(d.socket) as c:
            assert (c.walk(), c.mounts("b")) == before
    finally:
        d.stop()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "clip.sock"
    path.parent.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound but nobody listens: stale
    with ClipDaemon(tmp_path) as d, SnapshotsClient(d.socket) as c:
        assert c.walk() == []


def test_second_daemon_on_same_root_refuses(tmp_path: Path) -> None:
    with ClipDaemon(tmp_path / "one") as d:
        root = str(d.root)
        result = clip("serve", "--root", root, "--address", str(tmp_path / "other.sock"))
        assert result.returncode == 1
        assert result.stderr.startswith("clip: another clip daemon (pid ")
        assert f"is already serving root {root}" in result.stderr
        assert "Traceback" not in result.stderr
        other_root = clip("serve", "--root", str(tmp_path / "r2"), "--address", str(d.socket))
        assert other_root.returncode == 1 and "in use by another server" in other_root.stderr
        with SnapshotsClient(d.socket) as c:  # the first daemon is untouched
            assert c.walk() == []


def test_address_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = clip("serve", "--root", str(tmp_path / "r"), "--address", str(tmp_path / "file"))
    assert result.returncode == 1
    # (before it, the log may say which fs mode was chosen)
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"clip: address {tmp_path / 'file'} exists and is not a socket"
    assert (tmp_path / "file").read_text() == "x"


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "clip.toml"
    cfg.write_text('[daemon]\nlog_levle = "debug"\n')
    result = clip("serve", "--config", str(cfg), "--root", str(tmp_path / "r"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"clip: config {cfg}: daemon.log_levle: unknown key"
    assert not (tmp_path / "r").exists()


def test_serve_help_has_an_example() -> None:
    result = clip("serve", "--help")
    assert result.returncode == 0 and "example:" in result.stdout


class SlowProvider:
    """A provider whose Prepare waits for `release`, to show a stop waits for in-flight calls."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def prepare(self, layer: RemoteLayer) -> str:
        self.entered.set()
        await self.release.wait()
        self.base.mkdir(parents=True, exist_ok=True)
        return str(self.base)

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        return lowerdir

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        return None

    async def sweep(self) -> list[str]:
        return []


def test_stop_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    labels = {
        "containerd.io/snapshot.ref": "sha256:c",
        "containerd.io/snapshot/cri.image-ref": "r/i:1",
        "containerd.io/snapshot/cri.layer-digest": "sha256:d",
    }

    async def main() -> grpc.StatusCode:
        cfg = Config(daemon=DaemonConfig(root=str(tmp_path / "r"), address=str(tmp_path / "s")))
        provider = SlowProvider(tmp_path / "mnt")
        daemon = Daemon(cfg, provider)
        await daemon.start()
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 's'}") as ch:
            stub = pb_grpc.SnapshotsStub(ch)
            req = pb.PrepareSnapshotRequest(key="k", labels=labels)
            call = stub.Prepare(req, metadata=(("containerd-namespace", "default"),))
            await provider.entered.wait()
            stopping = asyncio.create_task(daemon.stop(grace=10))
            await asyncio.sleep(0)  # the stop has begun
            assert not stopping.done()
            provider.release.set()  # the in-flight call may finish only now...
            await stopping
            try:
                await call  # ...and it did finish: no CANCELLED/UNAVAILABLE
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        raise AssertionError("handshake Prepare must answer ALREADY_EXISTS")

    assert asyncio.run(main()) == grpc.StatusCode.ALREADY_EXISTS
    again = Daemon(
        Config(daemon=DaemonConfig(root=str(tmp_path / "r"), address=str(tmp_path / "s")))
    )

    async def check() -> None:
        await again.start()
        assert again.snapshotter is not None
        assert again.snapshotter.stat("default", "sha256:c").remote_dir == str(tmp_path / "mnt")
        await again.stop()

    asyncio.run(check())


def test_unusable_root_or_address_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    bad_root = clip("serve", "--root", str(tmp_path / "file" / "r"), "--address", "/tmp/n.sock")
    assert bad_root.returncode == 1
    assert bad_root.stderr.startswith(f"clip: cannot start on {tmp_path / 'file'}")
    bad_sock = str(tmp_path / "file" / "s.sock")
    bad_addr = clip("serve", "--root", str(tmp_path / "r"), "--address", bad_sock)
    # the daemon's log may already have said which fs mode it chose: the error is the last line
    last = bad_addr.stderr.strip().splitlines()[-1]
    assert bad_addr.returncode == 1 and last.startswith("clip: cannot start on ")
    assert "Traceback" not in bad_root.stderr + bad_addr.stderr


def test_corrupt_metadata_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metadata.db").write_bytes(b"not a database" * 100)
    result = clip("serve", "--root", str(tmp_path / "r"), "--address", str(tmp_path / "s"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"clip: cannot open {tmp_path / 'r' / 'metadata.db'}: ")
    assert not (tmp_path / "s").exists()
