"""A local OTLP/HTTP traces receiver (served by tiny_http): takes POST /v1/traces, decodes the
protobuf `ExportTraceServiceRequest` with opentelemetry-proto's classes, keeps the spans and
the request headers, answers 200 with an empty `ExportTraceServiceResponse`."""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.tiny_http import Reply, serve_http

PATH = "/v1/traces"


@dataclass
class ReceivedSpan:
    span: Span
    resource: dict[str, object]  # its process's attributes (service.name, process.pid)
    attributes: dict[str, object]  # the span's, as Python values

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


@dataclass
class Collector:
    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each export request

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    async def answer(self, request: h11.Request, body: bytes) -> Reply:
        ok = request.method == b"POST" and request.target == PATH.encode()
        if ok:
            self.headers.append({k.decode(): v.decode() for k, v in request.headers})
            self.spans.extend(_spans(body))
        reply = ExportTraceServiceResponse().SerializeToString() if ok else b""
        return 200 if ok else 404, [("content-type", "application/x-protobuf")], reply


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _spans(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest.FromString(body)
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {a.key: _value(a.value) for a in span.attributes}
                found.append(ReceivedSpan(span, resource, attributes))
    return found


async def serve_collector(
    collector: Collector, *, task_status: trio.TaskStatus[Collector] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        collector.port = await nursery.start(serve_http, collector.answer)
        task_status.started(collector)
