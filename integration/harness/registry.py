"""Debian's docker-registry (distribution 2.8) on a loopback port, owned by one test.

Each server gets its own storage directory, config file and log under ``workdir`` so tests never
share state with a system registry. The port is chosen once and kept across ``stop()``/``start()``
so image references stay valid when a test simulates an outage by stopping the registry.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType

from integration.harness.process import stop_process

REGISTRY_BINARY = "docker-registry"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash via libcrypt; distribution's htpasswd backend accepts only bcrypt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # deprecated in 3.11 but the only bcrypt in the stdlib; fine for tests

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("libcrypt produced no bcrypt hash; cannot write htpasswd")
    return hashed


class RegistryServer:
    """A docker-registry process listening on ``host`` ("127.0.0.1:PORT")."""

    def __init__(self, workdir: Path, *, htpasswd: tuple[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.htpasswd = htpasswd
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  redirect:",
            "    disable: true",
            "http:",
            f"  addr: {self.host}",
            "  draintimeout: 1s",
        ]
        if self.htpasswd is not None:
            user, password = self.htpasswd
            htfile = self.workdir / "htpasswd"
            htfile.write_text(f"{user}:{bcrypt_hash(password)}\n")
            lines += ["auth:", "  htpasswd:", "    realm: clip-test", f"    path: {htfile}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 20.0) -> None:
        """Start the process and wait until ``/v2/`` answers (200, or 401 with htpasswd)."""
        if self._proc is not None:
            raise RuntimeError(f"registry {self.host} already running (pid {self._proc.pid})")
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(f"{REGISTRY_BINARY} not installed (Debian package docker-registry)")
        self._write_config()
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"docker-registry exited early; log:\n{self.log_path.read_text()[-2000:]}"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry on {self.host} not ready after {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this registry by PID (SIGTERM, then SIGKILL) and reap it; storage is kept."""
        proc, self._proc = self._proc, None
        stop_process(proc, timeout)

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (distribution's storage layout)."""
        algo, hexdigest = digest.split(":", 1)
        return (
            self.storage
            / "docker"
            / "registry"
            / "v2"
            / "blobs"
            / algo
            / hexdigest[:2]
            / hexdigest
            / "data"
        )

    def replace_blob(self, digest: str, data: bytes) -> None:
        """Overwrite a stored blob behind the registry's back (tampered or truncated content).

        The registry verifies digests only on upload, so it then serves ``data`` under the old
        digest: what a client sees from a corrupt or malicious registry.
        """
        path = self.blob_path(digest)
        if not path.exists():
            raise FileNotFoundError(f"registry {self.host} has no blob {digest} at {path}")
        path.write_bytes(data)

    def access_log(self) -> str:
        """The registry's log so far (requests, for tests that count what was served)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
