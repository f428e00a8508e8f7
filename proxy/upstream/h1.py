"""HTTP/1.1 upstream connections (h11, client role) and their keep-alive pool."""

from __future__ import annotations

import base64
import logging
import os
import ssl
from collections import deque
from typing import Any

import h11
import trio

from proxy.config import LimitsConfig, Upstream
from proxy.http.h11_internals import trusted_request
from proxy.http.headers import upgrade_headers
from proxy.http.model import Headers, ResponseHead, Upgradable, UpstreamRequest
from proxy.netio import ByteStream, StreamTimeout, close_socket
from proxy.upstream.connect import Connector, Transport
from proxy.upstream.stream import (
    BodyEnd,
    Pool,
    UnforwardableRequest,
    UpstreamClosed,
    UpstreamEvent,
    UpstreamProtocolError,
    UpstreamStream,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

IDLE_LIFETIME = 60.0  # seconds an idle pooled connection is kept (nginx: keepalive_timeout 60s)


def h1_fields(request: UpstreamRequest) -> Headers:
    """HTTP/1.1 framing: Host first, then the body's length, or chunked when it is unknown,
    and the Connection/Upgrade pair (and a WebSocket key) of a protocol upgrade."""
    fields: Headers = [(b"host", request.authority), *request.fields]
    if request.body_length is not None:
        fields.append((b"content-length", b"%d" % request.body_length))
    elif request.has_body:
        fields.append((b"transfer-encoding", b"chunked"))
    if request.upgrade is not None:
        fields += upgrade_headers(request.upgrade)
        if request.upgrade == b"websocket" and not any(
            name == b"sec-websocket-key" for name, _ in request.fields
        ):
            # From HTTP/2's extended CONNECT, which has no key (RFC 8441 §5): the HTTP/1.1
            # handshake needs one; its Accept answer is dropped on the way back.
            fields.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))
    return fields


class H1UpstreamConnection(UpstreamStream, Upgradable):
    """One keep-alive connection. It is the `UpstreamStream` of the one request it carries
    at a time, and goes back to its pool when that exchange completes cleanly."""

    __slots__ = (
        "_h11",
        "_pool",
        "_received",
        "_waited",
        "idle_since",
        "reused",
        "socket",
        "stream",
        "url",
    )

    def __init__(self, transport: Transport, pool: H1Pool, max_head_bytes: int) -> None:
        self.stream = transport.stream
        self.socket = transport.socket
        self.url = pool.upstream.url
        self._pool = pool
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._waited = False
        self._received = False  # any response byte since the request went out
        self.reused = False
        self.idle_since = 0.0

    async def _send(self, data: bytes, timeout: float) -> None:
        try:
            await self.stream.send_all(data, trio.current_time() + timeout)
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"{self.url} stopped reading the request") from exc
        except OSError as exc:
            raise UpstreamClosed(f"sending to {self.url}: {exc}") from exc

    def _unforwardable(self, exc: h11.LocalProtocolError) -> UnforwardableRequest:
        """h11 refusing to send a request means the client asked for what HTTP/1.1 cannot
        say and its front end let it through: the client's fault."""
        return UnforwardableRequest(f"cannot forward to {self.url}: {exc}")

    def _encode(self, event: h11.Data | h11.EndOfMessage) -> bytes:
        try:
            return self._h11.send(event) or b""
        except h11.LocalProtocolError as exc:
            raise self._unforwardable(exc) from exc

    async def send_head(self, request: UpstreamRequest, timeout: float) -> None:
        conn = self._h11
        head = trusted_request(request.method, request.target, h1_fields(request))
        try:
            data = conn.send(head) or b""
            if not request.has_body:  # head and end of message in one write
                data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise self._unforwardable(exc) from exc
        self._waited = self._received = False
        await self._send(data, timeout)

    async def send_data(self, data: bytes, timeout: float) -> None:
        await self._send(self._encode(h11.Data(data=data)), timeout)

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        await self._send(self._encode(h11.EndOfMessage(headers=trailers or [])), timeout)

    async def next_event(self, timeout: float) -> UpstreamEvent:
        conn = self._h11
        try:
            while True:
                event = self._next_decoded()
                if event is not None:
                    return event
                deadline = trio.current_time() + timeout
                if not self._waited:  # right after the request nothing can be there yet
                    self._waited = True
                    await self.stream.wait_readable(deadline)
                data = await self.stream.receive_some(deadline)
                if not data and not self._received:
                    # Closed before answering: on a reused connection, the upstream's idle
                    # close crossed our request (a plain UpstreamClosed may be resent).
                    raise UpstreamClosed(f"{self.url} closed the connection without responding")
                self._received = True
                conn.receive_data(data)
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"no response from {self.url} within {timeout:g}s") from exc
        except OSError as exc:
            raise UpstreamClosed(f"reading from {self.url}: {exc}") from exc

    def buffered_event(self) -> UpstreamEvent | None:
        return self._next_decoded()

    def _next_decoded(self) -> UpstreamEvent | None:
        """h11's next event as an UpstreamEvent; None when more input is needed.

        Whatever h11 refuses in a response is the upstream's fault (502), never the client's.
        """
        try:
            event: Any = self._h11.next_event()  # compared by type, fastest: no narrowing
        except h11.RemoteProtocolError as exc:
            raise UpstreamProtocolError(f"{self.url} sent a malformed response: {exc}") from exc
        kind = type(event)
        if kind is h11.Data:
            return bytes(event.data)
        if kind is h11.Response or kind is h11.InformationalResponse:
            return self._checked_head(event)
        if kind is h11.EndOfMessage:
            return BodyEnd(list(event.headers) or None)
        if event is h11.NEED_DATA:
            return None
        raise UpstreamClosed(f"{self.url} closed the connection mid-response")

    def _checked_head(self, event: h11.Response | h11.InformationalResponse) -> ResponseHead:
        """The response head, unless its framing is ambiguous. h11 lets Transfer-Encoding
        win over Content-Length and accepts any HTTP/x.y; a proxy must not guess (RFC 9112
        §6.3): such a response closes the connection, as nginx does."""
        if event.http_version not in (b"1.1", b"1.0"):
            raise UpstreamProtocolError(
                f"{self.url} answered with HTTP version {event.http_version!r}"
            )
        headers = list(event.headers)
        names = {name for name, _ in headers}
        if b"transfer-encoding" in names and b"content-length" in names:
            raise UpstreamProtocolError(
                f"{self.url} sent both Content-Length and Transfer-Encoding"
            )
        return ResponseHead(event.status_code, headers, event.http_version)

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """After the upstream's 101: the raw connection and the bytes read past its head.
        The connection is never pooled again (h11 stays in SWITCHED_PROTOCOL)."""
        del head  # the upstream sent it; nothing to send from this side
        return self._h11.trailing_data[0], self.stream

    def release(self) -> None:
        self._pool.release(self)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def ready_for_reuse(self) -> bool:
        """Both sides finished cleanly and nothing is left unread: bytes past the end of a
        response (more than its Content-Length) would otherwise be taken as the next
        request's response, possibly another client's."""
        leftover, closed = self._h11.trailing_data
        if leftover:
            log.warning(
                "%s sent %d bytes past the end of its response; connection not kept",
                self.url,
                len(leftover),
            )
        conn = self._h11
        if leftover or closed or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True

    def is_stale(self) -> bool:
        """An idle connection the upstream has closed (or sent junk on) must not be reused.

        Reading a byte is harmless: any byte arriving while idle makes the connection
        unusable. Over TLS the read also takes in session tickets sent after the handshake.
        """
        try:
            self.socket.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True
        return True  # EOF, or bytes nobody asked for


class H1Pool(Pool):
    """Idle connections to one upstream, most recently used first (warm sockets, and the
    upstream's idle timeout closes the cold ones at the other end)."""

    def __init__(self, upstream: Upstream, limits: LimitsConfig, connector: Connector) -> None:
        self.upstream = upstream
        self._limits = limits
        self._connector = connector
        self._idle: deque[H1UpstreamConnection] = deque()
        self._closed = False

    async def open_stream(self) -> H1UpstreamConnection:
        """A live idle connection, or a new one. Raises OSError or StreamTimeout."""
        return self.take_idle() or self.adopt(await self._connector.connect())

    def take_idle(self) -> H1UpstreamConnection | None:
        idle = self._idle
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_LIFETIME and not conn.is_stale():
                conn.reused = True
                return conn
            close_socket(conn.socket)
        return None

    def adopt(self, transport: Transport) -> H1UpstreamConnection:
        """A connection of this pool over a new `transport`."""
        return H1UpstreamConnection(transport, self, self._limits.max_header_bytes)

    def release(self, conn: H1UpstreamConnection) -> None:
        """Keep a connection whose exchange completed cleanly; close anything else."""
        if self._closed or not conn.ready_for_reuse():
            close_socket(conn.socket)
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        if len(self._idle) > self._limits.upstream_keepalive:
            close_socket(self._idle.popleft().socket)

    def close_all(self) -> None:
        """Close idle connections; those in use close when released (a retired pool)."""
        self._closed = True
        while self._idle:
            close_socket(self._idle.pop().socket)
