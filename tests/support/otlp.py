"""A local OTLP/HTTP traces receiver (trio + h11): takes POST /v1/traces, decodes the
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


async def _connection(stream: trio.SocketStream, collector: Collector) -> None:
    conn = h11.Connection(h11.SERVER)
    body = b""
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            ok = request.method == b"POST" and request.target == PATH.encode()
            if ok:
                headers = {k.decode(): v.decode() for k, v in request.headers}
                collector.headers.append(headers)
                collector.spans.extend(_spans(body))
            reply = ExportTraceServiceResponse().SerializeToString() if ok else b""
            fields = [
                ("content-type", "application/x-protobuf"),
                ("content-length", str(len(reply))),
            ]
            await stream.send_all(
                conn.send(h11.Response(status_code=200 if ok else 404, headers=fields))
                + conn.send(h11.Data(data=reply))
                + conn.send(h11.EndOfMessage())
            )
            if conn.our_state is not h11.DONE:  # the exporter asked to close
                return
            conn.start_next_cycle()
        else:  # ConnectionClosed, or anything else the exporter would not send
            return


async def serve_collector(
    collector: Collector, *, task_status: trio.TaskStatus[Collector] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    collector.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _connection(s, collector), listeners)
        task_status.started(collector)
