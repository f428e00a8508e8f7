"""The admin listener's handler: the status page, Prometheus metrics, liveness, readiness.

Served by `H1Connection` on its own loopback port, never on the public ones. Readiness is
what a load balancer or Kubernetes asks before sending traffic: it turns 503 as soon as a
shutdown begins, so that traffic moves elsewhere while in-flight requests drain.

With `[admin] token` set, everything but /healthz and /readyz (which tell nothing but
"up" and "ready", and are probed by load balancers without credentials) asks for it, as a
bearer token or as the password of HTTP basic auth (any user name; browsers prompt for it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from typing import Any, Protocol

from proxy.handlers.observed import RequestHandler, respond
from proxy.handlers.status_page import render_status_page
from proxy.http.model import Exchange, Outcome, Request, ResponseHead, plain_response
from proxy.instance_status import instance_status
from proxy.metrics import Metrics, ServerState
from proxy.traffic import TrafficHistory

log = logging.getLogger(__name__)

# What generate_latest writes (the Prometheus text format 0.0.4), understood by every scraper.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
HTML_CONTENT_TYPE = b"text/html; charset=utf-8"
JSON_CONTENT_TYPE = b"application/json"
# The page is self-contained: inline styles and SVG, nothing else is allowed to load.
CSP = b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"
OPEN_PATHS = frozenset((b"/healthz", b"/readyz"))
WWW_AUTHENTICATE = (b"www-authenticate", b'Basic realm="port443 admin", charset="UTF-8"')


class ServerStatus(ServerState, Protocol):
    """What readiness reads beyond the metrics' view of the server."""

    @property
    def listening(self) -> bool: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def started(self) -> float:
        """time.time() when the process started serving."""

    @property
    def traffic(self) -> TrafficHistory: ...


def unready_reason(server: ServerStatus) -> str | None:
    """Why the server should get no traffic yet (or any more), or None when it is ready."""
    if server.shutting_down:
        return "shutting down"
    if not server.listening:
        return "listeners not up"
    loaded = {cert.name for cert in server.certs.certificates()}
    missing = [
        site.name
        for site in server.config.sites
        if site.name not in loaded and not site.on_demand  # on demand: none of its own
    ]
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

    async def status(self) -> dict[str, Any]:
        """The status page's data (see `instance_status`)."""


class ProcessView(InstanceView):
    """The admin view of a lone proxy process, or of one worker for its supervisor."""

    def __init__(self, metrics: Metrics, server: ServerStatus) -> None:
        self._metrics = metrics
        self._server = server

    async def exposition(self) -> bytes:
        return self._metrics.exposition()

    async def unready_reason(self) -> str | None:
        return unready_reason(self._server)

    async def status(self) -> dict[str, Any]:
        server = self._server
        return instance_status(
            server.config,
            started=server.started,
            exposition=self._metrics.exposition(),
            traffic=server.traffic.snapshot(),
            workers=[],
            unready=unready_reason(server),
        )

    def traffic(self) -> dict[str, Any]:
        """The traffic history a worker sends its supervisor."""
        return self._server.traffic.snapshot()


class AdminHandler(RequestHandler):
    """GET / (status page), /status.json, /metrics, /healthz (the process runs) and /readyz
    (it should get traffic)."""

    def __init__(self, view: InstanceView, token: str | None = None) -> None:
        self._view = view
        self._token = None if token is None else token.encode()

    async def __call__(self, exchange: Exchange, outcome: Outcome) -> None:
        request = exchange.request
        path = request.target.partition(b"?")[0]
        if request.method not in (b"GET", b"HEAD"):
            head, body = plain_response(405, "Method Not Allowed", (b"allow", b"GET, HEAD"))
        elif path not in OPEN_PATHS and not self._authorized(request):
            head, body = plain_response(
                401, "Unauthorized: the admin token is required", WWW_AUTHENTICATE
            )
        elif path in (b"/", b"/status.json"):
            head, body = await self._status_response(html=path == b"/")
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
            head, body = plain_response(
                404, "Not Found: try /, /status.json, /metrics, /healthz or /readyz"
            )
        head.headers.append((b"cache-control", b"no-store"))
        await respond(exchange, outcome, head, body)

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        offered = _offered_token(request)
        return offered is not None and hmac.compare_digest(offered, self._token)

    async def _status_response(self, *, html: bool) -> tuple[ResponseHead, bytes]:
        try:
            status = await self._view.status()
        except Exception:  # as for metrics: a bug here must cost the page, never the proxy
            log.exception("cannot assemble the status")
            return plain_response(500, "Internal Server Error: cannot assemble the status")
        if html:
            body, content_type = render_status_page(status).encode(), HTML_CONTENT_TYPE
        else:
            body, content_type = json.dumps(status, indent=1).encode(), JSON_CONTENT_TYPE
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", CSP),
        ]
        return ResponseHead(200, headers), body

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


def _offered_token(request: Request) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` or the password of `Basic`."""
    for name, value in request.headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return credentials.strip()
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            return decoded.partition(b":")[2]
    return None
