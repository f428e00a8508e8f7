"""OpenTelemetry tracing (`[tracing]`): W3C trace context on the request path (`context`),
the per-process hook (`tracer`), and the OTLP export, imported only when tracing is on
(`spans`)."""
