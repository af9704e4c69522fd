"""A counting reverse proxy in front of a registry, to measure and break what the client sees.

Runs an aiohttp server on its own event loop in a background thread so synchronous tests (that
drive containerd and ``ctr``) can use it. It counts requests and response-body bytes per blob
digest and in total, and can simulate an outage: ``pause("refuse")`` closes the listening
socket (connection refused), ``pause("hang")`` accepts requests but never answers until
``resume()``, ``pause("error")`` answers 503, ``pause("notfound")`` answers 404 (a mirror
that lacks everything).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from types import TracebackType

import aiohttp
from aiohttp import web

from integration.harness.registry import free_port

BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
    )
)


class CountingProxy:
    """Reverse proxy on ``host`` ("127.0.0.1:PORT") forwarding to ``upstream`` (host:port)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.bytes_by_digest: Counter[str] = Counter()
        self.requests_by_digest: Counter[str] = Counter()
        self.total_bytes = 0
        self.total_requests = 0
        self.request_log: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._connections: set[object] = set()  # client (ip, port) pairs
        self._lock = threading.Lock()
        self._mode: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resumed: asyncio.Event | None = None

    # ------------------------------------------------------------ lifecycle (sync API)

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="counting-proxy", daemon=True)
        self._thread.start()
        self._call(self._astart())
        self._call(self._listen())

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._astop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def pause(self, mode: str = "refuse") -> None:
        """Simulate an outage: "refuse" (port closed), "hang" (never answers), "error" (503),
        "notfound" (404 for every request)."""
        if mode not in ("refuse", "hang", "error", "notfound"):
            raise ValueError(f"unknown outage mode {mode!r}")
        self._mode = mode
        if mode == "refuse":
            self._call(self._unlisten())

    def resume(self) -> None:
        """End the outage; hanging requests are then forwarded normally."""
        mode, self._mode = self._mode, None
        if mode == "refuse":
            self._call(self._listen())
        assert self._loop is not None and self._resumed is not None
        self._loop.call_soon_threadsafe(self._resumed.set)

    def reset(self) -> None:
        """Forget all counts (e.g. after a warm-up phase)."""
        with self._lock:
            self.bytes_by_digest.clear()
            self.requests_by_digest.clear()
            self.total_bytes = 0
            self.total_requests = 0
            self.request_log.clear()
            self._connections.clear()

    @property
    def connections(self) -> int:
        """Distinct client connections that carried requests (to check connection reuse)."""
        with self._lock:
            return len(self._connections)

    def blob_bytes(self, digest: str) -> int:
        with self._lock:
            return self.bytes_by_digest[digest]

    def blob_requests(self, digest: str) -> int:
        with self._lock:
            return self.requests_by_digest[digest]

    def __enter__(self) -> CountingProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ event-loop side

    def _call(self, coro: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    async def _astart(self) -> None:
        self._resumed = asyncio.Event()
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _listen(self) -> None:
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def _unlisten(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _astop(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
        await self._unlisten()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._mode == "hang":
            assert self._resumed is not None
            self._resumed.clear()
            await self._resumed.wait()
        if self._mode == "error":
            return web.Response(status=503, text="outage simulated by CountingProxy")
        if self._mode == "notfound":
            with self._lock:
                self.total_requests += 1
            return web.Response(status=404, text="not on this mirror")
        match = BLOB_PATH.match(request.path)
        digest = match.group(1) if match else None
        with self._lock:
            self.total_requests += 1
            if request.transport is not None:
                self._connections.add(request.transport.get_extra_info("peername"))
            self.request_log.append((request.method, request.path, request.headers.get("Range")))
            if digest and request.method == "GET":
                self.requests_by_digest[digest] += 1
        return await self._forward(request, digest)

    async def _forward(self, request: web.Request, digest: str | None) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() if request.can_read_body else None
        url = f"http://{self.upstream}{request.rel_url}"
        async with self._session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None and request.method != "HEAD":
                response.content_length = upstream.content_length
            elif request.method == "HEAD" and "Content-Length" in upstream.headers:
                response.headers["Content-Length"] = upstream.headers["Content-Length"]
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                with self._lock:
                    self.total_bytes += len(chunk)
                    if digest:
                        self.bytes_by_digest[digest] += len(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response
