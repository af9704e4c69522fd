"""clip's metrics and spans, served as Prometheus text on `/metrics`.

The read path's per-read instruments (hits, misses and bytes per tier, read latency) are plain
`prometheus_client` counters and a histogram: recording one costs well under a microsecond,
where the OpenTelemetry SDK took ~40 µs, which a page-cache-warm read cannot afford. Every other
metric, and every span, goes through the OpenTelemetry SDK, which also exports them over OTLP.

Why a module-level object: every component (read path, registry client, index builder, content
cache) records into the same instruments, and instruments must be created once per meter
provider. `TELEMETRY` is created at import with a Prometheus reader on a *private* collector
registry (so several daemons or tests in one process never collide on prometheus_client's
global registry). Nothing is served until `start_metrics_server()` is called; `configure()`
rebuilds the providers (and instruments) once at daemon start, e.g. to add OTLP export.

Callers record through methods (`TELEMETRY.tier_hit("disk", n)`), never by holding instrument
objects, so `configure()` can swap the providers underneath them.

Tiers are `memory`, `disk`, `contentcache` and `registry`. The content cache records its own
tier counters (it alone knows whether a value came back); the read path records the others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, Tracer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import start_http_server

from snapshotter.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

TIERS = ("memory", "disk", "contentcache", "registry")
#: Breaker states as gauge values: closed serves, half-open probes, open skips.
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
#: Read latencies span a page-cache-warm memory hit (~µs) to a cold registry fetch (~s).
_LATENCY_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.metric_exporter"


def otlp_available() -> bool:
    """True when the optional OTLP/HTTP exporter package is installed (not a clip dependency)."""
    try:
        return importlib.util.find_spec(_OTLP_MODULE) is not None
    except ModuleNotFoundError:
        return False


class LogSpanExporter(SpanExporter):
    """Writes each finished span as one structured log line (logger `clip.trace`)."""

    def __init__(self) -> None:
        self._log = logging.getLogger("clip.trace")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            start, end = span.start_time or 0, span.end_time or 0
            fields: dict[str, Any] = {
                "span": span.name,
                "duration_ms": round((end - start) / 1e6, 3),
                "status": span.status.status_code.name.lower(),
            }
            if span.context is not None:
                fields["trace_id"] = f"{span.context.trace_id:032x}"
            fields.update(dict(span.attributes or {}))
            self._log.info("span %s", span.name, extra={"fields": fields})
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    """What `configure()` sets up. `otlp_endpoint` needs the optional OTLP exporter package."""

    service_name: str = "clip"
    trace_log: bool = False
    otlp_endpoint: str = ""
    slow_read_seconds: float = 0.5


class Telemetry:
    """Instruments and tracer of one process; see the module doc."""

    def __init__(self, options: TelemetryOptions | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._build(options or TelemetryOptions())

    # --- setup --------------------------------------------------------------------------------

    def configure(self, options: TelemetryOptions) -> None:
        """Rebuild providers and instruments with `options` (values recorded so far are reset).

        A bad `options` raises before anything is torn down, leaving the old setup working.
        """
        _require_otlp(options)
        with self._lock:
            self._shutdown_providers()
            self.registry = CollectorRegistry(auto_describe=True)
            self._build(options)

    def _build(self, options: TelemetryOptions) -> None:
        self.options = options
        resource = Resource.create({"service.name": options.service_name})
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        readers += self._otlp_metric_readers(options)
        inflate_view = View(
            instrument_name="clip.inflate.duration",
            aggregation=ExplicitBucketHistogramAggregation(_LATENCY_BUCKETS),
        )
        self.meter_provider = MeterProvider(
            metric_readers=readers, resource=resource, views=[inflate_view]
        )
        self.tracer_provider = TracerProvider(resource=resource)
        if options.trace_log:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(LogSpanExporter()))
        self._otlp_span_processor(options)
        self.tracer: Tracer = self.tracer_provider.get_tracer("clip")
        self._instruments()

    def _otlp_metric_readers(self, options: TelemetryOptions) -> list[MetricReader]:
        if not options.otlp_endpoint:
            return []
        _require_otlp(options)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[import-not-found]
            OTLPMetricExporter,
        )
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = OTLPMetricExporter(endpoint=options.otlp_endpoint.rstrip("/") + "/v1/metrics")
        return [PeriodicExportingMetricReader(exporter)]

    def _otlp_span_processor(self, options: TelemetryOptions) -> None:
        if not options.otlp_endpoint:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = OTLPSpanExporter(endpoint=options.otlp_endpoint.rstrip("/") + "/v1/traces")
        self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))

    def _instruments(self) -> None:
        reg = self.registry
        hits = Counter("clip_tier_hits", "Reads served by a tier", ["tier"], registry=reg)
        misses = Counter("clip_tier_misses", "Reads a tier missed", ["tier"], registry=reg)
        nbytes = Counter("clip_tier_read_bytes", "Bytes served by a tier", ["tier"], registry=reg)
        self._fuse = Counter(
            "clip_fuse_requests", "Requests clip's FUSE mount served, by operation", ["op"],
            registry=reg,
        )
        latency = Histogram(
            "clip_read_latency_seconds", "Read latency by the tier that served it", ["tier"],
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        # one child per tier, made once: `labels()` per record costs more than the record
        self._hits = {t: hits.labels(t) for t in TIERS}
        self._misses = {t: misses.labels(t) for t in TIERS}
        self._bytes = {t: nbytes.labels(t) for t in TIERS}
        self._latency = {t: latency.labels(t) for t in TIERS}
        m = self.meter_provider.get_meter("clip")
        self._inflate = m.create_histogram(
            "clip.inflate.duration", unit="s", description="Seconds spent inflating layer bytes"
        )
        self._inflated = m.create_counter(
            "clip.inflate.output", unit="By", description="Uncompressed bytes produced by inflate"
        )
        self._reg_requests = m.create_counter(
            "clip.registry.requests", description="HTTP requests to registries"
        )
        self._reg_bytes = m.create_counter(
            "clip.registry.received", unit="By", description="Body bytes received from registries"
        )
        self._index_builds = m.create_counter("clip.index.builds", description="Indexes built")
        self._index_fetches = m.create_counter(
            "clip.index.fetches", description="Index lookups in shared stores"
        )
        self._bg_done = m.create_gauge(
            "clip.background_fetch.done", unit="By", description="Bytes of a layer fetched"
        )
        self._bg_total = m.create_gauge(
            "clip.background_fetch.total", unit="By", description="Bytes of a layer in total"
        )
        self._verify_failures = m.create_counter(
            "clip.verification.failures", description="Bytes that failed index digests"
        )
        self._breaker = m.create_gauge(
            "clip.contentcache.breaker_state",
            description="Content cache circuit breaker: 0 closed, 1 half-open, 2 open",
        )
        self._cc_errors = m.create_counter(
            "clip.contentcache.errors", description="Content cache calls that failed or timed out"
        )
        self._cc_skipped = m.create_counter(
            "clip.contentcache.skipped", description="Content cache calls skipped (breaker open)"
        )
        self._cc_puts = m.create_counter(
            "clip.contentcache.puts", description="Content cache writes by outcome"
        )

    # --- recording ----------------------------------------------------------------------------

    def tier_hit(self, tier: str, nbytes: int, count: int = 1) -> None:
        """`count` reads (blocks) served by `tier`, `nbytes` bytes in total."""
        label = _tier(tier)
        self._hits[label].inc(count)
        self._bytes[label].inc(nbytes)

    def fuse_request(self, op: str) -> None:
        """One request served by the FUSE mount (the EROFS mode's point is to need few)."""
        self._fuse.labels(op).inc()

    def tier_miss(self, tier: str, count: int = 1) -> None:
        self._misses[_tier(tier)].inc(count)

    def read_latency(self, seconds: float, tier: str) -> None:
        """One read's latency, labelled with the lowest tier that took part in it."""
        self._latency[_tier(tier)].observe(seconds)

    def inflate(self, seconds: float, nbytes: int, compression: str) -> None:
        attrs = {"compression": compression}
        self._inflate.record(seconds, attrs)
        self._inflated.add(nbytes, attrs)

    def registry_request(self, kind: str, status: int | str, nbytes: int = 0) -> None:
        """One registry HTTP request (`kind`: manifest, blob, range, token, push...)."""
        self._reg_requests.add(1, {"kind": kind, "status": str(status)})
        if nbytes:
            self._reg_bytes.add(nbytes, {"kind": kind})

    def index_built(self, outcome: str = "ok") -> None:
        self._index_builds.add(1, {"outcome": outcome})

    def index_fetch(self, source: str, outcome: str) -> None:
        """An index lookup in `source` (contentcache, registry) with outcome hit, miss or error."""
        self._index_fetches.add(1, {"source": source, "outcome": outcome})

    def background_progress(self, layer: str, done: int, total: int) -> None:
        attrs = {"layer": layer}
        self._bg_done.set(done, attrs)
        self._bg_total.set(total, attrs)

    def verification_failure(self, tier: str) -> None:
        self._verify_failures.add(1, {"tier": _tier(tier)})

    def breaker_state(self, backend: str, state: str) -> None:
        self._breaker.set(BREAKER_VALUES[state], {"backend": backend})

    def contentcache_error(self, op: str, kind: str) -> None:
        """A failed content cache call; `kind` is timeout or error."""
        self._cc_errors.add(1, {"op": op, "kind": kind})

    def contentcache_skipped(self, op: str) -> None:
        self._cc_skipped.add(1, {"op": op})

    def contentcache_put(self, outcome: str, count: int = 1) -> None:
        """Writes: written, failed, dropped_full, dropped_open, dropped_too_large."""
        self._cc_puts.add(count, {"outcome": outcome})

    # --- spans --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
        """A span around a unit of work (Prepare, index resolution); errors mark it failed."""
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    @contextlib.contextmanager
    def slow_read(
        self, layer: str, offset: int, length: int, threshold: float | None = None
    ) -> Iterator[dict[str, str | int]]:
        """Times a read; emits a `read.slow` span only when it took longer than the threshold.

        The body may add attributes (e.g. `tier`) to the yielded dict. Fast reads cost two clock
        reads and no span, which is why this is not a plain span.
        """
        limit = self.options.slow_read_seconds if threshold is None else threshold
        extra: dict[str, str | int] = {}
        start_ns = time.time_ns()
        t0 = time.monotonic()
        try:
            yield extra
        finally:
            elapsed = time.monotonic() - t0
            if elapsed >= limit:
                attrs: dict[str, str | int | float] = {
                    "clip.layer": layer, "clip.offset": offset, "clip.length": length,
                    "clip.seconds": round(elapsed, 6),
                }
                attrs.update(extra)
                span = self.tracer.start_span("read.slow", start_time=start_ns, attributes=attrs)
                span.end(end_time=start_ns + int(elapsed * 1e9))

    # --- /metrics -----------------------------------------------------------------------------

    def start_metrics_server(self, address: str) -> tuple[str, int]:
        """Serve Prometheus text on http://ADDRESS/metrics; returns the bound (host, port).

        `address` is HOST:PORT (port 0 picks a free one, which tests use). Raises Unavailable
        when the address cannot be bound, InvalidArgument when it is malformed.
        """
        host, port = parse_address(address)
        with self._lock:
            if self._server is not None:
                raise Unavailable(f"metrics endpoint already serving on {self.bound_address}")
            try:
                self._server, self._thread = start_http_server(port, host, registry=self.registry)
            except OSError as exc:
                raise Unavailable(f"metrics address {address}: {exc.strerror or exc}") from None
            bound = self._server.server_address
            log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
            return str(bound[0]), int(bound[1])

    @property
    def bound_address(self) -> str:
        if self._server is None:
            return ""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def stop_metrics_server(self) -> None:
        """Stop serving and free the port (idempotent)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def shutdown(self) -> None:
        """Stop the endpoint and flush exporters (daemon exit)."""
        self.stop_metrics_server()
        with self._lock:
            self._shutdown_providers()

    def _shutdown_providers(self) -> None:
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


def _require_otlp(options: TelemetryOptions) -> None:
    if options.otlp_endpoint and not otlp_available():
        raise InvalidArgument(
            f"telemetry: OTLP endpoint {options.otlp_endpoint!r} configured but the package "
            "opentelemetry-exporter-otlp-proto-http is not installed"
        )


def _tier(tier: str) -> str:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
    return tier


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port); InvalidArgument naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics address {address!r}: expected HOST:PORT")
    return host, int(port)


def scrape(text: str) -> Mapping[str, float]:
    """Parse Prometheus text into {'name{labels}': value} (for tests and `clip` tools)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


TELEMETRY = Telemetry()
