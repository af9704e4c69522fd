"""A private containerd for tests: own root, state, sockets and config, stopped by PID.

The config (version 2) registers clip as ``proxy_plugins.clip`` and disables the CRI plugin
(it wants CNI and is not needed for ``ctr``). ``ctr()`` runs Debian's ctr against this
daemon's socket. ``stop()`` removes what tests left running (tasks, containers), stops the
daemon by PID and unmounts anything still mounted under the work dir, by path.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from integration.harness.process import log_tail, stop_process

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[proxy_plugins]
  [proxy_plugins.clip]
    type = "snapshot"
    address = "{clip_socket}"
    [proxy_plugins.clip.exports]
      root = "{clip_root}"
"""


class CommandFailed(AssertionError):
    pass


class Containerd:
    def __init__(self, workdir: Path, clip_socket: Path, clip_root: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.socket = workdir / "containerd.sock"
        self.config = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self.clip_socket = clip_socket
        self.clip_root = clip_root
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}: {self.log()}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"containerd did not start: {self.log()}")

    def config_text(self) -> str:
        """The config file's text (a subclass may add tables, e.g. a CRI-enabled one)."""
        return CONFIG.format(
            root=self.root,
            state=self.state,
            socket=self.socket,
            clip_socket=self.clip_socket,
            clip_root=self.clip_root,
        )

    def ctr(
        self, *args: str, namespace: str = "clip-e2e", check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", str(self.socket), "--namespace", namespace, *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandFailed(f"{' '.join(cmd)} -> {result.returncode}: {result.stderr.strip()}")
        return result

    def run(self, *args: str, **ctr_options: Any) -> subprocess.CompletedProcess[str]:
        """``ctr run`` with FIFOs and runc state under the work dir (not /run/containerd)."""
        private = [
            "--fifo-dir",
            str(self.workdir / "fifo"),
            "--runc-root",
            str(self.workdir / "runc"),
        ]
        return self.ctr("run", *private, *args, **ctr_options)

    def _remove_leftovers(self) -> None:
        """Kill and delete tasks and containers in every namespace (best effort)."""
        for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
                self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False)
            for c in self.ctr("containers", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("containers", "rm", c, namespace=ns, check=False)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._remove_leftovers()
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)
        unmount_under(self.workdir)

    def wait_for_snapshotter(
        self, namespace: str, snapshotter: str = "clip", timeout: float = 60.0
    ) -> None:
        """containerd redials a restarted proxy snapshotter with gRPC's backoff: wait until it
        answers a listing again (there is no event for that; fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            ls = self.ctr("snapshots", "--snapshotter", snapshotter, "ls",
                          namespace=namespace, check=False)  # fmt: skip
            if ls.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"containerd did not reach {snapshotter} within {timeout} s")
            time.sleep(0.5)

    def log(self) -> str:
        return log_tail(self.log_path)

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def unmount_under(path: Path) -> None:
    """Unmount every mount point at or below ``path``, deepest first, by path."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")),
                        key=len, reverse=True):  # fmt: skip
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
