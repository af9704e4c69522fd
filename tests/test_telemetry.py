"""Telemetry: instruments read back through the real /metrics HTTP endpoint; spans; lifecycle."""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from snapshotter.errors import InvalidArgument, Unavailable
from snapshotter.telemetry import (
    Telemetry,
    TelemetryOptions,
    otlp_available,
    parse_address,
    scrape,
)


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.shutdown()


def fetch(t: Telemetry) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{t.bound_address}/metrics", timeout=5) as response:
        assert response.status == 200
        return dict(scrape(response.read().decode()))


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The value of `name` whose labels include `labels` (0 when absent)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in want):
            return value
    return 0.0


def test_counters_per_tier_over_http(telemetry: Telemetry) -> None:
    host, port = telemetry.start_metrics_server("127.0.0.1:0")
    assert host == "127.0.0.1" and port > 0
    telemetry.tier_hit("memory", 100)
    telemetry.tier_hit("disk", 4096, count=2)
    telemetry.tier_hit("contentcache", 1 << 20)
    telemetry.tier_miss("contentcache", 3)
    telemetry.tier_miss("disk")
    values = fetch(telemetry)
    assert metric(values, "clip_tier_hits_total", tier="disk") == 2
    assert metric(values, "clip_tier_read_bytes_total", tier="disk") == 4096
    assert metric(values, "clip_tier_read_bytes_total", tier="contentcache") == 1 << 20
    assert metric(values, "clip_tier_misses_total", tier="contentcache") == 3
    assert metric(values, "clip_tier_hits_total", tier="memory") == 1
    telemetry.tier_hit("disk", 10)
    assert metric(fetch(telemetry), "clip_tier_hits_total", tier="disk") == 3


def test_every_instrument_is_exported(telemetry: Telemetry) -> None:
    telemetry.start_metrics_server("127.0.0.1:0")
    telemetry.read_latency(0.003, "registry")
    telemetry.read_latency(0.0002, "memory")
    telemetry.inflate(0.25, 5000, "gzip")
    telemetry.registry_request("range", 206, 1234)
    telemetry.registry_request("token", 200)
    telemetry.index_built()
    telemetry.index_fetch("contentcache", "hit")
    telemetry.background_progress("sha256:aa", 10, 100)
    telemetry.background_progress("sha256:aa", 60, 100)
    telemetry.verification_failure("contentcache")
    telemetry.breaker_state("redis", "open")
    telemetry.contentcache_put("dropped_full", 4)
    telemetry.contentcache_error("get", "timeout")
    telemetry.contentcache_skipped("get")
    v = fetch(telemetry)
    assert metric(v, "clip_read_latency_seconds_count", tier="registry") == 1
    assert metric(v, "clip_read_latency_seconds_bucket", tier="registry", le="0.005") == 1
    assert metric(v, "clip_read_latency_seconds_bucket", tier="registry", le="0.0025") == 0
    assert metric(v, "clip_inflate_duration_seconds_sum", compression="gzip") == 0.25
    assert metric(v, "clip_inflate_output_bytes_total", compression="gzip") == 5000
    assert metric(v, "clip_registry_requests_total", kind="range", status="206") == 1
    assert metric(v, "clip_registry_received_bytes_total", kind="range") == 1234
    assert metric(v, "clip_index_builds_total", outcome="ok") == 1
    assert metric(v, "clip_index_fetches_total", source="contentcache", outcome="hit") == 1
    assert metric(v, "clip_background_fetch_done_bytes", layer="sha256:aa") == 60
    assert metric(v, "clip_background_fetch_total_bytes", layer="sha256:aa") == 100
    assert metric(v, "clip_verification_failures_total", tier="contentcache") == 1
    assert metric(v, "clip_contentcache_breaker_state", backend="redis") == 2
    assert metric(v, "clip_contentcache_puts_total", outcome="dropped_full") == 4
    assert metric(v, "clip_contentcache_errors_total", op="get", kind="timeout") == 1
    assert metric(v, "clip_contentcache_skipped_total", op="get") == 1


def test_unknown_tier_is_a_bug(telemetry: Telemetry) -> None:
    with pytest.raises(ValueError, match="unknown tier 'nvme'"):
        telemetry.tier_hit("nvme", 1)


def test_stop_frees_the_port_and_restart_works(telemetry: Telemetry) -> None:
    _, port = telemetry.start_metrics_server("127.0.0.1:0")
    with pytest.raises(Unavailable, match="already serving"):
        telemetry.start_metrics_server("127.0.0.1:0")
    telemetry.stop_metrics_server()
    telemetry.stop_metrics_server()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    _, again = telemetry.start_metrics_server(f"127.0.0.1:{port}")
    assert again == port
    telemetry.tier_hit("disk", 1)
    assert metric(fetch(telemetry), "clip_tier_hits_total", tier="disk") == 1


def test_busy_address_is_a_clear_error(telemetry: Telemetry) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Unavailable, match=f"metrics address 127.0.0.1:{port}"):
            telemetry.start_metrics_server(f"127.0.0.1:{port}")


@pytest.mark.parametrize("bad", ["9090", "host:", ":80", "h:port", "h:70000"])
def test_bad_address_named(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="expected HOST:PORT"):
        parse_address(bad)


def test_ipv6_address_parses() -> None:
    assert parse_address("[::1]:9090") == ("::1", 9090)


def test_two_instances_do_not_share_values() -> None:
    a, b = Telemetry(), Telemetry()
    try:
        a.start_metrics_server("127.0.0.1:0")
        b.start_metrics_server("127.0.0.1:0")
        a.tier_hit("disk", 5)
        assert metric(fetch(a), "clip_tier_hits_total", tier="disk") == 1
        assert metric(fetch(b), "clip_tier_hits_total", tier="disk") == 0
    finally:
        a.shutdown()
        b.shutdown()


def test_configure_resets_and_keeps_serving_new_registry(telemetry: Telemetry) -> None:
    telemetry.tier_hit("disk", 5)
    telemetry.configure(TelemetryOptions(slow_read_seconds=0.1))
    telemetry.start_metrics_server("127.0.0.1:0")
    assert metric(fetch(telemetry), "clip_tier_hits_total", tier="disk") == 0
    telemetry.tier_hit("disk", 5)
    assert metric(fetch(telemetry), "clip_tier_hits_total", tier="disk") == 1


def _capture(telemetry: Telemetry) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_spans_record_attributes_and_errors(telemetry: Telemetry) -> None:
    exporter = _capture(telemetry)
    with telemetry.span("prepare", key="ns/1/x"), telemetry.span("index.resolve", layer="x"):
        pass
    with pytest.raises(RuntimeError), telemetry.span("prepare", key="ns/2/y"):
        raise RuntimeError("boom")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["index.resolve", "prepare", "prepare"]
    assert spans[0].parent is not None and spans[0].parent.span_id == spans[1].context.span_id
    assert spans[1].attributes == {"key": "ns/1/x"}
    assert spans[2].status.status_code.name == "ERROR"


def test_slow_read_span_only_when_slow(telemetry: Telemetry) -> None:
    exporter = _capture(telemetry)
    with telemetry.slow_read("sha256:aa", 0, 4096, threshold=60.0):
        pass
    assert exporter.get_finished_spans() == ()
    with telemetry.slow_read("sha256:aa", 8192, 4096, threshold=0.0) as extra:
        extra["tier"] = "registry"
    (span,) = exporter.get_finished_spans()
    assert span.name == "read.slow"
    attrs = dict(span.attributes or {})
    assert attrs["clip.offset"] == 8192 and attrs["tier"] == "registry"
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time >= span.start_time


def test_trace_log_writes_structured_lines(caplog: pytest.LogCaptureFixture) -> None:
    t = Telemetry(TelemetryOptions(trace_log=True))
    try:
        with caplog.at_level(logging.INFO, logger="clip.trace"), t.span("prepare", key="k"):
            pass
    finally:
        t.shutdown()
    (record,) = [r for r in caplog.records if r.name == "clip.trace"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["span"] == "prepare" and fields["key"] == "k"
    assert len(fields["trace_id"]) == 32 and fields["status"] == "unset"


def test_failed_configure_keeps_the_old_setup(telemetry: Telemetry) -> None:
    if otlp_available():
        return
    with pytest.raises(InvalidArgument):
        telemetry.configure(TelemetryOptions(otlp_endpoint="http://127.0.0.1:4318"))
    telemetry.start_metrics_server("127.0.0.1:0")
    telemetry.tier_hit("disk", 1)
    assert metric(fetch(telemetry), "clip_tier_hits_total", tier="disk") == 1


def test_otlp_only_when_the_exporter_is_installed() -> None:
    options = TelemetryOptions(otlp_endpoint="http://127.0.0.1:4318")
    if otlp_available():
        t = Telemetry(options)
        t.shutdown()
    else:
        with pytest.raises(InvalidArgument, match="opentelemetry-exporter-otlp-proto-http"):
            Telemetry(options)
