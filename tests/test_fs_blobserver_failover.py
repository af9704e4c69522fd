"""The blob mount survives its server: SIGTERM and SIGKILL of the serving process while a reader
waits on a read the old server never answers; a new server takes the /dev/fuse descriptor from
the holder, asks the kernel to resend, and the waiting read, files opened before, and fresh opens
all return the right bytes. Also: the holder's exit on a real shutdown and on a lost mount, and
a mount whose holder died too fails with ENOTCONN instead of hanging.

Every process runs for real (server children, the holder, reader children); synchronisation is
on their output lines and on pidfds, never on sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fs_blobserver_child import pattern

from snapshotter.fs import fuseproto as fp
from snapshotter.fs import holder
from snapshotter.fs.mounts import lazy_unmount

MiB = 1 << 20
CHILD = Path(__file__).with_name("fs_blobserver_child.py")
REPO = Path(__file__).resolve().parents[1]
SIZE = 64 * MiB
STALL_FROM = 32 * MiB

# A reader in its own process: opens the blob, reads 4 KiB, then for each offset given on stdin
# preads 1 MiB from the same open file and prints its sha256.
READER = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(hashlib.sha256(os.pread(fd, 4096, 0)).hexdigest(), flush=True)
for line in sys.stdin:
    try:
        data = os.pread(fd, 1 << 20, int(line))
        print(hashlib.sha256(data).hexdigest(), flush=True)
    except OSError as exc:
        print(f"error {exc.errno}", flush=True)
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Rig:
    """Paths and processes of one test, all cleaned up by PID and path."""

    root: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    @property
    def sock(self) -> Path:
        return self.root / "holder.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "holder.pid"

    def blob(self, name: str = "layer") -> Path:
        return self.mnt / "blobs" / name

    def server(self, *extra: str) -> subprocess.Popen[str]:
        """A server child in its own session (so a SIGKILL of its group is a real test)."""
        proc = subprocess.Popen(
            [sys.executable, os.fspath(CHILD), os.fspath(self.mnt), os.fspath(self.sock),
             *extra, f"layer:{SIZE}"],
            stdout=subprocess.PIPE, text=True, start_new_session=True, env=_env(),
        )
        self.procs.append(proc)
        self.servers.append(proc)
        return proc

    def reader(self, path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", READER, os.fspath(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(),
        )
        self.procs.append(proc)
        return proc

    def holder_pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def cleanup(self) -> None:
        """Servers first, then the holder: with the last /dev/fuse descriptor closed the kernel
        aborts the connection, so readers blocked on it return; then readers, then the mount."""
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        holder.release(self.sock)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = self.holder_pid()
            if "snapshotter.fs.holder" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                wait_exit(pid)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if fp.device_of_mount(self.mnt) is not None:
            lazy_unmount(self.mnt)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.fspath(REPO), env.get("PYTHONPATH")) if p)
    return env


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def wait_exit(pid: int) -> None:
    """Block until process `pid` (not our child) has exited: a pidfd polls readable then."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def expect(proc: subprocess.Popen[str], prefix: str) -> str:
    """The next stdout line of `proc`, which must start with `prefix`."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith(prefix), (prefix, line)
    return line


def ask(reader: subprocess.Popen[str], offset: int) -> None:
    assert reader.stdin is not None
    reader.stdin.write(f"{offset}\n")
    reader.stdin.flush()


def answer(reader: subprocess.Popen[str]) -> str:
    assert reader.stdout is not None
    return reader.stdout.readline().strip()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()
    assert fp.device_of_mount(r.mnt) is None


@pytest.mark.parametrize("how", ["TERM", "KILL"])
def test_blocked_read_completes_after_failover(rig: Rig, how: str) -> None:
    data = pattern("layer", SIZE)
    old = rig.server("--stall-from", str(STALL_FROM))
    assert expect(old, "ready") == "ready resumed=False"
    holder_pid = rig.holder_pid()
    assert os.getsid(holder_pid) != os.getsid(old.pid)  # not in the server's session or group

    reader = rig.reader(rig.blob())
    assert answer(reader) == sha(data[:4096])
    blocked_at = STALL_FROM + 8 * MiB
    ask(reader, blocked_at)
    # wait until the old server holds a read covering the reader's range, never to answer it
    while True:
        _, _, off, size = expect(old, "stalled").split()
        if int(off) <= blocked_at < int(off) + int(size):
            break

    if how == "TERM":
        old.send_signal(signal.SIGTERM)
    else:
        os.killpg(old.pid, signal.SIGKILL)  # the whole group: the holder must not be in it
    old.wait()
    assert fp.device_of_mount(rig.mnt) is not None  # the mount stays while the holder holds it
    assert rig.holder_pid() == holder_pid and _cmdline(holder_pid)

    new = rig.server()
    assert expect(new, "ready") == "ready resumed=True"
    # the read the old server took and never answered comes back to the new one
    assert answer(reader) == sha(data[blocked_at : blocked_at + MiB])
    # the file opened before the restart keeps working, elsewhere in the blob too
    ask(reader, 5 * MiB)
    assert answer(reader) == sha(data[5 * MiB : 6 * MiB])
    # and a fresh open reads the whole blob right
    with open(rig.blob(), "rb") as f:
        assert sha(f.read()) == sha(data)
    assert rig.blob().stat().st_size == SIZE

    reader.stdin.close()  # type: ignore[union-attr]
    reader.wait()  # its close is a FLUSH: a server must be there to answer it
    new.send_signal(signal.SIGTERM)
    assert int(expect(new, "resent").split()[1]) >= 1  # the blocked read came back as a resend
    new.wait()
    # the real shutdown: nothing mounted, the holder gone
    holder.release(rig.sock)
    lazy_unmount(rig.mnt)
    wait_exit(holder_pid)
    assert fp.device_of_mount(rig.mnt) is None
    assert not rig.sock.exists() and not rig.pidfile.exists()


def test_holder_exits_when_the_mount_goes(rig: Rig) -> None:
    server = rig.server()
    expect(server, "ready")
    holder_pid = rig.holder_pid()
    server.send_signal(signal.SIGTERM)
    server.wait()
    lazy_unmount(rig.mnt)  # an operator's umount, no message to the holder
    wait_exit(holder_pid)  # the held descriptor polled POLLERR: the holder left by itself
    assert not rig.sock.exists()
    assert fp.device_of_mount(rig.mnt) is None
    mounts = Path("/proc/mounts").read_text().splitlines()
    assert not any(os.fspath(rig.mnt) in line for line in mounts)


def test_mount_without_server_and_holder_fails_clean(rig: Rig) -> None:
    data = pattern("layer", SIZE)
    server = rig.server("--stall-from", str(STALL_FROM))
    expect(server, "ready")
    holder_pid = rig.holder_pid()
    reader = rig.reader(rig.blob())
    assert answer(reader) == sha(data[:4096])
    ask(reader, STALL_FROM)
    expect(server, "stalled")

    os.kill(holder_pid, signal.SIGKILL)
    wait_exit(holder_pid)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    # the last /dev/fuse descriptor closed: the kernel aborted the connection, so the waiting
    # read and every later access fail at once instead of hanging
    assert answer(reader) == f"error {errno.ENOTCONN}"
    with pytest.raises(OSError) as err:
        rig.blob().open("rb")
    assert err.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as err:
        os.listdir(rig.mnt / "blobs")
    assert err.value.errno == errno.ENOTCONN
    # a new server does not resume a dead session: it clears the stale mount and mounts afresh
    again = rig.server()
    assert expect(again, "ready") == "ready resumed=False"
    assert rig.blob().read_bytes()[:4096] == data[:4096]


def test_holder_command_line(rig: Rig) -> None:
    cmd = [sys.executable, "-m", "snapshotter.fs.holder", "--socket", os.fspath(rig.sock),
           "--pidfile", os.fspath(rig.pidfile)]
    first = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    pid = rig.holder_pid()
    assert "snapshotter.fs.holder" in _cmdline(pid)
    assert os.getsid(pid) != os.getsid(0) and os.getpgid(pid) != os.getpgid(0)
    assert holder.running(rig.sock) and holder.get(rig.sock) is None  # holds nothing yet
    second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    assert second.returncode == 1
    assert second.stderr.count("\n") == 1 and "already listens" in second.stderr
    holder.release(rig.sock)  # returns once the holder has exited
    assert not _cmdline(pid)
    assert not rig.sock.exists() and not rig.pidfile.exists()
