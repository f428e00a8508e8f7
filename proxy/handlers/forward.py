"""The forwarding core: one request from any front end to an upstream and back.

Protocol-agnostic on both sides: it sees an `Exchange` (the client's request) and an
`UpstreamStream`. Bodies are pumped a chunk at a time in both directions, so memory stays
bounded and a slow reader slows the writer (backpressure) instead of filling buffers.
"""

from __future__ import annotations

import logging

import trio

from proxy.config import Config, Redirect, Respond, Route, SiteConfig
from proxy.handlers.observed import respond
from proxy.handlers.resend import ReplayBuffer, Resend, after_failure
from proxy.http.encoding import IDENTITY, response_coder
from proxy.http.headers import (
    apply_header_ops,
    client_response_headers,
    https_response_fields,
    requested_upgrade,
    upgrade_headers,
    upstream_request,
    with_client_certificate,
)
from proxy.http.model import (
    ClientGone,
    Exchange,
    Headers,
    MalformedBody,
    Outcome,
    Request,
    ResponseHead,
    Upgradable,
    UpstreamRequest,
    plain_response,
)
from proxy.netio import ByteStream, StreamTimeout
from proxy.routing.identity import behind_trusted_peer, is_trusted
from proxy.routing.routes import match_route, redirect_location, rewritten_target
from proxy.upstream.balance import request_key
from proxy.upstream.group import GroupUpstreams, NoHealthyBackend, UpstreamUnavailable
from proxy.upstream.pool import Upstreams
from proxy.upstream.stream import (
    BodyEnd,
    UnforwardableRequest,
    UpstreamClosed,
    UpstreamRefused,
    UpstreamStream,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)


def host_without_port(host: bytes) -> str:
    """Lower-case host name of a Host header or :authority, port and IPv6 brackets removed."""
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rpartition(":")[0] if ":" in text else text


def _decisive(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error of the body-pump nursery that decides the outcome, so the callers'
    plain `except` clauses (502, 504, client gone) see it: the client leaving wins, since
    nobody is left to answer; otherwise the first error."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    for leaf in leaves:
        if isinstance(leaf, ClientGone):
            return leaf
    return leaves[0]


class Forwarder:
    """What the HTTPS listener's requests get for one configuration: the server finds the
    site once (`site`, which its per-site rate limit needs too) and hands it to `serve`."""

    def __init__(self, config: Config, upstreams: Upstreams) -> None:
        self._config = config
        self._trusted = config.trusted_proxies
        self._upstreams = upstreams
        self._added = https_response_fields(config)  # HSTS, Alt-Svc
        # HTTP/3 carries no client certificates (a site asking for them answers 421 there),
        # so a connection whose handshake asked for one is not sent to it.
        self._added_for_mtls = https_response_fields(config, advertise_http3=False)
        default = config.tls.default_site
        self._default_site = config.site_for_host(default) if default else None

    def identify(self, request: Request, outcome: Outcome) -> None:
        """Who the client is, once per request, for the logs, the metrics, hashing and the
        per-client rate: the peer, or behind trusted proxies the first untrusted hop."""
        trusted = self._trusted
        if trusted and is_trusted(request.client_ip, trusted):
            outcome.peer_trusted = True
            outcome.client_ip = behind_trusted_peer(request.client_ip, request.headers, trusted)

    def site(self, request: Request) -> SiteConfig | None:
        """The site serving `request`: by its host, else the default site."""
        return self._config.site_for_host(host_without_port(request.host)) or self._default_site

    async def serve(self, exchange: Exchange, outcome: Outcome, site: SiteConfig | None) -> None:
        """Answer the request to `site` (`self.site` of it), filling in the outcome."""
        request = exchange.request
        if site is None:
            await self._respond(
                exchange, outcome, 421, "Misdirected Request: no site for this host"
            )
            return
        outcome.site = site.name
        info = exchange.info
        if site.client_auth != info.client_auth:
            # A connection serves any name its certificate covers (HTTP/2 coalescing; and
            # HTTP/3 carries no client certificates): the client must connect to this one.
            await self._respond(
                exchange, outcome, 421, "Misdirected Request: connect to this host by name"
            )
            return
        if site.client_cert_headers.names:  # before routing: header matchers see the truth
            request.headers = with_client_certificate(
                request.headers, site.client_cert_headers, info.client_cert
            )
        route = match_route(site.routes, request) if site.routes else None
        if route is None:  # no routes, or none matched: the site's own upstreams
            if site.upstreams:
                group = self._upstreams.for_site(site)
                await self._forward_or_fail(exchange, group, site.own_route, outcome)
            else:
                await self._respond(exchange, outcome, 404, "Not Found: no route for this path")
            return
        outcome.route = route.pattern
        if route.client_cert_required and info.client_cert is None:
            await self._respond(exchange, outcome, 403, "Forbidden: a client certificate is needed")
            return
        action = route.action
        if isinstance(action, Redirect):
            location = redirect_location(route, action, request.target)
            head, body = plain_response(action.status, "Redirecting", (b"location", location))
            await self._send_generated(exchange, outcome, route, head, body)
        elif isinstance(action, Respond):
            body = action.body.encode()
            head = ResponseHead(
                action.status,
                [
                    (b"content-type", action.content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            )
            await self._send_generated(exchange, outcome, route, head, body)
        else:
            await self._forward_or_fail(exchange, self._upstreams.for_group(action), route, outcome)

    async def _send_generated(
        self, exchange: Exchange, outcome: Outcome, route: Route, head: ResponseHead, body: bytes
    ) -> None:
        """A response the route itself makes (redirect, respond), with its header edits."""
        head.headers.extend(self._added_for(exchange))
        if route.response_headers:
            head.headers = apply_header_ops(head.headers, route.response_headers)
        await respond(exchange, outcome, head, body)

    async def _forward_or_fail(
        self, exchange: Exchange, group: GroupUpstreams, route: Route, outcome: Outcome
    ) -> None:
        name = outcome.site
        try:
            total = group.group.timeouts.total
            if total is None:
                await self._forward(exchange, group, route, outcome)
            else:
                with trio.fail_after(total):
                    await self._forward(exchange, group, route, outcome)
        except NoHealthyBackend as exc:
            log.warning("site %s: %s", name, exc)
            retry_after = (b"retry-after", str(exc.retry_after).encode("ascii"))
            await self._fail(exchange, outcome, 503, "Service Unavailable", retry_after)
        except UpstreamUnavailable as exc:
            log.error("site %s: upstream unavailable: %s", name, exc)
            status = 504 if exc.timed_out else 502
            await self._fail(exchange, outcome, status, "upstream unavailable")
        except (UpstreamTimeout, trio.TooSlowError) as exc:
            log.error("site %s: upstream timed out: %s", name, exc or "total timeout")
            await self._fail(exchange, outcome, 504, "Gateway Timeout")
        except UpstreamClosed as exc:
            log.error("site %s: upstream error: %s", name, exc)
            await self._fail(exchange, outcome, 502, "Bad Gateway")
        except (UnforwardableRequest, MalformedBody) as exc:
            log.info("client %s: bad request: %s", exchange.request.client_ip, exc)
            await self._fail(exchange, outcome, 400, "Bad Request")

    async def _forward(
        self, exchange: Exchange, group: GroupUpstreams, route: Route, outcome: Outcome
    ) -> None:
        request = exchange.request
        outgoing = upstream_request(
            request, keep_forwarded=outcome.peer_trusted, trace=outcome.trace
        )
        outgoing.target = rewritten_target(route, outgoing.target)
        if route.request_headers:
            outgoing.fields = apply_header_ops(outgoing.fields, route.request_headers)
        settings = group.group
        key = None
        if settings.policy == "consistent_hash":
            key = request_key(settings.hash_key, request, outcome.client_ip)
        replay = ReplayBuffer(exchange, outcome, settings.retry_buffer)
        tried: set[int] = set()  # backends that failed this request
        refusals = retries = 0
        attempt = 0
        while True:
            attempt += 1
            index, upstream = await group.open_stream(key, tried)
            outcome.upstream = upstream.url
            failed = True  # whether the attempt counts against the backend's health
            try:
                await self._exchange(exchange, upstream, outgoing, outcome, group, route, replay)
            except UpstreamClosed as exc:
                await upstream.aclose()
                resend = after_failure(
                    exc,
                    method=request.method,
                    replay=replay,
                    group=settings,
                    refusals=refusals,
                    stale=attempt == 1 and upstream.reused,
                )
                if resend is Resend.AGAIN:
                    failed = False
                    refusals += isinstance(exc, UpstreamRefused)
                elif resend is Resend.ELSEWHERE:
                    tried.add(index)
                    retries += 1
                    if not (
                        retries <= settings.retries
                        and trio.current_time() < outcome.started + settings.retry_deadline
                        and group.has_candidate(tried)
                    ):
                        resend = Resend.NO
                if resend is Resend.NO or exchange.head_sent:
                    raise
                log.info("group %s: retrying on another connection: %s", settings.name, exc)
            except BaseException as exc:
                await upstream.aclose()
                failed = isinstance(exc, UpstreamTimeout)
                raise
            else:
                upstream.release()
                failed = outcome.status >= 500
                return
            finally:
                group.finished(index, failed)

    async def _exchange(
        self,
        exchange: Exchange,
        upstream: UpstreamStream,
        outgoing: UpstreamRequest,
        outcome: Outcome,
        group: GroupUpstreams,
        route: Route,
        replay: ReplayBuffer,
    ) -> None:
        await upstream.send_head(outgoing, group.idle)
        if not outgoing.has_body:
            await self._relay_response(exchange, upstream, outcome, group, route, replay)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_request_body, replay, upstream, group.idle)
                await self._relay_response(exchange, upstream, outcome, group, route, replay)
                # An upstream may answer before reading the whole body (e.g. 413): the rest
                # of the upload is then abandoned, and the front end does not reuse the
                # connection.
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group_error:
            raise _decisive(group_error) from None

    async def _pump_request_body(
        self, replay: ReplayBuffer, upstream: UpstreamStream, timeout: float
    ) -> None:
        try:
            await replay.send(upstream, timeout)
        except (UpstreamClosed, UpstreamTimeout) as exc:
            # The upstream stopped reading; its response (if any) still decides the outcome.
            log.debug("upstream %s stopped taking the request body: %s", upstream.url, exc)

    async def _relay_response(
        self,
        exchange: Exchange,
        upstream: UpstreamStream,
        outcome: Outcome,
        group: GroupUpstreams,
        route: Route,
        replay: ReplayBuffer,
    ) -> None:
        first = await upstream.next_event(group.first_byte)
        replay.answer_started()  # from here on, the response is the client's: no retry
        while isinstance(first, ResponseHead) and first.status < 200:
            if first.status == 101:
                await self._switch_protocols(exchange, upstream, first, outcome)
                return
            await exchange.send_informational(first)
            first = await upstream.next_event(group.first_byte)
        if not isinstance(first, ResponseHead):
            raise UpstreamClosed(f"{upstream.url} sent body data before a response head")
        outcome.upstream_time = trio.current_time() - outcome.started
        headers = client_response_headers(
            first.headers, first.http_version, self._added_for(exchange)
        )
        if route.response_headers:
            headers = apply_header_ops(headers, route.response_headers)
        head = ResponseHead(first.status, headers)
        outcome.status = head.status
        request = exchange.request
        # Every body byte passes through the coder: compressed if the route, the client and
        # the response all allow it (it edits the head to say so), else as it is.
        coder = response_coder(
            method=request.method, request_headers=request.headers, head=head, encode=route.encode
        )
        # Coalesce the head with whatever body bytes arrived with it: one write.
        body = b""
        event = upstream.buffered_event()
        while isinstance(event, bytes):
            body += event
            event = upstream.buffered_event()
        body = coder.feed(body, flush=event is None, end=isinstance(event, BodyEnd))
        outcome.bytes_out = len(body)
        if isinstance(event, BodyEnd) and not event.trailers:
            await exchange.send_head(head, body, end=True)
            return
        await exchange.send_head(head, body, end=False)
        timeout = group.idle
        if event is None:
            event = await upstream.next_event(timeout)
        # An encoder flushes only before a wait, so it must know whether the next event is
        # already there; passing bytes through needs no such look ahead.
        look_ahead = coder is not IDENTITY
        while isinstance(event, bytes):
            following = upstream.buffered_event() if look_ahead else None  # None: must wait
            data = coder.feed(event, flush=following is None, end=isinstance(following, BodyEnd))
            if data:
                outcome.bytes_out += len(data)
                await exchange.send_data(data)
            event = following if following is not None else await upstream.next_event(timeout)
        if not isinstance(event, BodyEnd):
            raise UpstreamClosed(f"{upstream.url} sent a second response head")
        if tail := coder.feed(b"", flush=False, end=True):
            outcome.bytes_out += len(tail)
            await exchange.send_data(tail)
        await exchange.send_end(event.trailers)

    async def _switch_protocols(
        self, exchange: Exchange, upstream: UpstreamStream, head: ResponseHead, outcome: Outcome
    ) -> None:
        """The upstream accepted the client's Upgrade (WebSocket): relay its 101, then carry
        bytes both ways until either side closes. No idle timeout, as Caddy: WebSocket
        applications keep their own pings. A reload leaves the tunnel running."""
        protocol = exchange.request.upgrade
        if not (
            protocol is not None
            and isinstance(exchange, Upgradable)
            and isinstance(upstream, Upgradable)
        ):
            raise UpstreamClosed(f"{upstream.url} switched protocols without being asked")
        outcome.upstream_time = trio.current_time() - outcome.started
        outcome.status = 101
        protocol = requested_upgrade(head.headers) or protocol
        headers = client_response_headers(head.headers, head.http_version, [])
        switch = ResponseHead(101, headers + upgrade_headers(protocol))
        client_rest, client = await exchange.switch_protocols(switch)
        upstream_rest, server = await upstream.switch_protocols(None)

        async def carry(rest: bytes, source: ByteStream, sink: ByteStream, upload: bool) -> None:
            try:
                data = rest or await source.receive_some()
                while data:
                    await sink.send_all(data)
                    if upload:
                        outcome.bytes_in += len(data)
                    else:
                        outcome.bytes_out += len(data)
                    data = await source.receive_some()
            except (OSError, StreamTimeout):
                pass
            tunnel.cancel_scope.cancel()  # one side is gone: the session is over

        async with trio.open_nursery() as tunnel:
            tunnel.start_soon(carry, client_rest, client, server, True)
            tunnel.start_soon(carry, upstream_rest, server, client, False)

    async def _fail(
        self,
        exchange: Exchange,
        outcome: Outcome,
        status: int,
        message: str,
        *extra: tuple[bytes, bytes],
    ) -> None:
        """Report an upstream failure: an error response if none started, else abort."""
        if exchange.head_sent:
            await exchange.abort()
        else:
            await self._respond(exchange, outcome, status, message, *extra)

    async def _respond(
        self,
        exchange: Exchange,
        outcome: Outcome,
        status: int,
        message: str,
        *extra: tuple[bytes, bytes],
    ) -> None:
        head, body = plain_response(status, message, *extra)
        head.headers.extend(self._added_for(exchange))
        await respond(exchange, outcome, head, body)

    def _added_for(self, exchange: Exchange) -> Headers:
        return self._added if exchange.info.client_auth is None else self._added_for_mtls
