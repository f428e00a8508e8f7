"""Spans out of finished requests, exported over OTLP/HTTP by the SDK's BatchSpanProcessor.

Imported only when tracing is on. The span of a request is built once it ended, from its
`Outcome`, with the ids its `TraceContext` chose when it began (the upstream already saw
them), and handed to the batch processor: that only queues it, and the processor's own
thread encodes and posts batches, so the trio loop never waits for the collector. A full
queue (collector down for long) drops spans, never requests.
"""

from __future__ import annotations

import logging
import math
import os
import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from proxy import __version__
from proxy.config import TracingConfig
from proxy.handlers.forward import host_without_port
from proxy.http.model import Outcome
from proxy.tracing.context import TraceContext

EXPORT_TIMEOUT = 5.0  # seconds per batch, retries included: also bounds the flush on shutdown
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("port443", __version__)
_VERSIONS = {"HTTP/1.0": "1.0", "HTTP/1.1": "1.1", "HTTP/2": "2", "HTTP/3": "3"}
AttributeValue = str | int | float | bool
# The batch processor logs "Queue full, dropping Span." for every span it drops.
_PROCESSOR_LOGGER = "opentelemetry.sdk._shared_internal"


class OncePerInterval(logging.Filter):
    """Lets each message of a logger through at most once per `interval` seconds, saying
    how many were held back: a collector down under load must not log once per request."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[object, tuple[float, int]] = {}  # message -> (time shown, held back)

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        shown, held = self._last.get(record.msg, (-math.inf, 0))
        if now - shown < self._interval:
            self._last[record.msg] = (shown, held + 1)
            return False
        self._last[record.msg] = (now, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more since the last such line)"
        return True


def span_attributes(outcome: Outcome) -> dict[str, AttributeValue]:
    """What the span says about the request, in the HTTP semantic conventions' names
    (server spans), and port443's own (site, upstream, first-byte time) under `port443.`.
    No `url.query`: tokens travel in queries, and the collector is another party."""
    request = outcome.request
    path = request.target.decode("latin-1").partition("?")[0]  # queries may carry secrets
    attributes: dict[str, AttributeValue] = {
        "http.request.method": request.method.decode("latin-1"),
        "url.scheme": "https",
        "url.path": path,
        "server.address": host_without_port(request.host),
        "network.protocol.name": "http",
        "network.protocol.version": _VERSIONS.get(request.protocol, request.protocol),
        "client.address": outcome.client_ip,
        "network.peer.address": request.client_ip,
        "http.request.body.size": outcome.bytes_in,
        "http.response.body.size": outcome.bytes_out,
        "port443.listener": outcome.listener,
    }
    if outcome.status:
        attributes["http.response.status_code"] = outcome.status
    if outcome.status >= 500:
        attributes["error.type"] = str(outcome.status)
    if outcome.route is not None:
        attributes["http.route"] = outcome.route
    if outcome.site is not None:
        attributes["port443.site"] = outcome.site
    if outcome.upstream is not None:
        attributes["port443.upstream"] = outcome.upstream
    if outcome.upstream_time is not None:
        attributes["port443.upstream.first_byte_seconds"] = round(outcome.upstream_time, 6)
    if outcome.info.tls_version is not None:
        attributes["tls.protocol.version"] = outcome.info.tls_version.removeprefix("TLSv")
    agent = next((value for name, value in request.headers if name == b"user-agent"), None)
    if agent is not None:
        attributes["user_agent.original"] = agent.decode("latin-1")
    return attributes


def span_name(outcome: Outcome) -> str:
    """The conventions' low-cardinality name: "{method} {http.route}", or the method alone."""
    method = outcome.request.method.decode("latin-1")
    return f"{method} {outcome.route}" if outcome.route else method


def request_span(
    outcome: Outcome, trace: TraceContext, resource: Resource, end_ns: int
) -> ReadableSpan:
    """The SERVER span of a request that ended at `end_ns` (epoch nanoseconds)."""
    start_ns = end_ns - int((outcome.finished - outcome.started) * 1e9)
    events = []
    if outcome.upstream_time is not None:  # the upstream's response head arrived
        at = start_ns + int(outcome.upstream_time * 1e9)
        events.append(Event("upstream.first_byte", timestamp=at))
    parent = None
    if trace.parent_span_id is not None:
        parent = SpanContext(trace.trace_id, trace.parent_span_id, is_remote=True)
    error = outcome.status >= 500
    return ReadableSpan(
        name=span_name(outcome),
        context=SpanContext(trace.trace_id, trace.span_id, is_remote=False, trace_flags=_SAMPLED),
        parent=parent,
        resource=resource,
        attributes=span_attributes(outcome),
        events=events,
        kind=SpanKind.SERVER,
        status=Status(StatusCode.ERROR if error else StatusCode.UNSET),
        start_time=start_ns,
        end_time=end_ns,
        instrumentation_scope=_SCOPE,
    )


class SpanExport:
    """This process's exporter: the OTLP/HTTP exporter behind a batch processor, whose
    thread starts here and is flushed and stopped by `close`."""

    def __init__(self, config: TracingConfig) -> None:
        self._resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                "process.pid": os.getpid(),
            }
        )
        headers = {name.decode("ascii"): value.decode("latin-1") for name, value in config.headers}
        exporter = OTLPSpanExporter(
            endpoint=config.endpoint, headers=headers, timeout=EXPORT_TIMEOUT
        )
        self._processor = BatchSpanProcessor(exporter)
        self._quiet = OncePerInterval()
        logging.getLogger(_PROCESSOR_LOGGER).addFilter(self._quiet)

    def send(self, outcome: Outcome, trace: TraceContext) -> None:
        """Queue the request's span; never blocks."""
        self._processor.on_end(request_span(outcome, trace, self._resource, time.time_ns()))

    def close(self) -> None:
        """Export what is queued, then stop the thread (blocking: run it in a thread)."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]  # untyped in the SDK
        logging.getLogger(_PROCESSOR_LOGGER).removeFilter(self._quiet)
