"""redis-server processes owned by one test: a single server, or a 3-master Redis Cluster.

Each server runs on a free loopback port with its own directory (no persistence, no config file
outside it) and is stopped by PID. The port is kept across `stop()`/`start()` so a test can
simulate an outage and a recovery at the same address. `pause()`/`resume()` freeze the process
with SIGSTOP/SIGCONT to model a server that accepts bytes but never answers.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from integration.harness.process import stop_process
from integration.harness.registry import free_port

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P+10000 is free too (Redis requires both)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55536)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int, timeout: float = 0.5, tls: bool = False) -> bool:
    """True when something answers PING with +PONG on 127.0.0.1:port (plain TCP only)."""
    if tls:
        return _port_open(port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1:`port`; a context manager that stops it and removes its dir.

    `tls` = (ca, cert, key) paths serves TLS only on the port (plain TCP disabled).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        password: str | None = None,
        cluster: bool = False,
        tls: tuple[Path, Path, Path] | None = None,
        port: int | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="clip-redis-"))
        self.password = password
        self.cluster = cluster
        self.tls = tls
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def url(self, db: int = 0) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def _args(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
            "--protected-mode",
            "no",
            "--enable-debug-command",
            "local",
        ]
        if self.tls:
            ca, cert, key = self.tls
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-ca-cert-file",
                str(ca),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
        return args

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the port answers."""
        if self._proc is not None:
            raise RuntimeError(f"redis on {self.port} already running (pid {self._proc.pid})")
        if shutil.which(REDIS_SERVER) is None:
            raise RuntimeError(f"{REDIS_SERVER} not installed (Debian package redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server exited early; log:\n{self._log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on {self.port} not ready after {timeout}s")

    def _answers(self) -> bool:
        if self.tls or self.password:
            return _port_open(self.port)
        return _ping(self.port)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def pause(self) -> None:
        """SIGSTOP this server: connections stay open but nothing is answered."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop by PID (SIGCONT first in case it is paused, then SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc, timeout)

    def cli(self, *command: str) -> str:
        """Run one redis-cli command against this server; returns stdout."""
        args = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            args += ["--no-auth-warning", "-a", self.password]
        if self.tls:
            args += ["--tls", "--cacert", str(self.tls[0])]
        done = subprocess.run([*args, *command], capture_output=True, timeout=30, check=True)
        return done.stdout.decode()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop and remove the directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisClusterServers:
    """Three cluster-enabled masters joined with `redis-cli --cluster create` (no replicas)."""

    def __init__(self, masters: int = 3) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="clip-redis-cluster-"))
        self.servers = [
            RedisServer(self.workdir / f"node{i}", cluster=True) for i in range(masters)
        ]

    def url(self) -> str:
        return self.servers[0].url()

    def start(self, timeout: float = 30.0) -> None:
        try:
            for server in self.servers:
                server.start()
            nodes = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *nodes,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                timeout=60,
                check=True,
            )
            self._wait_ok(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in self.servers):
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis cluster not ok after {timeout}s")

    def node_for(self, key: str) -> RedisServer:
        """The master serving `key`'s slot."""
        slot = int(self.servers[0].cli("CLUSTER", "KEYSLOT", key).strip())
        for server in self.servers:
            for line in server.cli("CLUSTER", "NODES").splitlines():
                fields = line.split()
                if "myself" in fields[2]:
                    for span in fields[8:]:
                        lo, _, hi = span.partition("-")
                        if int(lo) <= slot <= int(hi or lo):
                            return server
        raise RuntimeError(f"no master for slot {slot}")

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
