"""HTTP/2 upstream connections: the client role of the session engine (`proxy.h2session`).

Many requests share one connection, up to the upstream's SETTINGS_MAX_CONCURRENT_STREAMS;
the pool opens another connection when every one is full. Each connection's reader and writer
run in the `Upstreams` nursery, so it outlives the requests using it. The engine keeps flow
control both ways (request DATA within the upstream's windows, response DATA acknowledged
only as the client side consumes it, so a slow client slows the upstream down instead of
filling our memory); this role opens streams, turns responses into neutral events, and makes
streams the upstream did not process (REFUSED_STREAM, above a GOAWAY's last stream id) fail
as refused, which the forwarding core resends on another connection.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from proxy.config import LimitsConfig, Upstream
from proxy.h2session import Session, SessionStream, Setting, describe
from proxy.http.model import Headers, ResponseHead, UpstreamRequest
from proxy.netio import StreamTimeout, close_socket
from proxy.upstream.connect import Connector, OtherProtocol, Transport
from proxy.upstream.stream import (
    BodyEnd,
    Pool,
    UpstreamClosed,
    UpstreamEvent,
    UpstreamRefused,
    UpstreamStream,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], Awaitable[None]]], None]  # starts a task in the Upstreams nursery

IDLE_LIFETIME = 60.0  # seconds an unused connection is kept, as for HTTP/1.1 upstreams
STREAM_WINDOW = 256 * 1024  # response bytes one stream may have unconsumed: what we buffer
# As Go's HTTP/2 transport: stream windows bound our memory, the connection's never binds, or
# a few slow clients would hold the whole connection's window and stall every other stream.
CONNECTION_WINDOW = 1 << 30


def request_fields(request: UpstreamRequest, scheme: bytes) -> Headers:
    """HTTP/2 framing: pseudo-header fields first, the body's length when known. An
    upgrade is not asked for: HTTP/2 has none, so the request goes as a plain one."""
    fields: Headers = [
        (b":method", request.method),
        (b":scheme", scheme),
        (b":authority", request.authority),
        (b":path", request.target),
        *request.fields,
    ]
    if request.body_length is not None:
        fields.append((b"content-length", b"%d" % request.body_length))
    return fields


def response_head(headers: Iterable[tuple[bytes, bytes]]) -> ResponseHead:
    """A response (or 1xx) HEADERS block h2 has validated: :status is its only pseudo-field."""
    status = 0
    fields: Headers = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        else:
            fields.append((name, value))
    return ResponseHead(status, fields, b"2")


class H2UpstreamStream(SessionStream["H2UpstreamSession"], UpstreamStream):
    """One request on a shared connection: the `UpstreamStream` the forwarding core drives."""

    __slots__ = ("_body_taken", "_events", "finished", "reused", "url")

    def __init__(self, session: H2UpstreamSession, reused: bool) -> None:
        super().__init__(session, 0)  # the id is taken when the head is sent: in order
        self.url = session.url
        self.reused = reused
        self._events: deque[UpstreamEvent] = deque()
        self._body_taken = False  # the core took request body from the client for us
        self.finished = False

    # -- engine hooks ----------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        self.deliver(data)

    def _input_ended(self) -> None:
        self.deliver(BodyEnd(self.trailers))

    def _error_when_reset(self) -> Exception:
        return UpstreamClosed(f"{self.url} closed the request stream")

    def _error_reset_by_peer(self, code: ErrorCodes | int) -> Exception:
        if code == ErrorCodes.REFUSED_STREAM:  # RFC 9113 §8.7: not processed at all
            return UpstreamRefused(f"{self.url} refused the stream")
        name = code.name if isinstance(code, ErrorCodes) else code
        return UpstreamClosed(f"{self.url} reset the stream ({name})")

    def _error_from_h2(self, exc: h2.exceptions.ProtocolError) -> Exception:
        return UpstreamClosed(f"{self.url} closed the request stream: {exc}")

    def _error_stalled(self, timeout: float) -> Exception:
        return UpstreamTimeout(f"{self.url} took no request body for {timeout:g}s")

    def _unfinished_code(self) -> ErrorCodes:
        return ErrorCodes.CANCEL

    def _reset_error(self) -> Exception:
        error = super()._reset_error()
        if type(error) is UpstreamRefused and self._body_taken:
            # Not processed, but the body read from the client is gone: it cannot be resent.
            return UpstreamClosed(f"{error}, after the request body was sent")
        return error

    # -- events from the connection's reader -----------------------------------------------

    def deliver(self, event: UpstreamEvent) -> None:
        self._events.append(event)
        self._wake()

    # -- UpstreamStream --------------------------------------------------------------------

    async def send_head(self, request: UpstreamRequest, timeout: float) -> None:
        session = self.session
        end = not request.has_body
        self.stream_id = session.start(self, request_fields(request, session.scheme), end)
        self.sent_end = end

    async def send_data(self, data: bytes, timeout: float) -> None:
        self._body_taken = True
        await self._send_data(data, False, timeout)

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        self._body_taken = True
        self._send_end(trailers)

    async def next_event(self, timeout: float) -> UpstreamEvent:
        events = self._events
        while not events:
            if self.reset:
                raise self._reset_error()
            if not await self._wait_for_input(timeout):
                raise UpstreamTimeout(f"no response from {self.url} within {timeout:g}s")
        return self._take()

    def buffered_event(self) -> UpstreamEvent | None:
        return self._take() if self._events else None

    def release(self) -> None:
        self._finish()

    async def aclose(self) -> None:
        self._finish()

    # -- internals -------------------------------------------------------------------------

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.session.finish(self)

    def _take(self) -> UpstreamEvent:
        event = self._events.popleft()
        if type(event) is bytes:
            self._consumed(len(event))
        return event


class H2UpstreamSession(Session[H2UpstreamStream]):
    """One HTTP/2 connection to an upstream, shared by the requests its pool hands it."""

    def __init__(self, transport: Transport, pool: H2Pool, limits: LimitsConfig) -> None:
        super().__init__(
            transport.stream,
            client_side=True,
            validate_inbound=True,  # response fields go on to clients
            settings={
                Setting.ENABLE_PUSH: 0,
                Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                Setting.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            },
            connection_window=CONNECTION_WINDOW,
            write_timeout=limits.upstream_timeout,
            idle_timeout=IDLE_LIFETIME,
            first_idle_deadline=math.inf,  # the first stream is handed out at once
            peer_goaway_keeps_streams=True,
        )
        self.url = pool.upstream.url
        self.scheme = b"https" if pool.upstream.scheme == "https" else b"http"
        self._transport = transport
        self._pool = pool
        self._timeout = limits.upstream_timeout
        self._served = 0
        self._refusing = False  # no new stream may start: GOAWAY, failure, or closing
        handlers = self._handlers
        handlers[h2.events.ResponseReceived] = self._on_response
        handlers[h2.events.InformationalResponseReceived] = self._on_response

    # -- for the pool ----------------------------------------------------------------------

    async def handshake(self, deadline: float) -> None:
        """Send our preface, then wait for the upstream's SETTINGS: only they say how many
        streams it takes. Raises OSError (closed, or not HTTP/2) or StreamTimeout."""
        conn = self.h2
        stream = self._transport.stream
        await stream.send_all(self._take_output(), deadline)
        settled = False
        while not settled:
            data = await stream.receive_some(deadline)
            if not data:
                raise ConnectionResetError("does not speak HTTP/2: closed instead of SETTINGS")
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                raise ConnectionAbortedError(f"does not speak HTTP/2: {exc}") from exc
            for event in events:
                settled = settled or type(event) is h2.events.RemoteSettingsChanged
                self._dispatch(event)

    def has_room(self) -> bool:
        return not self._closing and self._active < self.h2.remote_settings.max_concurrent_streams

    def new_stream(self) -> H2UpstreamStream:
        stream = H2UpstreamStream(self, reused=self._served > 0)
        self._active += 1
        self._served += 1
        return stream

    async def run(self) -> None:
        """The reader and the writer, until the connection fails or closes."""
        try:
            await self._run()
        finally:
            self._refusing = True
            self._pool.discard(self)

    # -- for streams -----------------------------------------------------------------------

    def start(self, stream: H2UpstreamStream, fields: Headers, end: bool) -> int:
        """Send a request head on a new stream id; returns the id."""
        if self._refusing:
            raise UpstreamRefused(f"{self.url} is closing the connection")
        conn = self.h2
        stream_id = conn.get_next_available_stream_id()
        try:
            conn.send_headers(stream_id, fields, end)
        except h2.exceptions.TooManyStreamsError as exc:  # its limit went down meanwhile
            raise UpstreamRefused(f"{self.url}: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamClosed(f"cannot send the request to {self.url}: {exc}") from exc
        self._streams[stream_id] = stream
        self.wake_writer()
        return stream_id

    # -- engine hooks ----------------------------------------------------------------------

    def _closed_error(self) -> Exception:
        return UpstreamClosed(f"{self.url} connection closed")

    def _connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self._fail(UpstreamClosed(f"{self.url} closed the connection"))
        elif isinstance(exc, StreamTimeout):  # only writes have a deadline
            self._fail(UpstreamTimeout(f"{self.url} stopped reading for {self._timeout:g}s"))
        else:
            self._fail(UpstreamClosed(f"{self.url}: {exc}"))

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        self._fail(UpstreamClosed(f"HTTP/2 protocol error from {self.url}: {describe(exc)}"))

    def _goodbye(self) -> None:
        self._refusing = True
        super()._goodbye()

    def _on_response(
        self, event: h2.events.ResponseReceived | h2.events.InformationalResponseReceived
    ) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.deliver(response_head(event.headers))

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """No new streams here. Those above last_stream_id were never processed: they fail
        as refused, which the core retries on a new connection. Those at or below it go on
        (see keep_streams_after_goaway) until they end, then the connection closes."""
        last = event.last_stream_id or 0
        log.debug("upstream %s: GOAWAY %s, last stream %d", self.url, event.error_code, last)
        self._refusing = True
        self._pool.discard(self)
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last:
                self._cut_off(stream, UpstreamRefused(f"{self.url} refused the request (GOAWAY)"))
        self.close_when_idle()

    def _fail(self, error: UpstreamClosed | UpstreamTimeout) -> None:
        """The connection is broken: every stream on it fails, both tasks end."""
        log.debug("upstream %s: connection failed: %s", self.url, error)
        self._closing = self._refusing = True
        self._cut_off_all(error)
        self._abort()


class _Attempt:
    """A connection being opened; others wanting a stream wait for it instead of opening
    their own, so a burst of requests fills connections one by one."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: OSError | StreamTimeout | None = None


class H2Pool(Pool):
    """The HTTP/2 connections to one upstream; streams go to the oldest one with room."""

    def __init__(
        self, upstream: Upstream, limits: LimitsConfig, connector: Connector, spawn: Spawn
    ) -> None:
        self.upstream = upstream
        self._limits = limits
        self._connector = connector
        self._spawn = spawn
        self._connections: list[H2UpstreamSession] = []
        self._attempt: _Attempt | None = None
        self._closed = False  # retired: connections close once their streams are done

    async def open_stream(self) -> H2UpstreamStream:
        """A stream on a connection with room, or on a new one. Raises OSError or
        StreamTimeout; OtherProtocol when ALPN chose HTTP/1.1 for the new connection."""
        while True:
            for conn in self._connections:
                if conn.has_room():
                    return conn.new_stream()
            attempt = self._attempt
            if attempt is None:
                break
            await attempt.done.wait()
            if attempt.error is not None:
                raise copy.copy(attempt.error)
        return self._first_stream(await self._connect())

    async def adopt(self, transport: Transport) -> H2UpstreamStream:
        """A stream on a new connection over `transport`, which ALPN made HTTP/2."""
        return self._first_stream(await self._start(transport))

    async def _connect(self) -> H2UpstreamSession:
        attempt = self._attempt = _Attempt()
        try:
            transport = await self._connector.connect()
            if transport.protocol != "h2":
                raise OtherProtocol(transport)
            return await self._start(transport)
        except (OSError, StreamTimeout) as exc:
            attempt.error = exc
            raise
        finally:
            self._attempt = None
            attempt.done.set()

    async def _start(self, transport: Transport) -> H2UpstreamSession:
        conn = H2UpstreamSession(transport, self, self._limits)
        try:
            await conn.handshake(trio.current_time() + self._limits.upstream_connect_timeout)
            self._spawn(conn.run)
        except BaseException:
            close_socket(transport.socket)
            raise
        self._connections.append(conn)
        return conn

    def _first_stream(self, conn: H2UpstreamSession) -> H2UpstreamStream:
        stream = conn.new_stream()
        if self._closed:  # a retired pool: the new connection serves this request only
            conn.close_when_idle()
        return stream

    def discard(self, conn: H2UpstreamSession) -> None:
        """`conn` takes no more streams (GOAWAY, failure, closing)."""
        if conn in self._connections:
            self._connections.remove(conn)

    def close_all(self) -> None:
        """Retire the pool's connections: each closes once its streams have finished."""
        self._closed = True
        for conn in list(self._connections):
            conn.close_when_idle()
