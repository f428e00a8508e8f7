"""The admin listener's handler: Prometheus metrics, liveness and readiness.

Served by `H1Connection` on its own loopback port, never on the public ones. Readiness is
what a load balancer or Kubernetes asks before sending traffic: it turns 503 as soon as a
shutdown begins, so that traffic moves elsewhere while in-flight requests drain.
"""

from __future__ import annotations

import logging
from typing import Protocol

from proxy.handlers.observed import RequestHandler, respond
from proxy.http.model import Exchange, Outcome, ResponseHead, plain_response
from proxy.metrics import Metrics, ServerState

log = logging.getLogger(__name__)

# What generate_latest writes (the Prometheus text format 0.0.4), understood by every scraper.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ServerStatus(ServerState, Protocol):
    """What readiness reads beyond the metrics' view of the server."""

    @property
    def listening(self) -> bool: ...

    @property
    def shutting_down(self) -> bool: ...


def unready_reason(server: ServerStatus) -> str | None:
    """Why the server should get no traffic yet (or any more), or None when it is ready."""
    if server.shutting_down:
        return "shutting down"
    if not server.listening:
        return "listeners not up"
    loaded = {cert.name for cert in server.certs.certificates()}
    missing = [site.name for site in server.config.sites if site.name not in loaded]
    if missing:
        return f"no certificate for site {', '.join(missing)}"
    return None


class InstanceView(Protocol):
    """What the admin port reports: one process's state, or a supervisor's view of all its
    workers (asked over their control channels, hence async)."""

    __slots__ = ()  # slotted implementations stay slotted

    async def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""

    async def unready_reason(self) -> str | None:
        """Why no traffic should come (see `unready_reason`), or None when ready."""


class ProcessView(InstanceView):
    """The admin view of a lone proxy process, or of one worker for its supervisor."""

    def __init__(self, metrics: Metrics, server: ServerStatus) -> None:
        self._metrics = metrics
        self._server = server

    async def exposition(self) -> bytes:
        return self._metrics.exposition()

    async def unready_reason(self) -> str | None:
        return unready_reason(self._server)


class AdminHandler(RequestHandler):
    """GET /metrics, /healthz (the process runs) and /readyz (it should get traffic)."""

    def __init__(self, view: InstanceView) -> None:
        self._view = view

    async def __call__(self, exchange: Exchange, outcome: Outcome) -> None:
        request = exchange.request
        path = request.target.partition(b"?")[0]
        if request.method not in (b"GET", b"HEAD"):
            head, body = plain_response(405, "Method Not Allowed", (b"allow", b"GET, HEAD"))
        elif path == b"/metrics":
            head, body = await self._metrics_response()
        elif path == b"/healthz":
            head, body = plain_response(200, "ok")
        elif path == b"/readyz":
            reason = await self._view.unready_reason()
            head, body = (
                plain_response(200, "ready")
                if reason is None
                else plain_response(503, f"not ready: {reason}")
            )
        else:
            head, body = plain_response(404, "Not Found: try /metrics, /healthz or /readyz")
        head.headers.append((b"cache-control", b"no-store"))
        await respond(exchange, outcome, head, body)

    async def _metrics_response(self) -> tuple[ResponseHead, bytes]:
        try:
            body = await self._view.exposition()
        except Exception:  # a broken collector must cost a scrape, never the proxy
            log.exception("cannot collect the metrics")
            return plain_response(500, "Internal Server Error: cannot collect the metrics")
        headers = [
            (b"content-type", METRICS_CONTENT_TYPE),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        return ResponseHead(200, headers), body
