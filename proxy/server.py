"""Listeners, accept loops and the lifetime of one proxy process.

Nursery layout: `services` (certificate manager) outlives `connections` (one task per client
connection), which outlives the accept loops. Shutdown closes the listeners first, drains
connections for the grace period, then cancels what is left.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from proxy.accesslog import AccessLog
from proxy.certs.acme_challenges import ACME_TLS_ALPN
from proxy.certs.manager import CertManager
from proxy.client_limits import ClientLimits, client_key
from proxy.config import AdminConfig, Config, LimitsConfig, ListenConfig
from proxy.connections import Admission, ConnectionRegistry, DescriptorReserve, Drainable, Slot
from proxy.generation import Generation, describe_changes
from proxy.handlers.admin import AdminHandler, ProcessView
from proxy.handlers.observed import Observed, respond
from proxy.http.h1 import H1Connection, Handler
from proxy.http.h2 import H2ServerSession
from proxy.http.model import ConnectionInfo, Exchange, Observer, Outcome, plain_response
from proxy.lograte import RateLimitedLog
from proxy.memory import give_back_free_memory
from proxy.metrics import Metrics
from proxy.netio import SocketStream, StreamTimeout, bind_reusable, close_socket
from proxy.proxy_gate import ProxyProtocolGate, Rejected
from proxy.quic import QuicEndpoint, bind_udp
from proxy.tls.clienthello import ClientHello, ClientHelloError, PlainHTTPRequest
from proxy.tls.stream import TLSStream, peek_client_hello
from proxy.tracing.tracer import Tracer
from proxy.traffic import TrafficHistory

log = logging.getLogger(__name__)

ConnectionHandler = Callable[[socket.socket, str, Slot], Awaitable[None]]

ALPN = ("h2", "http/1.1")
LISTEN_BACKLOG = 1024
ADMIN_MAX_CONNECTIONS = 64  # scrapers and health checkers, not clients
HTTP_ON_TLS_PORT = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)


@dataclass(frozen=True)
class BoundAddress:
    kind: str  # "https" or "http"
    host: str
    port: int


def bind_listener(address: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket (see `bind_reusable`)."""
    sock = bind_reusable(address, port, socket.SOCK_STREAM)
    try:
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


Listeners = list[tuple[socket.socket, str]]  # (listening socket, "https" or "http")


def bind_public(listen: ListenConfig) -> Listeners:
    """The client-facing listeners of one process: HTTPS, and the redirector unless off."""
    listeners: Listeners = []
    try:
        for address in listen.addresses:
            listeners.append((bind_listener(address, listen.https), "https"))
            if listen.http:
                listeners.append((bind_listener(address, listen.http), "http"))
    except BaseException:
        for sock, _ in listeners:
            sock.close()
        raise
    return listeners


async def serve_admin(
    admin: AdminConfig,
    handler: Handler,
    limits: Callable[[], LimitsConfig],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin listener lives with the services, not the client listeners: /readyz
    still answers (503) while clients drain, and admin connections neither count
    against max_connections nor hold up the drain. A lone process and a supervisor of
    workers both serve it; `limits` gives the limits in force when a connection opens."""
    sock = bind_listener(admin.address, admin.port)
    try:
        host, port = sock.getsockname()[:2]
        log.info("listening for admin on %s port %d", host, port)
        admission = Admission(registry=ConnectionRegistry(ADMIN_MAX_CONNECTIONS))

        async def serve(sock: socket.socket, client_ip: str, slot: Slot) -> None:
            await serve_plain_http(handler, limits(), slot, sock, client_ip)

        async with trio.open_nursery() as connections:
            task_status.started()
            await accept_loop(sock, serve, connections, admission)
    finally:
        close_socket(sock)


async def serve_plain_http(
    handler: Handler,
    limits: LimitsConfig,
    slot: Slot,
    sock: socket.socket,
    client_ip: str,
) -> None:
    """HTTP/1.1 without TLS: the redirector's port and the admin listener."""
    info = ConnectionInfo(client_ip=client_ip, tls_version=None, alpn=None)
    await H1Connection(SocketStream(sock), sock, info, handler, limits, slot).serve()


_log_accept_failure = RateLimitedLog(log, logging.ERROR)


async def accept_loop(
    listener: socket.socket,
    serve: ConnectionHandler,
    connections: trio.Nursery,
    admission: Admission,
    gate: ProxyProtocolGate | None = None,
) -> None:
    """Accept while there is room: when a client waits at the limit or the descriptor
    reserve, idle connections make room first; a client over its own connection limit is
    closed at once (behind a PROXY header: once the header named it)."""
    registry, reserve, clients = admission.registry, admission.reserve, admission.clients
    while True:
        await trio.lowlevel.wait_readable(listener)
        if reserve is not None:
            await reserve.wait()
        await registry.wait_for_room()
        while not registry.full and (reserve is None or reserve.admits()):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                _log_accept_failure("accept failed: %s", exc)
                await trio.sleep(0.1)
                break
            client_ip = address[0]
            proxied = gate is not None and gate.expects(client_ip)
            if (
                not proxied
                and clients is not None
                and not clients.connection_opened(client_key(client_ip))
            ):
                sock.close()
                continue
            if reserve is not None:
                reserve.accepted()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            slot = registry.admit()
            connections.start_soon(
                _run_connection, admission, slot, serve, sock, client_ip, gate, proxied
            )


async def _run_connection(
    admission: Admission,
    slot: Slot,
    serve: ConnectionHandler,
    sock: socket.socket,
    client_ip: str,
    gate: ProxyProtocolGate | None,
    proxied: bool,
) -> None:
    """Serve one connection; behind a PROXY header, its client is the one the header names,
    counted against max_connections_per_ip only from then on (not as the balancer)."""
    clients = admission.clients
    counted = not proxied  # at accept
    try:
        if gate is not None:
            client_ip = await _proxied_client(gate, slot, sock, client_ip, proxied)
            if not counted:
                if clients is not None and not clients.connection_opened(client_key(client_ip)):
                    close_socket(sock)
                    return
                counted = True
        await serve(sock, client_ip, slot)
    except Rejected:
        return  # reported and closed
    except Exception:
        # A bug in one connection's handling must not take the listener and every other
        # connection down with it: log it loudly and keep serving.
        log.exception("client %s: connection handler failed", client_ip)
        close_socket(sock)
    finally:
        slot.end()
        if counted and clients is not None:
            clients.connection_closed(client_key(client_ip))


async def _proxied_client(
    gate: ProxyProtocolGate, slot: Slot, sock: socket.socket, peer: str, proxied: bool
) -> str:
    """The client the PROXY header names (see ProxyProtocolGate); while it arrives the
    connection is idle: closed to make room or on drain, quietly."""
    opening = _Handshaking(sock)
    slot.register(opening)
    try:
        return await gate.client_address(sock, peer, expected=proxied)
    except Rejected as exc:
        if not opening.closed:
            gate.report(peer, exc)
        close_socket(sock)
        raise
    finally:
        slot.unregister(opening)


class _Handshaking(Drainable):
    """A client connection until its PROXY header is read or its TLS handshake is done:
    idle, so it may be closed to make room (or on drain). Shutting the socket wakes the
    peek or handshake waiting on it with an end of file; `sock` follows the connection from
    the raw socket to the TLS one."""

    __slots__ = ("closed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def close_if_idle(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown: ssl.SSLSocket's would drop its TLS state.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class Server:
    """One proxy process: binds, serves, and shuts down gracefully on `shutdown()`.

    A worker (`workers` > 1) gets its `listeners` from the supervisor, which binds them once
    and serves the admin port for the whole instance (`serve_admin=False`).
    """

    def __init__(
        self, config: Config, *, listeners: Listeners | None = None, serve_admin: bool = True
    ) -> None:
        self._inherited = listeners
        self._serve_admin_port = serve_admin and config.admin.enabled
        limits = config.limits
        self.registry = ConnectionRegistry(limits.max_connections)
        self.client_limits = ClientLimits(limits, config.storage)
        self.admission = Admission(
            registry=self.registry,
            reserve=(
                DescriptorReserve(limits.fd_reserve, self.registry) if limits.fd_reserve else None
            ),
            clients=self.client_limits,
        )
        self.listening = False  # the public listeners are bound (readiness)
        self.metrics = Metrics(self)
        self.started = time.time()
        self.traffic = TrafficHistory()  # the status page's last minutes
        self._access_log = (
            AccessLog(config.access_log, shared=config.server.workers > 1)
            if config.access_log.enabled
            else None
        )
        observers: list[Observer] = [self.metrics, self.traffic]
        if self._access_log is not None:
            observers.append(self._access_log)
        # Spans for the HTTPS listener's requests (HTTP/1.1, 2 and 3), not redirects.
        tracing = config.tracing
        self._tracer = Tracer(tracing, config.trusted_proxies) if tracing.enabled else None
        # Handlers delegate to the generation current when each request starts.
        self._https_handler = Observed(self._forward, "https", observers, self._tracer)
        self._http_handler = Observed(self._redirect, "http", observers)
        self._current = Generation(config, ALPN, self.metrics.backend_health)
        self._shutdown = trio.Event()
        listen = config.listen  # bound once: a reload does not change it
        self._proxy_gate = (
            ProxyProtocolGate(
                listen.proxy_protocol_from,
                timeout=lambda: self.config.limits.header_timeout,
                rejected=self.metrics.proxy_protocol_rejected,
            )
            if listen.proxy_protocol
            else None
        )

    @property
    def config(self) -> Config:
        return self._current.config

    @property
    def certs(self) -> CertManager:
        return self._current.certs

    def _limits(self) -> LimitsConfig:
        return self.config.limits

    async def _forward(self, exchange: Exchange, outcome: Outcome) -> None:
        forwarder = self._current.forwarder
        forwarder.identify(exchange.request, outcome)
        site = forwarder.site(exchange.request)
        retry_after = await self.client_limits.check_request(outcome.client_ip, site)
        if retry_after is not None:
            head, body = plain_response(
                429, "Too Many Requests", (b"retry-after", str(retry_after).encode("ascii"))
            )
            await respond(exchange, outcome, head, body)
            return
        await forwarder.serve(exchange, outcome, site)

    async def _redirect(self, exchange: Exchange, outcome: Outcome) -> None:
        await self._current.redirector(exchange, outcome)

    async def reopen_logs(self) -> None:
        """SIGUSR1, after logrotate renamed the access log file."""
        if self._access_log is not None:
            await self._access_log.reopen()

    async def reload(self, config: Config) -> None:
        """Switch to a new, already validated configuration without dropping anything open.

        Listen addresses and ports are bound once: changing them needs a restart.
        """
        old = self._current
        for section in ("server", "listen", "admin", "access_log", "tracing"):
            if getattr(config, section) != getattr(old.config, section):
                log.warning("reload: [%s] changes take effect only after a restart", section)
        new = Generation(config, ALPN, self.metrics.backend_health)
        await self._services.start(new.run)
        self.client_limits.configure(config.limits, config.storage)
        if self._tracer is not None:
            self._tracer.configure(config.trusted_proxies)
        self._current = new
        old.retire()
        changes = describe_changes(old.config, config)
        log.info("reloaded %s: %s", config.path, "; ".join(changes) or "no changes")

    def shutdown(self) -> None:
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def run(
        self, *, task_status: trio.TaskStatus[list[BoundAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        exporting = self._tracer.exporting() if self._tracer else contextlib.nullcontext()
        async with exporting, trio.open_nursery() as services:
            self._services = services
            if self._serve_admin_port:  # first: /healthz answers while certificates load
                # Scrapes and health checks are counted, but kept out of the access log.
                view = ProcessView(self.metrics, self)
                handler = Observed(
                    AdminHandler(view, self.config.admin.token), "admin", [self.metrics]
                )
                await services.start(serve_admin, self.config.admin, handler, self._limits)
            await services.start(self._current.run)
            services.start_soon(give_back_free_memory)
            listeners: Listeners = []
            try:
                listeners = self._inherited or bind_public(self.config.listen)
                bound = [BoundAddress(kind, *sock.getsockname()[:2]) for sock, kind in listeners]
                for b in bound:
                    log.info("listening for %s on %s port %d", b.kind, b.host, b.port)
                if self._proxy_gate is not None:
                    sources = ", ".join(map(str, self.config.listen.proxy_protocol_from))
                    log.info("PROXY protocol header required from %s", sources)
                async with trio.open_nursery() as connections:
                    self._serve_http3(connections, listeners)
                    async with trio.open_nursery() as acceptors:
                        for sock, kind in listeners:
                            serve = self._serve_tls if kind == "https" else self._serve_redirect
                            acceptors.start_soon(
                                accept_loop,
                                sock,
                                serve,
                                connections,
                                self.admission,
                                self._proxy_gate,
                            )
                        self.listening = True
                        task_status.started(bound)
                        await self._shutdown.wait()
                        await self._delay_shutdown()
                        acceptors.cancel_scope.cancel()
                    for sock, _ in listeners:  # new clients are refused, not left in a backlog
                        close_socket(sock)
                    await self._drain(connections)
            finally:
                for sock, _ in listeners:
                    close_socket(sock)
                self._current.retire()
            services.cancel_scope.cancel()
        log.info("stopped")

    def _serve_http3(self, connections: trio.Nursery, listeners: Listeners) -> None:
        """HTTP/3 on UDP beside each HTTPS listener, when on. Its endpoints live in
        `connections`: draining connections still need their datagrams; new ones are
        refused once the connection registry drains. Each process binds its own (SO_REUSEPORT)."""
        if not self.config.listen.http3:
            return
        for sock, kind in listeners:
            if kind != "https":
                continue
            host, port = sock.getsockname()[:2]
            endpoint = QuicEndpoint(
                bind_udp(host, port),
                certs=lambda: self.certs,
                limits=self._limits,
                settings=lambda: self.config.http3,
                handler=self._https_handler,
                registry=self.registry,
                metrics=self.metrics,
                connections=connections,
            )
            log.info("listening for http3 on %s port %d (UDP)", host, port)
            connections.start_soon(endpoint.serve)

    async def _delay_shutdown(self) -> None:
        """Keep serving while readiness reports 503, so a load balancer stops sending us
        new clients before the listeners close (Kubernetes preStop-style)."""
        delay = self.config.limits.shutdown_delay
        if delay:
            log.info("shutting down in %gs; readiness now reports 503", delay)
            await trio.sleep(delay)

    async def _drain(self, connections: trio.Nursery) -> None:
        grace = self.config.limits.grace_period
        log.info(
            "shutting down: %d connections open, grace period %gs",
            self.registry.open_connections,
            grace,
        )
        self.registry.drain()
        with trio.move_on_after(grace):
            await self.registry.wait_all_closed()
        if self.registry.open_connections:
            log.warning("grace period over: closing %d connections", self.registry.open_connections)
        connections.cancel_scope.cancel()

    async def _serve_redirect(self, sock: socket.socket, client_ip: str, slot: Slot) -> None:
        """The plain-HTTP port, with the current generation's limits."""
        await serve_plain_http(self._http_handler, self.config.limits, slot, sock, client_ip)

    async def _serve_tls(self, sock: socket.socket, client_ip: str, slot: Slot) -> None:
        handshaking = _Handshaking(sock)
        slot.register(handshaking)
        try:
            stream = await self._handshake(sock, client_ip, handshaking)
        finally:
            slot.unregister(handshaking)
        if stream is None:
            return
        if stream.alpn_protocol == ACME_TLS_ALPN:
            await stream.aclose()  # the handshake itself was the TLS-ALPN-01 answer
            return
        info = ConnectionInfo(
            client_ip=client_ip,
            tls_version=stream.version,
            alpn=stream.alpn_protocol,
            client_auth=stream.client_auth,
            client_cert=stream.client_certificate,
        )
        self.metrics.tls_handshake_completed(info)
        if stream.alpn_protocol == "h2":
            config = self.config
            await H2ServerSession(
                stream, info, self._https_handler, config.limits, config.http2, slot
            ).serve()
        else:
            await H1Connection(
                stream, stream.socket, info, self._https_handler, self.config.limits, slot
            ).serve()

    async def _handshake(
        self, sock: socket.socket, client_ip: str, handshaking: _Handshaking
    ) -> TLSStream | None:
        """The TLS stream once the handshake is done; None (the socket closed) if it fails,
        or if the connection was closed to make room."""
        deadline = trio.current_time() + self.config.limits.header_timeout
        hello: ClientHello | None
        try:
            hello = await peek_client_hello(sock, deadline)
        except PlainHTTPRequest:
            await self._refuse_non_tls(sock, client_ip)
            return None
        except ClientHelloError as exc:  # OpenSSL reads it too, and sends the right alert
            log.debug("client %s: malformed ClientHello: %s", client_ip, exc)
            hello = None
        except (EOFError, StreamTimeout, OSError) as exc:
            log.debug("client %s: no ClientHello: %r", client_ip, exc)
            close_socket(sock)
            return None
        # Without SNI, the address the client connected to picks an IP-address certificate.
        local = sock.getsockname()[0] if hello is not None and not hello.server_name else None
        waiting_since = trio.current_time()  # for an on-demand certificate: not the client's time
        context = await self.certs.handshake_context(hello, local)
        deadline += trio.current_time() - waiting_since
        stream = TLSStream(sock, context)
        handshaking.sock = stream.socket
        try:
            await stream.do_handshake(deadline)
        except (ssl.SSLError, StreamTimeout, OSError) as exc:
            if handshaking.closed:
                log.debug("client %s: closed during its TLS handshake", client_ip)
            else:
                name = hello.server_name if hello else None
                log.info("client %s: TLS handshake failed (SNI %s): %s", client_ip, name, exc)
                self.metrics.tls_handshake_failed(exc)
            await stream.aclose()
            return None
        return stream

    async def _refuse_non_tls(self, sock: socket.socket, client_ip: str) -> None:
        """Plain HTTP sent to the TLS port gets a readable answer, as Go, Caddy and nginx give."""
        log.info("client %s: non-TLS bytes on the HTTPS port", client_ip)
        with contextlib.suppress(OSError, StreamTimeout):
            await SocketStream(sock).send_all(HTTP_ON_TLS_PORT, trio.current_time() + 1)
        close_socket(sock)
