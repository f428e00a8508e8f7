"""HTTP/2 upstream connections (h2, client role), multiplexed, and their pool.

Many requests share one connection, up to the upstream's SETTINGS_MAX_CONCURRENT_STREAMS;
the pool opens another connection when every one is full. Each connection has a reader and
a writer task in the `Upstreams` nursery, so it outlives the requests using it. Request
tasks change h2's state and wake the writer, which sends all that is queued in one write:
frames of many streams coalesce. Flow control gives backpressure both ways: request DATA is
queued only within the upstream's windows (and while the writer keeps up), response DATA is
acknowledged only as the client side consumes it, so a slow client slows the upstream down
instead of filling our memory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes

from proxy.config import LimitsConfig, Upstream
from proxy.http.model import Headers, ResponseHead, UpstreamRequest
from proxy.netio import CoalescingWriter, StreamTimeout, close_socket
from proxy.upstream.connect import Connector, OtherProtocol, Transport
from proxy.upstream.stream import (
    BodyEnd,
    UpstreamClosed,
    UpstreamEvent,
    UpstreamRefused,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], Awaitable[None]]], None]  # starts a task in the Upstreams nursery

IDLE_LIFETIME = 60.0  # seconds an unused connection is kept, as for HTTP/1.1 upstreams
DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2: every window starts here until SETTINGS/WINDOW_UPDATE
STREAM_WINDOW = 256 * 1024  # response bytes one stream may have unconsumed: what we buffer
# As Go's HTTP/2 transport: stream windows bound our memory, the connection's never binds, or
# a few slow clients would hold the whole connection's window and stall every other stream.
CONNECTION_WINDOW = 1 << 30
OUTPUT_HIGH_WATER = 256 * 1024  # request bytes queued behind a busy writer before senders wait
Setting = h2.settings.SettingCodes
ConnectionState = h2.connection.ConnectionState
ConnectionInputs = h2.connection.ConnectionInputs

# Outbound fields come from the forwarding core, already clean: h2's per-byte validation of
# them would cost more than the rest of the request. Responses are validated: their fields
# go on to clients.
_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class _GoawayKeepsStreams(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY from the upstream leaves it open.

    RFC 9113 §6.8: streams up to the GOAWAY's last stream id may still complete, but h2 closes
    the connection on any GOAWAY (python-hyper/h2 issue 1181) and then refuses their frames,
    even those that arrived in the same read. We open no stream after a GOAWAY ourselves.
    """

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY): (
            None,
            ConnectionState.CLIENT_OPEN,
        ),
    }


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


class H2UpstreamStream:
    """One request on a shared connection: the `UpstreamStream` the forwarding core drives."""

    __slots__ = (
        "_arrived",
        "_body_taken",
        "_conn",
        "_error",
        "_events",
        "_may_send",
        "_trailers",
        "finished",
        "local_done",
        "remote_done",
        "reused",
        "stream_id",
        "unread",
        "url",
    )

    def __init__(self, conn: H2UpstreamConnection, reused: bool) -> None:
        self._conn = conn
        self.url = conn.url
        self.reused = reused
        self.stream_id = 0  # taken when the head is sent: h2 stream ids must be used in order
        self._events: deque[UpstreamEvent] = deque()
        self._trailers: Headers | None = None
        self._error: UpstreamClosed | UpstreamTimeout | None = None
        self._arrived: trio.Event | None = None
        self._may_send: trio.Event | None = None
        self.unread = 0  # response bytes received and not yet consumed (not acknowledged)
        self._body_taken = False  # the core took request body from the client for us
        self.local_done = False  # our END_STREAM is queued
        self.remote_done = False  # the upstream ended or reset the stream
        self.finished = False

    # -- events routed by the connection's reader ------------------------------------------

    def deliver(self, event: UpstreamEvent) -> None:
        self._events.append(event)
        if self._arrived is not None:
            self._arrived.set()

    def data_received(self, data: bytes, flow_length: int) -> None:
        if data:
            self.unread += len(data)
            self.deliver(data)
        if flow_length > len(data):  # padding: nothing to consume, give the window back now
            self._conn.acknowledge(self, flow_length - len(data))

    def trailers_received(self, trailers: Headers) -> None:
        self._trailers = trailers

    def ended(self) -> None:
        self.remote_done = True
        self.deliver(BodyEnd(self._trailers))

    def fail(self, error: UpstreamClosed | UpstreamTimeout) -> None:
        """The stream cannot go on; events already received are still consumed first."""
        if self._error is None:
            self._error = error
        if self._arrived is not None:
            self._arrived.set()
        self.may_send()

    def may_send(self) -> None:
        if self._may_send is not None:
            self._may_send.set()

    # -- UpstreamStream --------------------------------------------------------------------

    async def send_head(self, request: UpstreamRequest, timeout: float) -> None:
        conn = self._conn
        end = not request.has_body
        self.stream_id = conn.start(self, request_fields(request, conn.scheme), end)
        self.local_done = end

    async def send_data(self, data: bytes, timeout: float) -> None:
        """Queue DATA within the upstream's windows, waiting for WINDOW_UPDATE (or for the
        writer to catch up) when there is no room."""
        self._body_taken = True
        conn = self._conn
        h2conn = conn.h2
        stream_id = self.stream_id
        view = memoryview(data)
        while view:
            self._raise_error()
            try:
                window = h2conn.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise UpstreamClosed(f"{self.url} closed the request stream") from exc
            if window <= 0 or conn.queued >= OUTPUT_HIGH_WATER:
                await self._wait_until_sendable(timeout)
                continue
            size = min(window, h2conn.max_outbound_frame_size, len(view))
            conn.call(h2conn.send_data, stream_id, view[:size] if size < len(view) else view)
            conn.queued += size
            view = view[size:]
        conn.wake_writer()

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        self._body_taken = True
        self._raise_error()
        conn = self._conn
        if trailers:
            conn.call(conn.h2.send_headers, self.stream_id, trailers, True)
        else:
            conn.call(conn.h2.end_stream, self.stream_id)
        self.local_done = True
        conn.wake_writer()

    async def next_event(self, timeout: float) -> UpstreamEvent:
        events = self._events
        while not events:
            self._raise_error()
            arrived = self._arrived = trio.Event()
            with trio.move_on_after(timeout):
                await arrived.wait()
            if not arrived.is_set():
                raise UpstreamTimeout(f"no response from {self.url} within {timeout:g}s")
        return self._take()

    def buffered_event(self) -> UpstreamEvent | None:
        return self._take() if self._events else None

    def release(self) -> None:
        self._conn.finish(self)

    async def aclose(self) -> None:
        self._conn.finish(self)

    # -- internals -------------------------------------------------------------------------

    def _take(self) -> UpstreamEvent:
        event = self._events.popleft()
        if type(event) is bytes:
            self.unread -= len(event)
            self._conn.acknowledge(self, len(event))
        return event

    def _raise_error(self) -> None:
        error = self._error
        if error is None:
            return
        if type(error) is UpstreamRefused and self._body_taken:
            # Not processed, but the body read from the client is gone: it cannot be resent.
            raise UpstreamClosed(f"{error}, after the request body was sent")
        raise copy.copy(error)  # one exception object per raise: tasks may share an error

    async def _wait_until_sendable(self, timeout: float) -> None:
        conn = self._conn
        may_send = self._may_send = trio.Event()
        conn.blocked.add(self)
        try:
            with trio.move_on_after(timeout):
                await may_send.wait()
        finally:
            conn.blocked.discard(self)
        if not may_send.is_set():
            raise UpstreamTimeout(f"{self.url} took no request body for {timeout:g}s")


class H2UpstreamConnection:
    """One HTTP/2 connection to an upstream: h2 state, its streams, a reader and a writer."""

    def __init__(self, transport: Transport, pool: H2Pool, limits: LimitsConfig) -> None:
        self.url = pool.upstream.url
        self.scheme = b"https" if pool.upstream.scheme == "https" else b"http"
        self._transport = transport
        self._pool = pool
        self._timeout = limits.upstream_timeout
        conn = self.h2 = h2.connection.H2Connection(_CONFIG)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                Setting.ENABLE_PUSH: 0,
                Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                Setting.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
            },
        )
        conn.decoder.max_header_list_size = limits.max_header_bytes
        conn.state_machine = _GoawayKeepsStreams()
        self._streams: dict[int, H2UpstreamStream] = {}  # by id, once the head is sent
        self._active = 0  # streams handed out and not finished: they count against the limit
        self._served = 0
        self.blocked: set[H2UpstreamStream] = set()  # streams waiting to send request DATA
        self.queued = 0  # request bytes handed to h2 since the writer last took its output
        self._unsent = bytearray()  # h2's output taken by the reader, for the writer to send
        self._usable = True  # the pool may hand out new streams on it
        self._refusing = False  # no new stream may start: GOAWAY, failure, or closing
        self._writer = CoalescingWriter(
            transport.stream, self._timeout, self._take_for_writer, self._unblock_all
        )
        self._idle = trio.CancelScope()  # its deadline is the idle timeout; cancelled when done
        self._scope: trio.CancelScope | None = None

    # -- for the pool ----------------------------------------------------------------------

    async def handshake(self, deadline: float) -> None:
        """Send our preface, then wait for the upstream's SETTINGS: only they say how many
        streams it takes. Raises OSError (closed, or not HTTP/2) or StreamTimeout."""
        conn = self.h2
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        stream = self._transport.stream
        await stream.send_all(conn.data_to_send(), deadline)
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
        return self._usable and self._active < self.h2.remote_settings.max_concurrent_streams

    def new_stream(self) -> H2UpstreamStream:
        stream = H2UpstreamStream(self, reused=self._served > 0)
        self._active += 1
        self._served += 1
        self._idle.deadline = math.inf
        return stream

    def close_when_idle(self) -> None:
        """Take no new streams; close once those in flight have finished."""
        self._usable = False
        if not self._active:
            self._idle.cancel()

    async def run(self) -> None:
        """The reader and the writer, until the connection fails or closes."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._write_loop)
                if await self._read_loop():
                    self._writer.close()  # flush our GOAWAY, then the writer ends
        finally:
            self._usable = False
            self._refusing = True
            self._pool.discard(self)
            self._fail_streams(UpstreamClosed(f"{self.url} connection closed"))
            await self._transport.stream.aclose()

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

    def call(self, send: Callable[..., None], *args: object) -> None:
        """An h2 send call on a stream; h2 refuses it once the upstream closed or reset it."""
        try:
            send(*args)
        except h2.exceptions.ProtocolError as exc:
            raise UpstreamClosed(f"{self.url} closed the request stream: {exc}") from exc

    def acknowledge(self, stream: H2UpstreamStream, size: int) -> None:
        """Response bytes consumed: open the windows again (h2 decides when to send
        WINDOW_UPDATE). Also done for streams already closed: the connection window counts."""
        try:
            self.h2.acknowledge_received_data(size, stream.stream_id)
        except h2.exceptions.ProtocolError:
            return  # the connection is gone: no window to open
        self._take_output()

    def finish(self, stream: H2UpstreamStream) -> None:
        """The exchange ended, completed or not: give back the window of what was never
        consumed, reset the stream unless both sides ended it, free its slot."""
        if stream.finished:
            return
        stream.finished = True
        stream_id = stream.stream_id
        if stream_id and self._streams.pop(stream_id, None) is not None:
            conn = self.h2
            try:
                if stream.unread:
                    conn.acknowledge_received_data(stream.unread, stream_id)
                if not (stream.local_done and stream.remote_done):
                    conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # already closed in h2, or the connection is gone
            self._take_output()
        self.blocked.discard(stream)
        self._active -= 1
        if not self._active:
            if self._usable:
                self._idle.deadline = trio.current_time() + IDLE_LIFETIME
            else:
                self._idle.cancel()

    def wake_writer(self) -> None:
        self._writer.wake()

    def _take_output(self) -> None:
        """Hand what h2 queued (if anything) to the writer: most acknowledgments queue no
        WINDOW_UPDATE, and waking the writer for nothing costs a task switch."""
        data = self.h2.data_to_send()
        if data:
            self._unsent += data
            self._writer.wake()

    # -- reading ---------------------------------------------------------------------------

    async def _read_loop(self) -> bool:
        """Read and dispatch until the connection fails (False: its streams fail with it),
        or is idle or drained after GOAWAY or close_all (True: our GOAWAY is queued)."""
        while True:
            with self._idle:
                await self._receive_and_dispatch()
                return False
            if not self._active:
                break
            # A request took a stream just as the idle timeout fired: keep serving it.
            self._idle = trio.CancelScope()
        self._usable = False
        self._refusing = True
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
        return True

    async def _receive_and_dispatch(self) -> None:
        """Returns when the connection failed, after failing it."""
        conn = self.h2
        receive = self._transport.stream.receive_some
        while True:
            try:
                data = await receive()
            except OSError as exc:
                self._fail(UpstreamClosed(f"reading from {self.url}: {exc}"))
                return
            if not data:
                self._fail(UpstreamClosed(f"{self.url} closed the connection"))
                return
            try:
                # h2 drops output not yet taken when a GOAWAY arrives, which may include
                # frames of streams it lets finish: take it first.
                self._unsent += conn.data_to_send()
                for event in conn.receive_data(data):
                    self._dispatch(event)
            except h2.exceptions.ProtocolError as exc:
                self._fail(UpstreamClosed(f"HTTP/2 protocol error from {self.url}: {exc}"))
                return
            finally:
                self.wake_writer()

    def _dispatch(self, event: h2.events.Event) -> None:
        streams = self._streams
        if isinstance(event, h2.events.DataReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.data_received(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:  # nobody will read it: give the window back
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(
            event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived
        ):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.deliver(response_head(event.headers))
        elif isinstance(event, h2.events.TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers_received(list(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.ended()
        elif isinstance(event, h2.events.StreamReset):
            self._stream_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                self._unblock_all()
            elif (stream := streams.get(event.stream_id)) is not None:
                stream.may_send()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._unblock_all()  # the initial window or max frame size may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event)

    def _stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.remote_done = stream.local_done = True  # nothing more goes either way
        code = event.error_code
        if code == ErrorCodes.REFUSED_STREAM:  # RFC 9113 §8.7: not processed at all
            stream.fail(UpstreamRefused(f"{self.url} refused the stream"))
        else:
            name = code.name if isinstance(code, ErrorCodes) else code
            stream.fail(UpstreamClosed(f"{self.url} reset the stream ({name})"))

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """No new streams here. Those above last_stream_id were never processed: they fail
        as refused, which the core retries on a new connection. Those at or below it go on
        (see _GoawayKeepsStreams) until they end, then the connection closes."""
        last = event.last_stream_id or 0
        log.debug("upstream %s: GOAWAY %s, last stream %d", self.url, event.error_code, last)
        self._usable = False
        self._refusing = True
        self._pool.discard(self)
        for stream_id, stream in self._streams.items():
            if stream_id > last:
                stream.remote_done = stream.local_done = True
                stream.fail(UpstreamRefused(f"{self.url} refused the request (GOAWAY)"))
        if not self._active:
            self._idle.cancel()

    def _fail(self, error: UpstreamClosed | UpstreamTimeout) -> None:
        """The connection is broken: every stream on it fails, both tasks end."""
        log.debug("upstream %s: connection failed: %s", self.url, error)
        self._usable = False
        self._refusing = True
        self._fail_streams(error)
        if self._scope is not None:
            self._scope.cancel()

    def _fail_streams(self, error: UpstreamClosed | UpstreamTimeout) -> None:
        for stream in self._streams.values():
            stream.fail(error)

    def _unblock_all(self) -> None:
        for stream in self.blocked:
            stream.may_send()

    # -- writing ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            await self._writer.run()
        except StreamTimeout:
            self._fail(UpstreamTimeout(f"{self.url} stopped reading for {self._timeout:g}s"))
        except OSError as exc:
            self._fail(UpstreamClosed(f"sending to {self.url}: {exc}"))

    def _take_for_writer(self) -> bytes:
        """What the reader took from h2 earlier, then what h2 queued since."""
        data = self.h2.data_to_send()
        if self._unsent:
            data = bytes(self._unsent) + data
            self._unsent.clear()
        if data:
            self.queued = 0
        return data


class _Attempt:
    """A connection being opened; others wanting a stream wait for it instead of opening
    their own, so a burst of requests fills connections one by one."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: OSError | StreamTimeout | None = None


class H2Pool:
    """The HTTP/2 connections to one upstream; streams go to the oldest one with room."""

    def __init__(
        self, upstream: Upstream, limits: LimitsConfig, connector: Connector, spawn: Spawn
    ) -> None:
        self.upstream = upstream
        self._limits = limits
        self._connector = connector
        self._spawn = spawn
        self._connections: list[H2UpstreamConnection] = []
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

    async def _connect(self) -> H2UpstreamConnection:
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

    async def _start(self, transport: Transport) -> H2UpstreamConnection:
        conn = H2UpstreamConnection(transport, self, self._limits)
        try:
            await conn.handshake(trio.current_time() + self._limits.upstream_connect_timeout)
            self._spawn(conn.run)
        except BaseException:
            close_socket(transport.socket)
            raise
        self._connections.append(conn)
        return conn

    def _first_stream(self, conn: H2UpstreamConnection) -> H2UpstreamStream:
        stream = conn.new_stream()
        if self._closed:  # a retired pool: the new connection serves this request only
            conn.close_when_idle()
        return stream

    def discard(self, conn: H2UpstreamConnection) -> None:
        """`conn` takes no more streams (GOAWAY, failure, closing)."""
        if conn in self._connections:
            self._connections.remove(conn)

    def close_all(self) -> None:
        """Retire the pool's connections: each closes once its streams have finished."""
        self._closed = True
        for conn in list(self._connections):
            conn.close_when_idle()
