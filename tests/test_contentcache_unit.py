"""ContentCache pieces that need no server: keys, settings/URL validation, breaker, none cache."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapshotter.cache import BLOCK_SIZE
from snapshotter.config import ContentCacheConfig
from snapshotter.contentcache import (
    CircuitBreaker,
    ContentCacheSettings,
    NoContentCache,
    block_key,
    digest_hex,
    index_key,
    open_content_cache,
    parse_url,
)
from snapshotter.contentcache.redis_backend import RedisContentCache
from snapshotter.errors import InvalidArgument

HEX = "0f" * 32
DIGEST = f"sha256:{HEX}"


def test_keys_are_content_addressed_and_carry_the_block_size() -> None:
    assert block_key(DIGEST, 7) == f"clip:v1:{HEX}:b{BLOCK_SIZE}:7"
    assert block_key(HEX, 7, 65536) == f"clip:v1:{HEX}:b65536:7"
    assert index_key(DIGEST) == f"clip:v1:{HEX}:index"
    assert digest_hex("sha512:" + "ab" * 64) == "ab" * 64


@pytest.mark.parametrize("bad", ["", "sha256:", "sha256:XYZ", "md5:" + "00" * 16, "../etc"])
def test_bad_digest_is_named(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="not a layer digest"):
        block_key(bad, 0)


def test_negative_block_rejected() -> None:
    with pytest.raises(InvalidArgument, match="negative block"):
        block_key(DIGEST, -1)


def test_empty_url_opens_the_none_cache_and_it_always_misses() -> None:
    cache = open_content_cache(ContentCacheConfig())
    assert isinstance(cache, NoContentCache)

    async def run() -> None:
        assert await cache.get_block(DIGEST, 0) is None
        assert await cache.get_blocks(DIGEST, [0, 1, 2]) == [None, None, None]
        await cache.put_block(DIGEST, 0, b"x")
        assert not await cache.exists(DIGEST, 0)
        assert await cache.get_index(DIGEST) is None
        assert not await cache.put_index(DIGEST, b"i")
        await cache.check()
        assert await cache.flush()
        await cache.close()

    asyncio.run(run())
    health = cache.health()
    assert (health.backend, health.state, health.healthy) == ("none", "closed", True)


def test_config_section_with_only_url_gets_defaults() -> None:
    settings = ContentCacheSettings.from_section(ContentCacheConfig(url="redis://h:1/2"))
    assert settings.url == "redis://h:1/2"
    assert settings.timeout_seconds == 0.2 and settings.failure_threshold == 3
    assert not settings.cluster and settings.ttl_seconds == 0


def test_factory_builds_redis_without_connecting() -> None:
    async def run() -> None:
        cache = open_content_cache({"url": "redis://:secret@127.0.0.1:1/4"})
        assert isinstance(cache, RedisContentCache)
        assert cache.health().target == "redis://127.0.0.1:1/4"
        assert "secret" not in repr(cache.health())
        await cache.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"url": "http://h:1"}, "content_cache.url: http://h:1: expected redis://"),
        ({"url": "redis://h:1/x"}, "database 'x' is not a number"),
        ({"url": "redis://h:99999/0"}, "content_cache.url"),
        ({"url": "redis:///0"}, "missing host"),
        ({"url": "redis://h:1/2", "cluster": True}, "Redis Cluster only has database 0"),
        ({"url": "unix:///tmp/r.sock", "cluster": True}, "cannot address a Redis Cluster"),
        ({"url": "rediss://:pw@h:1/0"}, "rediss:// needs content_cache.tls_ca_file"),
        ({"url": "redis://h", "timeout_seconds": 0}, "content_cache.timeout_seconds"),
        ({"url": "redis://h", "failure_threshold": 0}, "content_cache.failure_threshold"),
        ({"url": "redis://h", "ttl_seconds": -1}, "content_cache.ttl_seconds"),
        ({"url": "redis://h", "tls_ca_file": "/nonexistent/ca.pem"}, "no such file"),
    ],
)
def test_bad_settings_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")) as info:
        open_content_cache(section)
    assert "pw" not in str(info.value)


def test_cert_without_key_rejected(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(InvalidArgument, match="tls_cert_file and tls_key_file go together"):
        ContentCacheSettings.from_section({"url": "redis://h", "tls_cert_file": str(cert)})


def test_parse_url_parts() -> None:
    target = parse_url("redis://user:pw@cache.example:6380/3")
    assert (target.host, target.port, target.db) == ("cache.example", 6380, 3)
    assert target.display == "redis://cache.example:6380/3"
    assert parse_url("redis://h").port == 6379
    assert parse_url("unix:///run/redis.sock").display == "unix:///run/redis.sock"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_then_half_opens_with_one_probe() -> None:
    clock = FakeClock()
    changes: list[str] = []
    breaker = CircuitBreaker(3, 5.0, on_change=changes.append, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure("boom")
    assert breaker.state == "closed"
    assert breaker.allow()
    breaker.failure("boom")
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_in() == 5.0
    clock.now += 5.0
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # only one probe at a time
    breaker.failure("still down")
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.allow()
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_breaker_success_resets_the_failure_streak() -> None:
    breaker = CircuitBreaker(2, 1.0, clock=FakeClock())
    breaker.failure("a")
    breaker.success()
    breaker.failure("b")
    assert breaker.state == "closed"


def test_abandoned_probe_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.failure("x")
    clock.now += 1.0
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()


def test_breaker_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
