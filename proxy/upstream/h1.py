"""HTTP/1.1 upstream connections (requests written by `h1_writer`, responses parsed by
`h1_parser`) and their keep-alive pool."""

from __future__ import annotations

import base64
import logging
import os
import ssl
from collections import deque

import trio

from proxy.config import LimitsConfig, Upstream
from proxy.http.h1_parser import NEED_DATA, H1Parser, MessageEnd, MessageHead, ParseError
from proxy.http.h1_writer import FramingError, RequestWriter
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
        "_keep_alive",
        "_max_head",
        "_parser",
        "_pool",
        "_received",
        "_waited",
        "_writer",
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
        self._max_head = max_head_bytes
        self._parser = H1Parser(request=False, max_head_bytes=max_head_bytes)
        self._writer = RequestWriter()
        self._keep_alive = False  # what the response in progress allows
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

    def _unforwardable(self, exc: FramingError) -> UnforwardableRequest:
        """A body that does not match the request's declared length is the client's doing
        (its front end checks lengths as the data comes): the client's fault."""
        return UnforwardableRequest(f"cannot forward to {self.url}: {exc}")

    async def send_head(self, request: UpstreamRequest, timeout: float) -> None:
        self._writer = writer = RequestWriter()
        data = writer.head(
            request.method,
            request.target,
            h1_fields(request),
            body_length=request.body_length,
            has_body=request.has_body,
        )
        if not request.has_body:  # head and end of message in one write
            data += writer.end()
        self._parser.bodiless_response = request.method == b"HEAD"
        self._waited = self._received = False
        await self._send(data, timeout)

    async def send_data(self, data: bytes, timeout: float) -> None:
        try:
            framed = self._writer.data(data)
        except FramingError as exc:
            raise self._unforwardable(exc) from exc
        await self._send(framed, timeout)

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        try:
            framed = self._writer.end(trailers)
        except FramingError as exc:
            raise self._unforwardable(exc) from exc
        await self._send(framed, timeout)

    async def next_event(self, timeout: float) -> UpstreamEvent:
        parser = self._parser
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
                parser.receive_data(data)
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"no response from {self.url} within {timeout:g}s") from exc
        except OSError as exc:
            raise UpstreamClosed(f"reading from {self.url}: {exc}") from exc

    def buffered_event(self) -> UpstreamEvent | None:
        return self._next_decoded()

    def _next_decoded(self) -> UpstreamEvent | None:
        """The parser's next event as an UpstreamEvent; None when more input is needed.

        Whatever the parser refuses in a response is the upstream's fault (502), never the
        client's.
        """
        try:
            event = self._parser.next_event()
        except ParseError as exc:
            raise UpstreamProtocolError(f"{self.url} sent a malformed response: {exc}") from exc
        if type(event) is bytes:
            return event
        if type(event) is MessageHead:
            return self._checked_head(event)
        if type(event) is MessageEnd:
            return BodyEnd(event.trailers)
        if event is NEED_DATA:
            return None
        raise UpstreamClosed(f"{self.url} closed the connection mid-response")

    def _checked_head(self, head: MessageHead) -> ResponseHead:
        """The response head, unless its framing is one a proxy must not guess at (RFC 9112
        §6.3): such a response closes the connection, as nginx does. The parser already
        refused Content-Length with Transfer-Encoding and any coding but a final chunked."""
        version = head.http_version
        if version != b"1.1" and version != b"1.0":
            raise UpstreamProtocolError(f"{self.url} answered with HTTP version {version!r}")
        keep_alive = version == b"1.1"
        for name, value in head.headers:
            if name == b"transfer-encoding" and value != b"chunked":
                raise UpstreamProtocolError(
                    f"{self.url} sent Transfer-Encoding {value!r}, not exactly chunked"
                )
            if name == b"connection" and b"close" in value.lower():
                keep_alive = False
        self._keep_alive = keep_alive
        return ResponseHead(head.status, head.headers, version)

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """After the upstream's 101: the raw connection and the bytes read past its head.
        The connection is never pooled again (the parser stopped at the 101)."""
        del head  # the upstream sent it; nothing to send from this side
        return self._parser.trailing_data, self.stream

    def release(self) -> None:
        self._pool.release(self)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def ready_for_reuse(self) -> bool:
        """Both sides finished cleanly and nothing is left unread: bytes past the end of a
        response (more than its Content-Length) would otherwise be taken as the next
        request's response, possibly another client's."""
        parser = self._parser
        leftover = parser.trailing_data
        if leftover or parser.overrun:
            log.warning(
                "%s sent %s bytes past the end of its response; connection not kept",
                self.url,
                len(leftover) or "more",
            )
            return False
        if not (parser.complete and self._writer.complete and self._keep_alive):
            return False
        if parser.closed or parser.upgraded:
            return False
        self._parser = H1Parser(request=False, max_head_bytes=self._max_head)
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
