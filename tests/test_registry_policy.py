"""The registry client's one retry policy on a fake clock: deadlines, first-byte timeouts,
mirror handover, circuit breakers and the bounds docs/operations.md derives from the config.

A fake aiohttp session stands in for the network: a "hung" host accepts the request and never
answers, so the request ends when its first-byte timeout would fire, which the fake session
charges to the fake clock. No real time passes and nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from yarl import URL

from snapshotter.config import RegistryConfig, RegistrySettings
from snapshotter.errors import NotFound, Unavailable
from snapshotter.registry import RegistryClient, RetryPolicy
from snapshotter.registry.policy import Deadline

T = TypeVar("T")
DIGEST = "sha256:" + "ab" * 32
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
IMAGE = "reg.test:5000/app:v1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.status = status
        self.reason = "fake"
        self.headers = headers or {}
        self.content_length = len(body)
        self.url = URL("http://x/")
        self._body = body

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        pass


@dataclass
class FakeSession:
    """Hosts behave as told: "hang" (never answer), "404", or serve MANIFEST / blob bytes."""

    clock: FakeClock
    behaviour: dict[str, str]
    calls: list[tuple[str, str, aiohttp.ClientTimeout]] = field(default_factory=list)
    closed: bool = False

    async def request(self, method: str, url: URL, **kw: Any) -> FakeResponse:
        timeout: aiohttp.ClientTimeout = kw["timeout"]
        self.calls.append((method, url.raw_authority, timeout))
        mode = self.behaviour.get(url.raw_authority, "ok")
        if mode == "hang":
            assert timeout.sock_read is not None
            self.clock.now += timeout.sock_read  # connected, then no first byte in time
            raise TimeoutError
        if mode == "404":
            return FakeResponse(404)
        if "/manifests/" in url.path:
            ctype = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
            return FakeResponse(200, MANIFEST, ctype)
        return FakeResponse(200, b"")

    def hosts_called(self) -> list[str]:
        return [host for _, host, _ in self.calls]


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)


def client(
    behaviour: dict[str, str], mirrors: tuple[str, ...] = (), **kw: Any
) -> tuple[RegistryClient, FakeSession, FakeClock]:
    clock = FakeClock()
    session = FakeSession(clock, behaviour)
    hosts = {"reg.test:5000": RegistryConfig(plain_http=True, mirrors=mirrors)}
    c = RegistryClient(
        hosts,
        Path("/nonexistent"),
        session=session,  # type: ignore[arg-type]
        clock=clock,
        sleep=clock.sleep,
        **kw,
    )
    return c, session, clock


def test_hung_registry_blob_exists_fails_at_the_operation_deadline_naming_image_and_layer() -> (
    None
):
    c, session, clock = client({"reg.test:5000": "hang"})
    start = clock.now
    with pytest.raises(Unavailable) as err:
        run(c.blob_exists(IMAGE, DIGEST))
    message = str(err.value)
    assert message.startswith(f"image {IMAGE}: blob {DIGEST} failed after 3 attempts")
    assert "reg.test:5000: timed out" in message and "(deadline 12.0s)" in message
    assert clock.now - start <= RetryPolicy().operation_timeout
    timeouts = [t for _, _, t in session.calls]
    assert len(timeouts) == 3
    assert all(t.sock_connect == 2.0 for t in timeouts)
    assert [t.sock_read for t in timeouts[:2]] == [3.0, 3.0]
    assert timeouts[2].sock_read is not None and timeouts[2].sock_read <= 3.0
    assert all(t.total is not None and t.total <= 12.0 for t in timeouts)
    assert c.breaker_state("reg.test:5000") == "open"


def test_open_breaker_fails_the_next_operations_at_once_then_recovers_after_cooldown() -> None:
    c, session, clock = client({"reg.test:5000": "hang"})
    with pytest.raises(Unavailable):
        run(c.blob_exists(IMAGE, DIGEST))
    calls, before = len(session.calls), clock.now
    with pytest.raises(Unavailable, match=f"image {IMAGE}: .*reg.test:5000 is failing"):
        run(c.resolve(IMAGE))
    with pytest.raises(Unavailable, match=f"blob {DIGEST}: reg.test:5000 is failing"):
        run(c.blob_exists(IMAGE, DIGEST))
    assert len(session.calls) == calls and clock.now == before  # nothing sent, no time spent
    session.behaviour["reg.test:5000"] = "ok"
    clock.now += RetryPolicy().cooldown  # half-open: one probe goes through
    assert run(c.blob_exists(IMAGE, DIGEST)) is True
    assert c.breaker_state("reg.test:5000") == "closed"


def test_callers_deadline_is_honoured_and_clips_request_timeouts() -> None:
    c, session, clock = client({"reg.test:5000": "hang"})
    deadline = clock.now + 3.0
    with pytest.raises(Unavailable, match=r"range 0\+10 failed after 1 attempts"):
        run(c.read_range(IMAGE, DIGEST, 0, 10, deadline=deadline))
    assert clock.now <= deadline
    (_, _, timeout), *_ = session.calls
    assert timeout.sock_read == 3.0 and timeout.total == 3.0


def test_hung_mirror_hands_over_at_once_and_is_skipped_once_its_breaker_opens() -> None:
    c, session, clock = client({"mirror.test": "hang"}, mirrors=("http://mirror.test",))
    start = clock.now
    for _ in range(3):
        assert run(c.blob_exists(IMAGE, DIGEST)) is True
    # each operation lost one first-byte timeout on the mirror, never a whole budget
    assert clock.now - start == 3 * RetryPolicy().response_timeout
    assert session.hosts_called() == ["mirror.test", "reg.test:5000"] * 3
    assert c.breaker_state("mirror.test") == "open"
    session.calls.clear()
    before = clock.now
    assert run(c.blob_exists(IMAGE, DIGEST)) is True
    assert session.hosts_called() == ["reg.test:5000"] and clock.now == before


def test_404_mirror_hands_over_without_retry_or_time() -> None:
    c, session, clock = client({"mirror.test": "404"}, mirrors=("http://mirror.test",))
    start = clock.now
    data, _, _ = run(c.fetch_manifest(IMAGE))
    assert data == MANIFEST and clock.now == start
    assert session.hosts_called() == ["mirror.test", "reg.test:5000"]
    assert c.stats["retries"] == 0


def test_optional_lookup_takes_not_found_as_the_answer() -> None:
    behaviour = {"mirror.test": "404", "reg.test:5000": "hang"}
    c, session, _clock = client(behaviour, mirrors=("http://mirror.test",))
    with pytest.raises(NotFound, match=r"not found on mirror\.test"):
        run(c.fetch_manifest(IMAGE, "clip-index", optional=True))
    assert session.hosts_called() == ["mirror.test", "reg.test:5000"]  # one round, no retry
    assert c.stats["retries"] == 0
    # the same lookup when it is not optional: the registry may have it, so it is retried
    c2, session2, _ = client(behaviour, mirrors=("http://mirror.test",))
    with pytest.raises(Unavailable, match="failed after 3 attempts"):
        run(c2.fetch_manifest(IMAGE, "clip-index"))
    assert session2.hosts_called().count("mirror.test") == 1  # its answer stands


def test_referrers_lookup_is_optional() -> None:
    behaviour = {"mirror.test": "404", "reg.test:5000": "hang"}
    c, _session, _ = client(behaviour, mirrors=("http://mirror.test",))
    assert run(c.fetch_referrers(IMAGE, DIGEST, "application/x")) is None
    assert c.stats["retries"] == 0


# ---------------------------------------------------------------- the documented bounds


def test_default_bounds_follow_from_the_config() -> None:
    """docs/operations.md "Bounds": the numbers there are these computations."""
    settings = RegistrySettings()
    policy = RetryPolicy.from_settings(settings)
    # one operation against a hung registry ends by its deadline
    assert policy.worst_case() == settings.operation_timeout_seconds == 12.0
    # (attempts - 1) first-byte timeouts plus backoffs leave room for the last attempt, so a
    # failed operation records `attempts` failures: the breaker opens after one operation
    assert settings.attempts >= settings.failure_threshold
    before_last = (settings.attempts - 1) * (
        settings.connect_timeout_seconds + settings.response_timeout_seconds
    ) + sum(min(policy.backoff * 2**i + policy.backoff, policy.backoff_max) for i in range(2))
    assert before_last < settings.operation_timeout_seconds
    # so every later call of a Prepare (artifact lookups, blob_exists, the build's stream)
    # fails at once while the breaker is open (the cool-down outlasts a Prepare's calls)
    prepare = policy.worst_case()
    assert prepare < 15.0
    # clip pull: its own resolve fails by the deadline; or it succeeded and the Prepare behind
    # containerd fails by its own deadline
    assert policy.worst_case() < 20.0 and prepare < 20.0


def test_deadline_type() -> None:
    clock = FakeClock()
    deadline = Deadline(clock.now + 2, clock)
    assert deadline.remaining() == 2 and not deadline.expired()
    clock.now += 2
    assert deadline.expired()


def test_a_deadline_already_passed_fails_at_once_and_says_so() -> None:
    c, session, clock = client({})
    with pytest.raises(Unavailable, match="no time left before the deadline"):
        run(c.blob_exists(IMAGE, DIGEST, deadline=clock.now - 1))
    assert session.calls == []
