"""The tracing hook of one process: a trace context when a request starts, a span when it
ends. OpenTelemetry is imported only by `exporting`, that is only when tracing is on.

Each process exports its own spans: with `[server] workers` > 1 every worker runs one
exporter thread (the SDK's BatchSpanProcessor) and the supervisor none.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import trio

from proxy.config import IPNetwork, TracingConfig
from proxy.http.model import Outcome, Request
from proxy.routing.identity import is_trusted
from proxy.tracing.context import TraceContext, begin_trace, parse_parent

if TYPE_CHECKING:
    from proxy.tracing.spans import SpanExport

log = logging.getLogger(__name__)


class Tracer:
    """Starts each request's trace context (`begin`) and, as an observer, hands its ended
    span to the exporter (`record`). Spans ended while no exporter runs are dropped."""

    __slots__ = ("_config", "_export", "_trusted")

    def __init__(self, config: TracingConfig, trusted: Sequence[IPNetwork]) -> None:
        self._config = config
        self._trusted: Sequence[IPNetwork] = ()
        self._export: SpanExport | None = None
        self.configure(trusted)

    def configure(self, trusted: Sequence[IPNetwork]) -> None:
        """A reload's trusted_proxies: the peers whose traceparent is continued."""
        self._trusted = tuple(trusted) if self._config.trust_incoming else ()

    def begin(self, request: Request) -> TraceContext:
        trusted = self._trusted
        parent = None
        if trusted and is_trusted(request.client_ip, trusted):
            parent = parse_parent(request.headers)
        return begin_trace(parent, self._config.sample_ratio)

    def record(self, outcome: Outcome) -> None:
        trace = outcome.trace
        if trace is not None and trace.sampled and self._export is not None:
            self._export.send(outcome, trace)

    @contextlib.asynccontextmanager
    async def exporting(self) -> AsyncIterator[None]:
        """Export spans while inside; on the way out, flush what is queued (bounded in
        time, in a thread: the collector may be slow or down)."""
        from proxy.tracing.spans import SpanExport  # here: opentelemetry loads only when on

        export = SpanExport(self._config)
        self._export = export
        log.info("tracing: exporting spans to %s", self._config.endpoint)
        try:
            yield
        finally:
            self._export = None
            with trio.CancelScope(shield=True):  # also when the run was cancelled
                await trio.to_thread.run_sync(export.close)
