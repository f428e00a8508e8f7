"""The forwarding core: one request from any front end to an upstream and back.

Protocol-agnostic: it sees an `Exchange` (the client side) and an upstream connection.
Bodies are pumped a chunk at a time in both directions, so memory stays bounded and a slow
reader slows the writer (backpressure) instead of filling buffers.
"""

from __future__ import annotations

import logging

import h11
import trio

from proxy.config import Config, SiteConfig
from proxy.http.headers import client_response_headers, upstream_request_headers
from proxy.http.model import Exchange, ResponseHead, plain_response
from proxy.netio import StreamTimeout
from proxy.upstream.h1 import UpstreamClosed, UpstreamConnection
from proxy.upstream.pool import ConnectionPool, Upstreams, UpstreamUnavailable

log = logging.getLogger(__name__)


def host_without_port(host: bytes) -> str:
    """Lower-case host name of a Host header or :authority, port and IPv6 brackets removed."""
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rpartition(":")[0] if ":" in text else text


class UpstreamTimeout(Exception):
    pass


class Forwarder:
    """The request handler of the HTTPS listener for one configuration."""

    def __init__(self, config: Config, upstreams: Upstreams) -> None:
        self._config = config
        self._upstreams = upstreams
        self._hsts = config.hsts.header_value()
        default = config.tls.default_site
        self._default_site = config.site_for_host(default) if default else None

    async def __call__(self, exchange: Exchange) -> None:
        request = exchange.request
        site = self._config.site_for_host(host_without_port(request.host)) or self._default_site
        if site is None:
            await self._respond(exchange, 421, "Misdirected Request: no site for this host")
            return
        try:
            await self._forward(exchange, site)
        except UpstreamUnavailable as exc:
            log.error("site %s: upstream unavailable: %s", site.name, exc)
            status = 504 if exc.timed_out else 502
            await self._fail(exchange, status, "upstream unavailable")
        except UpstreamTimeout as exc:
            log.error("site %s: upstream timed out: %s", site.name, exc)
            await self._fail(exchange, 504, "Gateway Timeout")
        except UpstreamClosed as exc:
            log.error("site %s: upstream error: %s", site.name, exc)
            await self._fail(exchange, 502, "Bad Gateway")

    async def _forward(self, exchange: Exchange, site: SiteConfig) -> None:
        request = exchange.request
        chunked = request.has_body and not any(n == b"content-length" for n, _ in request.headers)
        headers = upstream_request_headers(request, chunked)
        upstreams = self._upstreams.for_site(site)
        # A pooled connection may have been closed by the upstream just as we reused it:
        # retry a body-less request once on a fresh connection, as nginx does.
        for attempt in (1, 2):
            pool, conn = await upstreams.connect()
            try:
                await self._exchange(exchange, pool, conn, headers)
                return
            except UpstreamClosed:
                await conn.aclose()
                if attempt == 2 or not conn.reused or request.has_body or exchange.head_sent:
                    raise
            except BaseException:
                await conn.aclose()
                raise

    async def _exchange(
        self,
        exchange: Exchange,
        pool: ConnectionPool,
        conn: UpstreamConnection,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        request = exchange.request
        limits = self._config.limits
        deadline = trio.current_time() + limits.upstream_timeout
        try:
            head_bytes = conn.request_bytes(
                request.method, request.target, headers, not request.has_body
            )
            await conn.send(head_bytes, deadline)
        except OSError as exc:
            raise UpstreamClosed(f"sending request: {exc}") from exc
        except StreamTimeout as exc:
            raise UpstreamTimeout("sending request") from exc
        if not request.has_body:
            await self._relay_response(exchange, conn)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_request_body, exchange, conn)
                await self._relay_response(exchange, conn)
                # An upstream may answer before reading the whole body (e.g. 413): then the
                # rest of the upload is abandoned and neither connection is reused.
                nursery.cancel_scope.cancel()
        pool.release(conn)

    async def _pump_request_body(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        timeout = self._config.limits.upstream_timeout
        try:
            while data := await exchange.receive_data():
                await conn.send(conn.data_bytes(data), trio.current_time() + timeout)
            await conn.send(
                conn.end_bytes(exchange.request_trailers), trio.current_time() + timeout
            )
        except (OSError, StreamTimeout, h11.LocalProtocolError) as exc:
            # The upstream stopped reading; its response (if any) still decides the outcome.
            log.debug("upstream %s stopped taking the request body: %r", conn.upstream.url, exc)

    async def _relay_response(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        timeout = self._config.limits.upstream_timeout
        try:
            await conn.wait_for_response(timeout)
            event = await conn.next_event(timeout)
            while type(event) is h11.InformationalResponse:
                await exchange.send_informational(
                    ResponseHead(event.status_code, list(event.headers))
                )
                event = await conn.next_event(timeout)
            if type(event) is not h11.Response:
                raise UpstreamClosed(f"unexpected {type(event).__name__} before the response")
            head = ResponseHead(
                event.status_code,
                client_response_headers(list(event.headers), event.http_version, self._hsts),
            )
            # Coalesce the head with whatever body bytes arrived with it.
            body = b""
            buffered = conn.buffered_event()
            while type(buffered) is h11.Data:
                body += buffered.data
                buffered = conn.buffered_event()
            if type(buffered) is h11.EndOfMessage and not buffered.headers:
                await exchange.send_head(head, body, end=True)
                return
            await exchange.send_head(head, body, end=False)
            event = buffered if buffered is not None else await conn.next_event(timeout)
            while type(event) is h11.Data:
                await exchange.send_data(event.data)
                event = await conn.next_event(timeout)
            if type(event) is not h11.EndOfMessage:
                raise UpstreamClosed(f"unexpected {type(event).__name__} in the response body")
            await exchange.send_end(list(event.headers) or None)
        except StreamTimeout as exc:
            raise UpstreamTimeout(
                f"no response from {conn.upstream.url} within {timeout:g}s"
            ) from exc
        except OSError as exc:
            raise UpstreamClosed(f"reading response from {conn.upstream.url}: {exc}") from exc

    async def _fail(self, exchange: Exchange, status: int, message: str) -> None:
        """Report an upstream failure: an error response if none started, else abort."""
        if exchange.head_sent:
            await exchange.abort()
        else:
            await self._respond(exchange, status, message)

    async def _respond(self, exchange: Exchange, status: int, message: str) -> None:
        head, body = plain_response(status, message)
        if self._hsts is not None:
            head.headers.append((b"strict-transport-security", self._hsts))
        await exchange.send_head(head, body, end=True)
