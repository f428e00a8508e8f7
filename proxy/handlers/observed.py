"""One way to observe every request handler: an `Outcome` per request for the observers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from proxy.http.model import Exchange, Observer, Outcome, Request, ResponseHead
from proxy.tracing.context import TraceContext


class RequestHandler(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    async def __call__(self, exchange: Exchange, outcome: Outcome) -> None:
        """Answer the request, filling in what the outcome says about it (status, bytes,
        site, upstream) as it goes."""
        ...


class RequestTracer(Observer, Protocol):
    """Tracing (`proxy/tracing/tracer.py`): a trace context as each request begins, the
    span when the outcome is recorded."""

    __slots__ = ()

    def begin(self, request: Request) -> TraceContext: ...


class Observed:
    """A listener's handler: runs `handler` and hands its finished `Outcome` to every
    observer (access log, metrics, tracing), also when the handler fails or the client
    leaves. With a `tracer`, the outcome carries the request's trace context from the start
    (the forwarder passes it upstream); without, tracing costs one comparison per request."""

    __slots__ = ("_handler", "_listener", "_observers", "_tracer")

    def __init__(
        self,
        handler: RequestHandler,
        listener: str,
        observers: Sequence[Observer],
        tracer: RequestTracer | None = None,
    ) -> None:
        self._handler = handler
        self._listener = listener
        self._tracer = tracer
        self._observers = (*observers, tracer) if tracer is not None else tuple(observers)

    async def __call__(self, exchange: Exchange) -> None:
        now = trio.current_time()
        outcome = Outcome(
            request=exchange.request,
            info=exchange.info,
            listener=self._listener,
            client_ip=exchange.request.client_ip,
            started=now,
            finished=now,
        )
        if self._tracer is not None:
            outcome.trace = self._tracer.begin(exchange.request)
        try:
            await self._handler(exchange, outcome)
        finally:
            outcome.finished = trio.current_time()
            for observer in self._observers:
                observer.record(outcome)


async def respond(exchange: Exchange, outcome: Outcome, head: ResponseHead, body: bytes) -> None:
    """Send a whole response the proxy itself generated, and record it in the outcome."""
    outcome.status, outcome.bytes_out = head.status, len(body)
    await exchange.send_head(head, body, end=True)
