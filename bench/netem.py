"""A registry behind a link of chosen bandwidth and latency, in a network namespace we create.

Layout (all addresses private to the namespace pair this module makes, removed afterwards)::

    clients -> CountingProxy 127.0.0.1 -> [DelayRelay 127.0.0.1] -> veth 10.213.x.1
            == tbf <rate> on both ends ==> veth 10.213.x.2 in netns -> docker-registry

Bandwidth is a tc ``tbf`` qdisc on both veth ends. This kernel has no ``sch_netem`` (and no
modprobe), so latency is added in user space by :class:`DelayRelay`, a TCP relay that holds
every chunk for the one-way delay in each direction (so a round trip costs 2 x delay while the
pipe stays full: the relay delays, it does not serialize). Run ``python -m bench.netem relay``
standalone to reuse it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from integration.harness.registry import REGISTRY_BINARY, RegistryServer, free_port


def _ip(*args: str, netns: str | None = None, check: bool = True) -> None:
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")


class ShapedLink:
    """A netns + veth pair; ``shape()``/``unshape()`` add or remove tbf on both ends."""

    def __init__(self, tag: int | None = None) -> None:
        tag = tag if tag is not None else os.getpid() % 250 + 1
        self.netns = f"clipbench-{os.getpid()}"
        self.host_dev = f"cb{os.getpid() % 100000}h"
        self.ns_dev = f"cb{os.getpid() % 100000}n"
        self.host_addr = f"10.213.{tag}.1"
        self.ns_addr = f"10.213.{tag}.2"
        self.shaped: tuple[int, int] | None = None  # (mbit, one-way delay ms)

    def up(self) -> None:
        _ip("ip", "netns", "add", self.netns)
        try:
            _ip("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _ip("ip", "link", "set", self.ns_dev, "netns", self.netns)
            _ip("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
            _ip("ip", "link", "set", self.host_dev, "up")
            _ip("ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_dev, netns=self.netns)
            _ip("ip", "link", "set", self.ns_dev, "up", netns=self.netns)
            _ip("ip", "link", "set", "lo", "up", netns=self.netns)
        except Exception:
            self.down()
            raise

    def shape(self, mbit: int) -> None:
        """tbf at ``mbit`` on both directions (burst of ~1 ms worth, at least 32 KiB)."""
        burst = max(32 * 1024, mbit * 1_000_000 // 8 // 1000)
        for dev, ns in ((self.host_dev, None), (self.ns_dev, self.netns)):
            _ip(
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{mbit}mbit",
                "burst",
                str(burst),
                "latency",
                "100ms",
                netns=ns,
            )

    def unshape(self) -> None:
        _ip("tc", "qdisc", "del", "dev", self.host_dev, "root", check=False)
        _ip("tc", "qdisc", "del", "dev", self.ns_dev, "root", netns=self.netns, check=False)

    def down(self) -> None:
        """Remove qdiscs, the veth pair and the namespace (idempotent, for finally blocks)."""
        self.unshape()
        _ip("ip", "link", "del", self.host_dev, check=False)
        _ip("ip", "netns", "del", self.netns, check=False)


class ShapedRegistry(RegistryServer):
    """The integration harness's docker-registry, run inside ``link``'s namespace.

    Reuses RegistryServer's config writer, storage layout and stop(); only the address, the
    command prefix and the readiness probe differ (the harness's probe dials 127.0.0.1).
    """

    def __init__(self, workdir: Path, link: ShapedLink) -> None:
        super().__init__(workdir)
        self.link = link
        self.host = f"{link.ns_addr}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self._write_config()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.link.netns,
                    REGISTRY_BINARY,
                    "serve",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"registry in {self.link.netns} exited: {self.access_log()}")
            try:
                conn = http.client.HTTPConnection(self.link.ns_addr, self.port, timeout=1)
                conn.request("GET", "/v2/")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"registry {self.host} not ready after {timeout}s")


class DelayRelay:
    """``python -m bench.netem relay`` as a child process on 127.0.0.1:PORT, stopped by PID."""

    def __init__(self, upstream: str, delay_ms: float) -> None:
        self.upstream = upstream
        self.delay_ms = delay_ms
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "bench.netem",
            "relay",
            "--listen",
            self.host,
            "--upstream",
            self.upstream,
            "--delay-ms",
            str(self.delay_ms),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"delay relay on {self.host} did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------- link probe


@dataclass(frozen=True)
class LinkProbe:
    """What a client sees of a link: round trip and bulk rate (for the physical limit)."""

    rtt_s: float  # a small GET on a fresh connection, best of several
    rate_bps: float  # bits per second of one blob read in full, round trip taken off


def _get(host: str, path: str) -> tuple[float, int]:
    """Seconds and body bytes of one GET on a fresh connection."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        size = 0
        while chunk := response.read(1 << 20):
            size += len(chunk)
    finally:
        conn.close()
    return time.monotonic() - t0, size


def probe(host: str, blob_path: str, pings: int = 5, reads: int = 2) -> LinkProbe:
    """Measure ``host`` (the proxy every setup goes through) with /v2/ pings and full reads of
    ``blob_path`` (``/v2/<repo>/blobs/<digest>``); best of each, as the limit is a best case."""
    rtt = min(_get(host, "/v2/")[0] for _ in range(pings))
    best, size = min(_get(host, blob_path) for _ in range(reads))
    return LinkProbe(rtt, size * 8 / max(best - rtt, 1e-6))


# ------------------------------------------------------------------------------- relay process


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk delivered ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        with contextlib.suppress(ConnectionError):
            await _deliver()

    async def _deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while chunk := await reader.read(1 << 16):
            await queue.put((loop.time() + delay, chunk))
    except ConnectionError:
        pass
    await queue.put((loop.time() + delay, b""))
    with contextlib.suppress(ConnectionError):
        await sender


async def _relay(listen: str, upstream: str, delay: float) -> None:
    up_host, up_port = upstream.rsplit(":", 1)

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, uw, delay), _pipe(ur, cw, delay))
        uw.close()
        cw.close()

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port))
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.netem", description="TCP relay adding latency")
    sub = parser.add_subparsers(dest="cmd", required=True)
    relay = sub.add_parser(
        "relay",
        epilog="Example: python -m bench.netem relay "
        "--listen 127.0.0.1:6000 --upstream 10.213.1.2:5000 --delay-ms 10",
    )
    relay.add_argument("--listen", required=True)
    relay.add_argument("--upstream", required=True)
    relay.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(args.listen, args.upstream, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
