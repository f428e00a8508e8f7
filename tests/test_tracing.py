"""Tracing seen from outside a real proxy: its spans arrive at a local OTLP/HTTP receiver,
the upstream sees their trace context, and a collector that is down changes nothing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.net import free_port
from tests.support.otlp import Collector, ReceivedSpan
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.workers import start_workers, worker_pids

pytestmark = pytest.mark.slow

INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_SPAN = "00f067aa0ba902b7"
INCOMING = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"
SPAN_SERVER = 2  # SPAN_KIND_SERVER in the OTLP protobuf


def tracing_toml(backend: Backend, endpoint: str) -> str:
    return (
        f'[tracing]\nenabled = true\nendpoint = "{endpoint}"\nservice_name = "edge-test"\n'
        'headers = { Authorization = "Bearer collector-secret" }\n'
    ) + sites_toml((["localhost"], [backend.url]))


async def traced_proxy(tmp_path: Path, backend: Backend, endpoint: str) -> ProxyProcess:
    return await start_proxy(tmp_path, tracing_toml(backend, endpoint))


async def echoed_headers(proxy: ProxyProcess, *extra: str) -> dict[str, str]:
    """The headers the backend received for one GET /echo with curl's `extra` options."""
    reply = await curl(*extra, *proxy.curl_args("/echo"))
    assert reply.status == 200
    return dict(json.loads(reply.body)["headers"])


async def echoed_traceparent(proxy: ProxyProcess, *extra: str) -> str:
    return (await echoed_headers(proxy, *extra))["traceparent"]


def only_span(collector: Collector, trace_id: str) -> ReceivedSpan:
    spans = [span for span in collector.spans if span.trace_id == trace_id]
    assert len(spans) == 1, (trace_id, collector.spans)
    return spans[0]


async def test_h1_and_h2_requests_become_server_spans_whose_ids_the_upstream_sees(
    tmp_path: Path, backend: Backend, collector: Collector
) -> None:
    proxy = await traced_proxy(tmp_path, backend, collector.endpoint)
    h1 = await echoed_traceparent(proxy, "--http1.1", "-A", "trace-test/1")
    h2 = await echoed_traceparent(proxy, "--http2")
    assert await proxy.terminate() == 0  # shutting down flushes the queued spans
    assert collector.headers and collector.headers[0]["authorization"] == "Bearer collector-secret"

    for traceparent, version in ((h1, "1.1"), (h2, "2")):
        _, trace_id, parent_id, flags = traceparent.split("-")
        span = only_span(collector, trace_id)
        assert span.span_id == parent_id  # the upstream's parent is port443's span
        assert flags == "01" and span.parent_span_id == ""  # sampled, a new trace
        assert span.span.kind == SPAN_SERVER and span.span.name == "GET"
        assert span.resource["service.name"] == "edge-test"
        attributes = span.attributes
        assert attributes["http.request.method"] == "GET"
        assert attributes["url.path"] == "/echo"
        assert attributes["http.response.status_code"] == 200
        assert attributes["server.address"] == "localhost"
        assert attributes["network.protocol.version"] == version
        assert attributes["client.address"] == "127.0.0.1"
        assert attributes["port443.site"] == "localhost"
        assert attributes["port443.upstream"] == backend.url
        assert int(str(attributes["http.response.body.size"])) > 0
        first_byte = float(str(attributes["port443.upstream.first_byte_seconds"]))
        duration = (span.span.end_time_unix_nano - span.span.start_time_unix_nano) / 1e9
        assert 0 < first_byte <= duration
        assert [event.name for event in span.span.events] == ["upstream.first_byte"]
    assert only_span(collector, h1.split("-")[1]).attributes["user_agent.original"] == (
        "trace-test/1"
    )
    assert "Traceback" not in proxy.log()


async def test_a_clients_traceparent_is_continued_only_once_trusted_proxies_list_it(
    tmp_path: Path, backend: Backend, collector: Collector
) -> None:
    proxy = await traced_proxy(tmp_path, backend, collector.endpoint)
    sent = ("-H", f"traceparent: {INCOMING}", "-H", "tracestate: vendor=kept")
    try:
        untrusted = await echoed_headers(proxy, "--http1.1", *sent)
        config = tmp_path / "port443.toml"  # a top-level key goes before the base's tables
        config.write_text('trusted_proxies = ["127.0.0.1"]\n' + config.read_text())
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_log("trusted_proxies changed")
        trusted = await echoed_headers(proxy, "--http2", *sent)
    finally:
        await proxy.terminate()

    _, trace_id, parent_id, _ = untrusted["traceparent"].split("-")
    assert trace_id != INCOMING_TRACE and "tracestate" not in untrusted  # a new trace
    span = only_span(collector, trace_id)
    assert span.span_id == parent_id and span.parent_span_id == ""

    version, trace_id, parent_id, flags = trusted["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", INCOMING_TRACE, "01")
    assert parent_id != INCOMING_SPAN and trusted["tracestate"] == "vendor=kept"
    span = only_span(collector, INCOMING_TRACE)
    assert span.span_id == parent_id and span.parent_span_id == INCOMING_SPAN


async def test_requests_are_unaffected_while_the_collector_is_down(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # the SDK's batch delay, in ms
    down = f"http://127.0.0.1:{free_port()}/v1/traces"  # nobody listens
    proxy = await traced_proxy(tmp_path, backend, down)
    try:
        for protocol in ("--http1.1", "--http2"):
            assert (await echoed_traceparent(proxy, protocol)).startswith("00-")
        await proxy.wait_log("Transient error")  # the exporter thread failed and retries
        for protocol in ("--http1.1", "--http2"):
            assert (await echoed_traceparent(proxy, protocol)).startswith("00-")
    finally:
        assert await proxy.terminate() == 0  # its flush gives up within terminate's timeout
    assert "Traceback" not in proxy.log()


async def test_each_worker_exports_its_own_spans(
    tmp_path: Path, backend: Backend, collector: Collector
) -> None:
    proxy = await start_workers(tmp_path, tracing_toml(backend, collector.endpoint), workers=2)
    try:
        traces = {(await echoed_traceparent(proxy)).split("-")[1] for _ in range(6)}
        pids = set(worker_pids(proxy).values())
    finally:
        assert await proxy.terminate() == 0  # the supervisor stops the workers: both flush
    assert {span.trace_id for span in collector.spans} == traces
    exporters = {span.resource["process.pid"] for span in collector.spans}
    assert exporters <= pids and proxy.process.pid not in exporters
