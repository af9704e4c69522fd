"""RedisContentCache against real redis-server processes started here (single and Cluster).

Covers round trips, batched gets as one round trip, indexes, a server stopped and restarted
mid-run, a frozen (SIGSTOP) and a busy (DEBUG SLEEP) server, put-queue overflow, TLS, and the
contentcache counters on the real /metrics endpoint. The bounds asserted are correctness bounds
(a call must come back as a miss instead of hanging), generous enough for a loaded 2-core box.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from integration.harness.redis import RedisClusterServers, RedisServer
from snapshotter.cache import BLOCK_SIZE
from snapshotter.contentcache import ContentCacheSettings, block_key, open_content_cache
from snapshotter.contentcache.redis_backend import MGET_BYTES, RedisContentCache
from snapshotter.errors import InvalidArgument, Unavailable
from snapshotter.telemetry import TELEMETRY, scrape

T = TypeVar("T")
LAYER = "sha256:" + "c3" * 32
OTHER = "sha256:" + "d4" * 32
MIB = 1 << 20
#: Slack over the configured per-call timeout that a miss may take on a loaded machine.
SLACK = 1.0


def block(n: int, size: int = MIB) -> bytes:
    return bytes([n % 251]) * size


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def cache_for(url: str, **overrides: Any) -> RedisContentCache:
    settings = ContentCacheSettings.from_section({"url": url, **overrides})
    cache = open_content_cache(settings)
    assert isinstance(cache, RedisContentCache)
    return cache


class FakeClock:
    """The breaker's clock, advanced by the test instead of waited for."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def with_clock(cache: RedisContentCache) -> FakeClock:
    clock = FakeClock()
    cache.breaker.clock = clock
    return clock


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as c:
        yield c


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server this test may stop, freeze or restart."""
    with RedisServer() as s:
        yield s


async def round_trip(cache: RedisContentCache) -> None:
    await cache.check()
    for n in range(6):
        await cache.put_block(LAYER, n, block(n))
    await cache.put_block(LAYER, 6, block(6, 1234))  # a short last block
    assert await cache.flush(10)
    assert await cache.get_block(LAYER, 2) == block(2)
    assert await cache.get_block(LAYER, 6) == block(6, 1234)
    assert await cache.get_block(OTHER, 2) is None
    got = await cache.get_blocks(LAYER, [0, 5, 9, 6, 3])
    assert got == [block(0), block(5), None, block(6, 1234), block(3)]
    assert await cache.get_blocks(LAYER, []) == []
    assert await cache.exists(LAYER, 4)
    assert not await cache.exists(LAYER, 40)
    assert await cache.get_index(LAYER) is None
    assert await cache.put_index(LAYER, b"index-bytes" * 1000)
    assert await cache.get_index(LAYER) == b"index-bytes" * 1000
    health = cache.health()
    assert health.healthy and health.state == "closed"
    assert health.stats.puts_written == 7 and health.stats.hits == 6
    await cache.close()


def test_round_trip_single(server: RedisServer) -> None:
    run(round_trip(cache_for(server.url(db=1))))
    assert server.cli("-n", "1", "STRLEN", block_key(LAYER, 2)).strip() == str(MIB)
    assert server.cli("-n", "0", "EXISTS", block_key(LAYER, 2)).strip() == "0"


def test_round_trip_cluster_spreads_a_layer_over_masters(cluster: RedisClusterServers) -> None:
    run(round_trip(cache_for(cluster.url(), cluster=True)))
    holders = {cluster.node_for(block_key(LAYER, n)).port for n in range(6)}
    assert len(holders) > 1


def test_batched_get_is_pipelined_mgets_of_bounded_size(server: RedisServer) -> None:
    """10 keys of blocks: MGETs of MGET_BYTES (8 keys of 256 KiB) each, in one pipeline,
    answers in key order; a get that fits one MGET is a single MGET."""
    per = MGET_BYTES // BLOCK_SIZE
    assert 1 < per < 10

    async def go() -> None:
        cache = cache_for(server.url(db=2))
        for n in range(8):
            await cache.put_block(LAYER, n, block(n, 4096))
        assert await cache.flush(10)
        server.cli("CONFIG", "RESETSTAT")
        values = await cache.get_blocks(LAYER, list(range(10)))
        assert values[:8] == [block(n, 4096) for n in range(8)] and values[8:] == [None, None]
        stats = server.cli("INFO", "commandstats")
        assert f"cmdstat_mget:calls={-(-10 // per)}," in stats
        server.cli("CONFIG", "RESETSTAT")
        assert await cache.get_blocks(LAYER, [7, 1][:per]) == [block(7, 4096), block(1, 4096)][:per]
        await cache.close()

    run(go())
    stats = server.cli("INFO", "commandstats")
    assert "cmdstat_mget:calls=1," in stats
    assert "cmdstat_get:" not in stats


def test_password_in_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", password="s3cret") as s:
        run(round_trip(cache_for(s.url())))

        async def wrong() -> None:
            cache = cache_for(f"redis://:nope@127.0.0.1:{s.port}/0")
            with pytest.raises(Unavailable) as info:
                await cache.check()
            assert f"127.0.0.1:{s.port}" in str(info.value) and "nope" not in str(info.value)
            assert await cache.get_block(LAYER, 0) is None
            assert "AuthenticationError" in cache.health().last_error
            await cache.close()

        run(wrong())


def test_ttl_is_applied(server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(server.url(db=3), ttl_seconds=600)
        await cache.put_block(LAYER, 0, b"x")
        assert await cache.flush(10)
        await cache.close()

    run(go())
    assert 0 < int(server.cli("-n", "3", "TTL", block_key(LAYER, 0))) <= 600


def test_stopped_server_misses_within_bound_opens_and_recovers(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), timeout_seconds=0.1, cooldown_seconds=1.0)
        await cache.put_block(LAYER, 0, block(0))
        assert await cache.flush(10)
        assert await cache.get_block(LAYER, 0) == block(0)
        clock = with_clock(cache)
        own_server.stop()
        for _ in range(3):
            assert await cache.get_block(LAYER, 0) is None
        health = cache.health()
        assert health.state == "open" and not health.healthy
        assert health.consecutive_failures == 3 and health.last_error
        skipped = health.stats.skipped
        assert await cache.get_blocks(LAYER, [0, 1]) == [None, None]
        assert cache.health().stats.skipped == skipped + 1  # missed at once: not even tried
        await cache.put_block(LAYER, 1, block(1))
        assert cache.health().stats.puts_dropped_open == 1
        own_server.start()
        clock.advance(cache.health().retry_in_seconds)
        assert await cache.get_block(LAYER, 0) is None  # probe: fresh server, no data
        assert cache.health().state == "closed"
        await cache.put_block(LAYER, 0, block(0))
        assert await cache.flush(10)
        assert await cache.get_block(LAYER, 0) == block(0)
        await cache.close()

    run(go())


def test_failed_probe_reopens(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), failure_threshold=1, cooldown_seconds=0.3)
        clock = with_clock(cache)
        own_server.stop()
        assert await cache.get_block(LAYER, 0) is None
        assert cache.health().state == "open"
        clock.advance(0.35)
        assert await cache.exists(LAYER, 0) is False
        health = cache.health()
        assert health.state == "open" and health.retry_in_seconds > 0.1
        await cache.close()

    run(go())


def test_frozen_server_is_bounded_and_breaker_opens(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), timeout_seconds=0.15, cooldown_seconds=0.5)
        clock = with_clock(cache)
        await cache.put_block(LAYER, 0, block(0))
        assert await cache.flush(10)
        own_server.pause()
        try:
            for _ in range(3):  # each call ends at its own bound, as a miss
                assert await cache.get_blocks(LAYER, [0]) == [None]
            health = cache.health()
            assert health.state == "open" and health.stats.timeouts == 3
            assert "timed out after 0.15s" in health.last_error
            assert await cache.get_index(LAYER) is None
            assert cache.health().stats.timeouts == 3  # skipped, not waited for
        finally:
            own_server.resume()
        clock.advance(0.55)
        assert await cache.get_block(LAYER, 0) == block(0)
        assert cache.health().state == "closed"
        await cache.close()

    run(go())


def test_busy_server_debug_sleep_is_bounded(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), timeout_seconds=0.1)
        await cache.put_block(LAYER, 0, block(0, 100))
        assert await cache.flush(10)
        cli = ["redis-cli", "-p", str(own_server.port)]
        # the server stops serving clients for 10 s; once OK is back, it is in effect
        paused = subprocess.run([*cli, "CLIENT", "PAUSE", "10000"], capture_output=True)
        assert paused.stdout.strip() == b"OK"
        try:
            assert await cache.get_block(LAYER, 0) is None  # a miss at the 0.1 s bound
            assert cache.health().stats.timeouts == 1
        finally:
            subprocess.run([*cli, "CLIENT", "UNPAUSE"], check=True, capture_output=True)
        assert await cache.get_block(LAYER, 0) == block(0, 100)
        await cache.close()

    run(go())


def test_put_queue_overflow_is_dropped_and_counted(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), put_queue_bytes=3 * MIB, max_value_bytes=2 * MIB,
                          timeout_seconds=0.1, index_timeout_seconds=0.3)
        own_server.pause()
        try:
            for n in range(8):  # queued while Redis is frozen: puts never wait for it
                await cache.put_block(LAYER, n, block(n))
            await cache.put_block(LAYER, 99, block(0, 3 * MIB))
            health = cache.health()
            assert health.queued_bytes <= 3 * MIB
            assert health.stats.puts_dropped_full >= 5
            assert health.stats.puts_dropped_too_large == 1
        finally:
            own_server.resume()
        await cache.close()

    run(go())


def test_queue_is_freed_when_the_breaker_opens(own_server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(own_server.url(), failure_threshold=1, cooldown_seconds=30,
                          index_timeout_seconds=0.2)
        own_server.pause()
        try:
            for n in range(40):  # more than one pipelined batch
                await cache.put_block(LAYER, n, block(n, 1000))
            assert await cache.flush(0.2 + SLACK)
            health = cache.health()
            assert health.state == "open" and health.queued_puts == 0
            assert health.stats.puts_failed == 32  # the batch that timed out
            assert health.stats.puts_dropped_open == 8  # the rest, freed at once
        finally:
            own_server.resume()
        await cache.close()

    run(go())


def test_refused_writes_do_not_open_the_breaker(own_server: RedisServer) -> None:
    """A full Redis under `noeviction` refuses writes at once; reads must keep working."""

    async def go() -> None:
        cache = cache_for(own_server.url(), failure_threshold=1)
        await cache.put_block(LAYER, 0, block(0, 1000))
        assert await cache.flush(10)
        own_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        own_server.cli("CONFIG", "SET", "maxmemory", "1")
        await cache.put_block(LAYER, 1, block(1))
        assert await cache.flush(10)
        health = cache.health()
        assert health.stats.puts_failed == 1 and health.state == "closed"
        assert await cache.get_block(LAYER, 0) == block(0, 1000)
        await cache.close()

    run(go())


def test_duplicate_puts_are_queued_once(server: RedisServer) -> None:
    async def go() -> None:
        cache = cache_for(server.url(db=4))
        for _ in range(5):
            await cache.put_block(LAYER, 0, block(0, 10))
        assert await cache.flush(10)
        assert cache.health().stats.puts_queued == 1
        await cache.close()

    run(go())


def test_cluster_master_down_then_back(cluster: RedisClusterServers) -> None:
    """Runs last among the cluster tests: it restarts one master of the module's cluster."""

    async def go() -> None:
        cache = cache_for(cluster.url(), cluster=True, timeout_seconds=0.2, cooldown_seconds=0.5)
        for n in range(6):
            await cache.put_block(OTHER, n, block(n, 100))
        assert await cache.flush(10)
        victim = cluster.node_for(block_key(OTHER, 0))
        victim.stop()
        for _ in range(3):
            assert await cache.get_blocks(OTHER, list(range(6))) == [None] * 6
        assert cache.health().state == "open"
        victim.start()  # rejoins with its nodes.conf; its keys are gone (no persistence)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            values = await cache.get_blocks(OTHER, list(range(6)))
            if cache.health().state == "closed" and any(v is not None for v in values):
                break
        assert cache.health().state == "closed", cache.health()
        await cache.put_block(OTHER, 0, block(0, 100))
        assert await cache.flush(10)
        assert await cache.get_block(OTHER, 0) == block(0, 100)
        await cache.close()

    run(go())


def test_rediss_without_ca_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match=r"rediss:// needs content_cache\.tls_ca_file"):
        open_content_cache({"url": "rediss://127.0.0.1:6380/0"})


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca_and_cert(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", "2", "-subj", f"/CN={name} test CA")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def test_rediss_with_ca_round_trip_and_wrong_ca_fails(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path / "good", "good")
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "other")
    with RedisServer(tmp_path / "redis", tls=(ca, cert, key)) as s:
        assert s.url().startswith("rediss://")
        run(round_trip(cache_for(s.url(), tls_ca_file=str(ca))))

        async def wrong_ca() -> None:
            cache = cache_for(s.url(), tls_ca_file=str(other_ca))
            with pytest.raises(Unavailable, match="certificate verify failed"):
                await cache.check()
            assert await cache.get_block(LAYER, 0) is None
            await cache.close()

        run(wrong_ca())

        async def plain_against_tls() -> None:
            cache = cache_for(f"redis://127.0.0.1:{s.port}/0", timeout_seconds=0.3)
            with pytest.raises(Unavailable, match=f"content cache redis://127.0.0.1:{s.port}/0"):
                await cache.check()
            await cache.close()

        run(plain_against_tls())


def test_contentcache_metrics_on_the_endpoint(own_server: RedisServer) -> None:
    host, port = TELEMETRY.start_metrics_server("127.0.0.1:0")
    try:
        before = _metrics(host, port)

        async def go() -> None:
            cache = cache_for(own_server.url(), failure_threshold=1, cooldown_seconds=30)
            await cache.put_block(LAYER, 0, block(0))
            await cache.put_block(LAYER, 1, block(1))
            assert await cache.flush(10)
            await cache.get_blocks(LAYER, [0, 1, 2])
            own_server.stop()
            await cache.get_block(LAYER, 0)
            await cache.get_block(LAYER, 0)
            await cache.close()

        run(go())
        after = _metrics(host, port)
    finally:
        TELEMETRY.stop_metrics_server()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, labels) - _value(before, name, labels)

    assert delta("clip_tier_hits_total", tier="contentcache") == 2
    assert delta("clip_tier_read_bytes_total", tier="contentcache") == 2 * MIB
    assert delta("clip_tier_misses_total", tier="contentcache") >= 1
    assert delta("clip_contentcache_puts_total", outcome="written") == 2
    assert delta("clip_contentcache_errors_total", op="get") == 1
    assert delta("clip_contentcache_skipped_total", op="get") == 1
    assert _value(after, "clip_contentcache_breaker_state", {"backend": "redis"}) == 2


def _metrics(host: str, port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return dict(scrape(response.read().decode()))


def _value(values: dict[str, float], name: str, labels: dict[str, str]) -> float:
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def test_harness_cleans_up(tmp_path: Path) -> None:
    s = RedisServer()
    s.start()
    pid, workdir = s.pid, s.workdir
    assert pid is not None
    s.close()
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
