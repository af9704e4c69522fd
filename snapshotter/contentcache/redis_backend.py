"""RedisContentCache: the ContentCache on redis-py's asyncio client, single server or Cluster.

Every call is bounded twice: the socket timeouts of redis-py and an `asyncio.wait_for` around the
whole call (connect included), so a cache that is down, slow or frozen costs a read at most
`timeout_seconds`. Failures feed a CircuitBreaker; while it is open, calls miss at once.
redis-py's own retries are switched off for the same reason: the registry is the retry.

Puts go into a queue bounded in bytes and are written by one background task in pipelined
batches, so a read that filled the cache never waits for Redis; when the queue is full, or the
breaker is open, the put is dropped and counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, RedisError, ResponseError

from snapshotter.contentcache.base import (
    ContentCache,
    ContentCacheHealth,
    ContentCacheStats,
    block_key,
    index_key,
)
from snapshotter.contentcache.breaker import CLOSED, CircuitBreaker
from snapshotter.contentcache.settings import ContentCacheSettings, parse_url
from snapshotter.errors import Unavailable
from snapshotter.telemetry import TELEMETRY

log = logging.getLogger(__name__)
T = TypeVar("T")

#: One pipelined write batch: at most this many values or bytes.
_BATCH_ITEMS = 32
_BATCH_BYTES = 8 << 20
#: Values one MGET may return, in bytes (at least one key per MGET). redis-py's parser keeps
#: the raw bytes of a reply besides the values it returns until the whole reply is parsed, so
#: a read of many blocks goes as one pipeline of small MGETs: one round trip still, and the
#: parser holds one small reply at a time instead of a second copy of every block.
MGET_BYTES = 2 << 20
#: A Redis that refuses writes (full) would refuse every batch: warn at most this often (s).
_REFUSAL_LOG_INTERVAL = 60.0


class RedisContentCache(ContentCache):
    """See the module doc; construct through `open_content_cache()`."""

    def __init__(self, settings: ContentCacheSettings) -> None:
        self.settings = settings
        self.target = parse_url(settings.url, cluster=settings.cluster,
                                tls=settings.tls_configured)
        self.backend = "redis-cluster" if settings.cluster else "redis"
        self.stats = ContentCacheStats()
        self.breaker = CircuitBreaker(
            settings.failure_threshold, settings.cooldown_seconds, on_change=self._state_changed
        )
        self._client: Redis | RedisCluster = self._make_client()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_keys: set[str] = set()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._last_refusal_log = -_REFUSAL_LOG_INTERVAL
        TELEMETRY.breaker_state(self.backend, CLOSED)

    def _make_client(self) -> Redis | RedisCluster:
        s = self.settings
        kwargs: dict[str, Any] = {
            "socket_timeout": max(s.timeout_seconds, s.index_timeout_seconds),
            "socket_connect_timeout": s.connect_timeout_seconds,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": s.max_connections,
        }
        if self.target.scheme == "rediss":
            kwargs["ssl_ca_certs"] = s.tls_ca_file
            if s.tls_cert_file:
                kwargs["ssl_certfile"] = s.tls_cert_file
                kwargs["ssl_keyfile"] = s.tls_key_file
        if s.cluster:
            return RedisCluster.from_url(s.url, **kwargs)
        return Redis.from_url(s.url, **kwargs)

    # --- guarded calls ------------------------------------------------------------------------

    async def _call(
        self, op: str, fn: Callable[[], Awaitable[T]], default: T, timeout: float | None = None
    ) -> T:
        """Run `fn()` if the breaker allows, within the bound; any failure returns `default`."""
        if self._closed or not self.breaker.allow():
            self.stats.skipped += 1
            TELEMETRY.contentcache_skipped(op)
            return default
        limit = self.settings.timeout_seconds if timeout is None else timeout
        try:
            result = await asyncio.wait_for(fn(), limit)
        except TimeoutError:
            self._failed(op, "timeout", f"{op} timed out after {limit:g}s")
            return default
        except ResponseError as exc:
            if isinstance(exc, ClusterError):
                self._failed(op, "error", f"{op}: {type(exc).__name__}: {exc}")
            else:
                self._refused(op, exc)
            return default
        except Exception as exc:  # any failure of an optional tier is a miss, never an error
            self._failed(op, "error", f"{op}: {type(exc).__name__}: {exc}")
            return default
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return result

    def _failed(self, op: str, kind: str, message: str) -> None:
        if kind == "timeout":
            self.stats.timeouts += 1
        else:
            self.stats.errors += 1
        TELEMETRY.contentcache_error(op, kind)
        was_closed = self.breaker.state == CLOSED
        self.breaker.failure(message)
        level = logging.WARNING if was_closed and self.breaker.state != CLOSED else logging.DEBUG
        log.log(level, "content cache %s: %s (breaker %s)", self.target.display, message,
                self.breaker.state)

    def _refused(self, op: str, exc: ResponseError) -> None:
        """The server answered promptly with an error (e.g. OOM under `noeviction`): count and
        log it, but it says nothing about latency, so it neither opens nor holds the breaker."""
        self.stats.errors += 1
        TELEMETRY.contentcache_error(op, "refused")
        self.breaker.success()
        now = time.monotonic()
        quiet = now - self._last_refusal_log < _REFUSAL_LOG_INTERVAL
        if not quiet:
            self._last_refusal_log = now
        log.log(logging.DEBUG if quiet else logging.WARNING, "content cache %s: %s refused: %s",
                self.target.display, op, exc)

    def _state_changed(self, state: str) -> None:
        TELEMETRY.breaker_state(self.backend, state)
        log.info("content cache %s: breaker %s", self.target.display, state)

    # --- reads --------------------------------------------------------------------------------

    async def get_block(self, layer_digest: str, block: int) -> bytes | None:
        return (await self.get_blocks(layer_digest, [block]))[0]

    async def get_blocks(self, layer_digest: str, blocks: Sequence[int]) -> list[bytes | None]:
        if not blocks:
            return []
        keys = [block_key(layer_digest, b, self.block_size) for b in blocks]
        misses: list[bytes | None] = [None] * len(keys)
        values = await self._call("get", lambda: self._mget(keys), misses)
        self._count_gets(values)
        return values

    async def _mget(self, keys: list[str]) -> list[bytes | None]:
        if isinstance(self._client, RedisCluster):
            # Keys of one layer live in different slots on purpose (no hash tag): one pipelined
            # MGET per slot, sent to each master in parallel.
            values = await self._client.mget_nonatomic(keys)
        else:
            values = await self._mget_grouped(self._client, keys)
        return [bytes(v) if v is not None else None for v in values]

    async def _mget_grouped(self, client: Redis, keys: list[str]) -> list[Any]:
        """MGET `keys` in groups of at most MGET_BYTES of values, pipelined (see MGET_BYTES)."""
        per = max(1, MGET_BYTES // self.block_size)
        if len(keys) <= per:
            return list(await client.mget(keys))
        async with client.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), per):
                pipe.mget(keys[i : i + per])
            groups = await pipe.execute()
        return [v for group in groups for v in group]

    def _count_gets(self, values: list[bytes | None]) -> None:
        hits = [v for v in values if v is not None]
        nbytes = sum(len(v) for v in hits)
        self.stats.gets += len(values)
        self.stats.hits += len(hits)
        self.stats.misses += len(values) - len(hits)
        self.stats.bytes_read += nbytes
        if hits:
            TELEMETRY.tier_hit("contentcache", nbytes, len(hits))
        if len(values) > len(hits):
            TELEMETRY.tier_miss("contentcache", len(values) - len(hits))

    async def exists(self, layer_digest: str, block: int) -> bool:
        key = block_key(layer_digest, block, self.block_size)

        async def run() -> bool:
            return bool(await self._client.exists(key))

        return await self._call("exists", run, False)

    async def get_index(self, layer_digest: str) -> bytes | None:
        key = index_key(layer_digest)

        async def run() -> bytes | None:
            value = await self._client.get(key)
            return value if isinstance(value, bytes) else None

        data = await self._call("get_index", run, None, self.settings.index_timeout_seconds)
        TELEMETRY.index_fetch("contentcache", "hit" if data is not None else "miss")
        return data

    # --- writes -------------------------------------------------------------------------------

    async def put_index(self, layer_digest: str, data: bytes) -> bool:
        key = index_key(layer_digest)

        async def run() -> bool:
            return bool(await self._client.set(key, data, ex=self._ttl()))

        return await self._call("put_index", run, False, self.settings.index_timeout_seconds)

    async def put_block(self, layer_digest: str, block: int, data: bytes) -> None:
        key = block_key(layer_digest, block, self.block_size)
        if len(data) > self.settings.max_value_bytes:
            self._dropped("dropped_too_large")
        elif self._closed or self.breaker.retry_in() > 0:
            self._dropped("dropped_open")
        elif key in self._queued_keys:
            return
        elif self._queued_bytes + len(data) > self.settings.put_queue_bytes:
            self._dropped("dropped_full")
        else:
            self._queue.append((key, bytes(data)))
            self._queued_keys.add(key)
            self._queued_bytes += len(data)
            self.stats.puts_queued += 1
            self._idle.clear()
            self._wake.set()
            self._ensure_worker()

    def _dropped(self, outcome: str) -> None:
        setattr(self.stats, f"puts_{outcome}", getattr(self.stats, f"puts_{outcome}") + 1)
        TELEMETRY.contentcache_put(outcome)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        """Background task: write queued blocks in pipelined batches until closed."""
        while not self._closed:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.breaker.retry_in() > 0:
                self._drop_queue()
                continue
            batch = self._take_batch()
            ok = await self._call("put", functools.partial(self._write, batch), False,
                                  self.settings.index_timeout_seconds)
            self._settle(batch, ok)

    def _drop_queue(self) -> None:
        """The breaker is open: queued values would wait a whole cool-down, so free them now."""
        for _ in range(len(self._queue)):
            self._dropped("dropped_open")
        self._queue.clear()
        self._queued_keys.clear()
        self._queued_bytes = 0

    def _take_batch(self) -> list[tuple[str, bytes]]:
        batch: list[tuple[str, bytes]] = []
        size = 0
        while self._queue and len(batch) < _BATCH_ITEMS and (not batch or size < _BATCH_BYTES):
            key, value = self._queue.popleft()
            batch.append((key, value))
            size += len(value)
        return batch

    async def _write(self, batch: list[tuple[str, bytes]]) -> bool:
        pipe = self._client.pipeline(transaction=False)
        for key, value in batch:
            pipe.set(key, value, ex=self._ttl())
        await pipe.execute()
        return True

    def _settle(self, batch: list[tuple[str, bytes]], ok: bool) -> None:
        nbytes = sum(len(v) for _, v in batch)
        for key, _ in batch:
            self._queued_keys.discard(key)
        self._queued_bytes -= nbytes
        if ok:
            self.stats.puts_written += len(batch)
            self.stats.bytes_written += nbytes
            TELEMETRY.contentcache_put("written", len(batch))
        else:
            self.stats.puts_failed += len(batch)
            TELEMETRY.contentcache_put("failed", len(batch))

    def _ttl(self) -> int | None:
        return self.settings.ttl_seconds or None

    async def flush(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- state --------------------------------------------------------------------------------

    def health(self) -> ContentCacheHealth:
        b = self.breaker
        return ContentCacheHealth(
            backend=self.backend,
            target=self.target.display,
            state=b.state,
            healthy=b.state == CLOSED and not self._closed,
            consecutive_failures=b.failures,
            last_error=b.last_error,
            retry_in_seconds=round(b.retry_in(), 3),
            queued_puts=len(self._queue),
            queued_bytes=self._queued_bytes,
            stats=dataclasses.replace(self.stats),
        )

    async def check(self) -> None:
        """PING within connect + operation timeout; Unavailable names the cache and the cause."""
        limit = self.settings.connect_timeout_seconds + self.settings.timeout_seconds
        try:
            await asyncio.wait_for(self._client.ping(), limit)
        except TimeoutError:
            raise Unavailable(
                f"content cache {self.target.display}: no answer within {limit:g}s"
            ) from None
        except Exception as exc:
            raise Unavailable(f"content cache {self.target.display}: {exc}") from None

    async def close(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        self._wake.set()
        self._idle.set()
        try:
            await asyncio.wait_for(self._client.aclose(), self.settings.connect_timeout_seconds)
        except (TimeoutError, RedisError, OSError) as exc:
            log.debug("content cache %s: close: %s", self.target.display, exc)
