"""Tracing in process: W3C trace context, sampling, the upstream's fields, the span built
from an outcome, the [tracing] table, and opentelemetry staying unimported while off."""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from proxy.config import IPNetwork, Route, TracingConfig, UpstreamGroup
from proxy.config_load import ConfigError, parse_config
from proxy.handlers.observed import Observed
from proxy.http.headers import upstream_request
from proxy.http.model import ConnectionInfo, Exchange, Outcome, Request
from proxy.tracing.context import RemoteParent, TraceContext, begin_trace, parse_parent
from proxy.tracing.tracer import Tracer
from tests.support.otlp import Collector
from tests.support.run import ROOT

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
PARENT = f"00-{TRACE}-{SPAN}-01".encode()
SITE = '[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n'
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)


def request(*headers: tuple[bytes, bytes], peer: str = "127.0.0.1") -> Request:
    return Request(
        method=b"GET",
        target=b"/api/items?page=2",
        host=b"a.test:8443",
        headers=list(headers),
        http_version=b"2",
        has_body=False,
        client_ip=peer,
    )


def outcome(req: Request, **fields: object) -> Outcome:
    values: dict[str, object] = {
        "request": req,
        "info": ConnectionInfo(client_ip=req.client_ip, tls_version="TLSv1.3", alpn="h2"),
        "listener": "https",
        "client_ip": "203.0.113.9",
        "started": 10.0,
        "finished": 10.25,
        **fields,
    }
    return Outcome(**values)  # type: ignore[arg-type]


# -- W3C trace context ----------------------------------------------------------------------


def test_a_valid_traceparent_and_its_tracestates() -> None:
    parent = parse_parent(
        [(b"traceparent", PARENT), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
    )
    assert parent == RemoteParent(int(TRACE, 16), int(SPAN, 16), True, b"a=1,b=2")
    unsampled = parse_parent([(b"traceparent", PARENT[:-2] + b"00")])
    assert unsampled is not None and not unsampled.sampled and unsampled.tracestate is None
    # A later version may append fields after a dash; version 00 may not.
    assert parse_parent([(b"traceparent", b"01" + PARENT[2:] + b"-more")]) is not None


@pytest.mark.parametrize(
    "value",
    [
        PARENT.upper(),  # hex is lower-case
        b"ff" + PARENT[2:],  # the forbidden version
        PARENT + b"-more",  # version 00 has exactly four fields
        f"00-{'0' * 32}-{SPAN}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
        PARENT[:-1],
        b"",
    ],
)
def test_invalid_traceparents_are_ignored(value: bytes) -> None:
    assert parse_parent([(b"traceparent", value)]) is None


def test_two_traceparents_or_an_oversized_tracestate() -> None:
    assert parse_parent([(b"traceparent", PARENT), (b"traceparent", PARENT)]) is None
    long_state = parse_parent([(b"traceparent", PARENT), (b"tracestate", b"a=" + b"x" * 600)])
    assert long_state is not None and long_state.tracestate is None


def test_a_continued_trace_follows_its_parents_sampling() -> None:
    for sampled in (True, False):
        parent = RemoteParent(int(TRACE, 16), int(SPAN, 16), sampled, b"v=1")
        trace = begin_trace(parent, sample_ratio=1.0 - sampled)  # the ratio does not decide
        assert (trace.trace_id, trace.parent_span_id) == (int(TRACE, 16), int(SPAN, 16))
        assert trace.sampled is sampled and trace.tracestate == b"v=1"
        assert trace.span_id not in (0, int(SPAN, 16))


def test_new_traces_are_sampled_by_the_ratio() -> None:
    assert all(begin_trace(None, 1.0).sampled for _ in range(500))
    assert not any(begin_trace(None, 0.0).sampled for _ in range(500))
    half = sum(begin_trace(None, 0.5).sampled for _ in range(2000))
    assert 800 < half < 1200  # 9 standard deviations either side


def test_the_upstream_fields() -> None:
    trace = TraceContext(trace_id=int(TRACE, 16), span_id=0xAB, sampled=False, tracestate=b"v=1")
    assert trace.upstream_fields() == [
        (b"traceparent", f"00-{TRACE}-00000000000000ab-00".encode()),
        (b"tracestate", b"v=1"),
    ]


def test_the_upstream_gets_port443s_context_instead_of_the_clients() -> None:
    sent = request((b"traceparent", PARENT), (b"tracestate", b"evil=1"), (b"accept", b"*/*"))
    untraced = upstream_request(sent, keep_forwarded=False).fields
    assert (b"traceparent", PARENT) in untraced and (b"tracestate", b"evil=1") in untraced
    trace = TraceContext(trace_id=1, span_id=2, sampled=True)
    traced = upstream_request(sent, keep_forwarded=False, trace=trace).fields
    assert [f for f in traced if f[0] in (b"traceparent", b"tracestate")] == [
        (b"traceparent", b"00-%032x-%016x-01" % (1, 2))
    ]
    assert (b"accept", b"*/*") in traced


# -- the tracer: whose context is continued --------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trust_incoming", "continued"),
    [("127.0.0.1", True, True), ("192.0.2.1", True, False), ("127.0.0.1", False, False)],
)
def test_only_trusted_peers_traceparents_are_continued(
    peer: str, trust_incoming: bool, continued: bool
) -> None:
    tracer = Tracer(TracingConfig(enabled=True, trust_incoming=trust_incoming), LOOPBACK)
    trace = tracer.begin(request((b"traceparent", PARENT), peer=peer))
    assert (trace.trace_id == int(TRACE, 16)) is continued
    assert (trace.parent_span_id == int(SPAN, 16)) is continued


def test_a_reload_changes_whose_context_is_continued() -> None:
    tracer = Tracer(TracingConfig(enabled=True), ())
    assert tracer.begin(request((b"traceparent", PARENT))).parent_span_id is None
    tracer.configure(LOOPBACK)
    assert tracer.begin(request((b"traceparent", PARENT))).parent_span_id == int(SPAN, 16)


class RecordingTracer:
    __slots__ = ("begun", "recorded")

    def __init__(self) -> None:
        self.begun: list[Request] = []
        self.recorded: list[Outcome] = []

    def begin(self, request: Request) -> TraceContext:
        self.begun.append(request)
        return TraceContext(trace_id=7, span_id=8, sampled=True)

    def record(self, outcome: Outcome) -> None:
        self.recorded.append(outcome)


class BareExchange:
    def __init__(self, req: Request) -> None:
        self.request = req
        self.info = ConnectionInfo(client_ip=req.client_ip, tls_version=None, alpn=None)


async def test_observed_begins_the_trace_before_the_handler_and_records_it_after() -> None:
    tracer = RecordingTracer()
    seen: list[TraceContext | None] = []

    async def handler(exchange: Exchange, outcome: Outcome) -> None:
        seen.append(outcome.trace)
        await trio.lowlevel.checkpoint()

    observed = Observed(handler, "https", [], tracer)
    req = request()
    await observed(BareExchange(req))  # type: ignore[arg-type]
    assert tracer.begun == [req] and seen == [TraceContext(trace_id=7, span_id=8, sampled=True)]
    assert [o.trace for o in tracer.recorded] == seen


# -- the span ------------------------------------------------------------------------------


def test_the_span_of_a_request() -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import SpanKind, StatusCode

    from proxy.tracing.spans import request_span

    req = request((b"user-agent", b"ua/1"))
    trace = TraceContext(trace_id=int(TRACE, 16), span_id=9, parent_span_id=5, sampled=True)
    done = outcome(
        req,
        route="/api/*",
        site="a.test",
        upstream="http://10.0.0.1:80",
        upstream_time=0.05,
        status=502,
        bytes_out=12,
    )
    span = request_span(done, trace, Resource.create({}), end_ns=2_000_000_000)
    assert span.name == "GET /api/*" and span.kind is SpanKind.SERVER
    assert span.start_time == 1_750_000_000 and span.end_time == 2_000_000_000
    assert span.context is not None and span.parent is not None
    assert (span.context.trace_id, span.context.span_id) == (int(TRACE, 16), 9)
    assert span.parent.span_id == 5 and span.parent.is_remote
    assert span.status.status_code is StatusCode.ERROR
    assert [(e.name, e.timestamp) for e in span.events] == [("upstream.first_byte", 1_800_000_000)]
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.scheme": "https",
        "url.path": "/api/items",
        "server.address": "a.test",
        "network.protocol.name": "http",
        "network.protocol.version": "2",
        "client.address": "203.0.113.9",
        "network.peer.address": "127.0.0.1",
        "http.request.body.size": 0,
        "http.response.body.size": 12,
        "http.response.status_code": 502,
        "error.type": "502",
        "http.route": "/api/*",
        "port443.listener": "https",
        "port443.site": "a.test",
        "port443.upstream": "http://10.0.0.1:80",
        "port443.upstream.first_byte_seconds": 0.05,
        "tls.protocol.version": "1.3",
        "user_agent.original": "ua/1",
    }


def test_route_patterns_name_the_paths_a_route_takes() -> None:
    group = UpstreamGroup(name="g", upstreams=())
    assert Route(action=group, path_prefix="/api/").pattern == "/api/*"
    assert Route(action=group, path_prefix="/").pattern == "/*"
    assert Route(action=group, path="/login").pattern == "/login"
    assert Route(action=group, methods=frozenset({b"GET"})).pattern is None


# -- the [tracing] table and the cost of being off ------------------------------------------


def test_tracing_table() -> None:
    assert parse_config(SITE, Path("t.toml")).tracing == TracingConfig()
    config = parse_config(
        '[tracing]\nenabled = true\nendpoint = "https://otel.example:4318/v1/traces"\n'
        'service_name = "edge"\nsample_ratio = 0.25\ntrust_incoming = false\n'
        'headers = { Authorization = "Bearer x" }\n' + SITE,
        Path("t.toml"),
    )
    assert config.tracing == TracingConfig(
        enabled=True,
        endpoint="https://otel.example:4318/v1/traces",
        service_name="edge",
        sample_ratio=0.25,
        headers=((b"authorization", b"Bearer x"),),
        trust_incoming=False,
    )
    assert "Bearer" not in repr(config.tracing)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('endpoint = "collector:4318"', "tracing.endpoint: must be an http:// or https:// URL"),
        ("sample_ratio = 1.5", "tracing.sample_ratio: must be a number from 0 to 1"),
        ('headers = { "a b" = "x" }', "tracing.headers: must be a header field name"),
        ('service_name = " "', "tracing.service_name: must be a non-empty string"),
        ("sample = 1", 'tracing.sample: unknown key (did you mean "sample_ratio"?)'),
    ],
)
def test_wrong_tracing_values(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"[tracing]\n{line}\n" + SITE, Path("t.toml"))
    [problem] = info.value.problems
    assert problem.startswith(f"t.toml:2: {message}"), problem


def test_opentelemetry_is_not_imported_unless_tracing_is_on() -> None:
    script = (
        "import sys\nfrom pathlib import Path\nfrom proxy.config_load import parse_config\n"
        "from proxy.server import Server\n"
        f"config = parse_config({SITE!r}, Path('t.toml'))\nServer(config)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_the_exporters_repeated_warnings_are_held_back() -> None:
    import time

    from proxy.tracing.spans import OncePerInterval

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("otel", logging.WARNING, "f", 1, message, ("Span",), None)

    quiet = OncePerInterval(interval=0.05)
    first, held, other = (
        record("Queue full, dropping %s."),
        record("Queue full, dropping %s."),
        record("x"),
    )
    assert quiet.filter(first) and not quiet.filter(held) and quiet.filter(other)
    time.sleep(0.06)
    again = record("Queue full, dropping %s.")
    assert quiet.filter(again)
    assert again.getMessage() == "Queue full, dropping Span. (and 1 more since the last such line)"


async def test_spans_queued_while_exporting_are_flushed_on_the_way_out(
    collector: Collector,
) -> None:
    config = TracingConfig(enabled=True, endpoint=collector.endpoint, service_name="unit")
    tracer = Tracer(config, ())
    done = outcome(request(), status=204)
    async with tracer.exporting():
        done.trace = tracer.begin(done.request)
        tracer.record(done)
        unsampled = outcome(request(), trace=TraceContext(trace_id=1, span_id=2, sampled=False))
        tracer.record(unsampled)
    [span] = collector.spans  # the batch delay (5 s) had not passed: the exit sent it
    assert span.trace_id == f"{done.trace.trace_id:032x}"
    assert span.resource["service.name"] == "unit"
    assert span.attributes["http.response.status_code"] == 204
    tracer.record(done)  # after the exporter stopped: dropped, no error
