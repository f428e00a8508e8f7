"""HTTP/2 front end: the server role of the session engine (`proxy.h2session`).

The engine reads, writes and keeps flow control both ways; this role accepts streams and runs
the forwarding handler for each in its own task, so a slow stream never stalls the others. It
adds the flood guard (`proxy.http.h2_guard`), the header and keep-alive timeouts, and draining
with GOAWAY. h2's own header validation is off: `proxy.http.h2_fields` does it for less and
makes a malformed request a stream error, not a connection error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from proxy.config import Http2Config, LimitsConfig
from proxy.connections import Slot
from proxy.h2session import Session, SessionStream, Setting, describe
from proxy.http.h2_fields import Malformed, request_from_headers, trailers_from_headers
from proxy.http.h2_guard import EnhanceYourCalm, FloodGuard
from proxy.http.model import (
    ClientGone,
    ConnectionInfo,
    Exchange,
    Headers,
    Request,
    ResponseHead,
    Upgradable,
)
from proxy.netio import NO_DEADLINE, ByteStream

log = logging.getLogger(__name__)

Handler = Callable[["H2ServerStream"], Awaitable[None]]

STATUS = {code: str(code).encode("ascii") for code in range(100, 1000)}


class H2ServerStream(SessionStream["H2ServerSession"], Exchange, Upgradable):
    """One request stream: the `Exchange` the forwarding core drives."""

    __slots__ = ("_continue", "_inbox", "_tunnel", "head_sent", "info", "request", "scope")

    def __init__(self, session: H2ServerSession, stream_id: int, request: Request) -> None:
        # An extended CONNECT (request.upgrade) keeps its input open for the tunnel.
        received_end = not request.has_body and request.upgrade is None
        super().__init__(session, stream_id, received_end=received_end)
        self.request = request
        self._tunnel = False  # carrying an upgraded protocol's bytes (RFC 8441)
        self.info = session.info
        self.head_sent = False
        self.scope = trio.CancelScope()
        self._inbox: deque[bytes] = deque()
        self._continue = request.has_body and any(
            name == b"expect" and value.lower() == b"100-continue"
            for name, value in request.headers
        )

    # -- engine hooks ------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        self._inbox.append(data)
        self._wake()

    def _input_ended(self) -> None:
        self._wake()

    def _cut_off(self, error: Exception) -> None:
        """Reset by the client, or the connection is going: stop the handler now."""
        super()._cut_off(error)
        self.scope.cancel()

    def _error_when_reset(self) -> Exception:
        return ClientGone("stream reset")

    def _error_reset_by_peer(self, code: ErrorCodes | int) -> Exception:
        return ClientGone("stream reset")

    def _error_from_h2(self, exc: h2.exceptions.ProtocolError) -> Exception:
        return ClientGone(f"stream {self.stream_id}: {exc}")

    def _error_stalled(self, timeout: float) -> Exception:
        self.session.stream_stalled()
        return self._stalled("response body", timeout)

    def _finishing_code(self) -> ErrorCodes | None:
        if self._tunnel and not (self.reset or self.sent_end):
            with contextlib.suppress(ClientGone):
                self._send_end(None)  # the tunnel closed in order: END_STREAM, not an error
        return super()._finishing_code()

    def _unfinished_code(self) -> ErrorCodes:
        # A complete response before the whole request (e.g. 413): the client may stop
        # sending (RFC 9113 §8.1). A response cut short is an error.
        return ErrorCodes.NO_ERROR if self.sent_end else ErrorCodes.INTERNAL_ERROR

    # -- Exchange ------------------------------------------------------------------------

    @property
    def request_trailers(self) -> Headers | None:
        return self.trailers

    async def receive_data(self) -> bytes:
        while not self._inbox:
            if self.received_end:
                return b""
            if self.reset:
                raise self._reset_error()
            if self._continue:  # the client waits for this before sending the body
                self._continue = False
                self._send_headers([(b":status", STATUS[100])], False)
                self.session.wake_writer()
            timeout = self.session.limits.client_timeout
            if not await self._wait_for_input(timeout):
                raise self._stalled("request body", timeout)
        data = self._inbox.popleft()
        self._consumed(len(data))
        return data

    async def send_informational(self, head: ResponseHead) -> None:
        # We answer Expect ourselves when the body is first read (as the HTTP/1.1 front end
        # does), and HTTP/2 has no 101 (RFC 9113 §8.6).
        if head.status not in (100, 101):
            self._send_headers([(b":status", STATUS[head.status]), *head.headers], False)
            self.session.wake_writer()

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        if self.request.method == b"HEAD":
            body = b""
        self.head_sent = True
        self._continue = False
        self._send_headers([(b":status", STATUS[head.status]), *head.headers], end and not body)
        if body:
            await self._send_data(body, end, self.session.stall_timeout)
        else:
            self.session.wake_writer()

    async def send_data(self, data: bytes) -> None:
        await self._send_data(data, False, self.session.stall_timeout)

    async def send_end(self, trailers: Headers | None = None) -> None:
        self._send_end(trailers)

    async def abort(self) -> None:
        self._reset(ErrorCodes.INTERNAL_ERROR)

    # -- Upgradable: extended CONNECT (RFC 8441) ----------------------------------------------

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """The upstream accepted the upgrade (its 101): the client gets 200, without the
        HTTP/1.1 upgrade fields, and the stream's DATA carries the protocol from now on."""
        assert head is not None
        fields = [field for field in head.headers if field[0] not in _NOT_FOR_CONNECT]
        self.head_sent = self._tunnel = True
        self._send_headers([(b":status", STATUS[200]), *fields], False)
        self.session.wake_writer()
        return b"", _StreamTunnel(self)

    async def tunnel_receive(self) -> bytes:
        """The next tunnel bytes; b"" once the client ended or reset the stream. No idle
        timeout: tunnelled applications (WebSocket) keep their own pings, as over HTTP/1.1."""
        while not self._inbox:
            if self.received_end or self.reset:
                return b""
            await self._wait_for_input(math.inf)
        data = self._inbox.popleft()
        self._consumed(len(data))
        return data

    def _stalled(self, what: str, timeout: float) -> ClientGone:
        return ClientGone(f"stream {self.stream_id}: client stalled the {what} for {timeout:g}s")


# What an HTTP/1.1 101 carries that a 200 to extended CONNECT must not (RFC 8441 §5).
_NOT_FOR_CONNECT = frozenset({b"connection", b"upgrade", b"sec-websocket-accept"})


class _StreamTunnel(ByteStream):
    """An upgraded stream as the byte stream the forwarder's tunnel carries."""

    __slots__ = ("_stream",)

    def __init__(self, stream: H2ServerStream) -> None:
        self._stream = stream

    async def receive_some(self, deadline: float = NO_DEADLINE) -> bytes:
        return await self._stream.tunnel_receive()

    async def wait_readable(self, deadline: float = NO_DEADLINE) -> None:
        """Nothing to wait for ahead of `receive_some`, which waits itself."""

    async def send_all(self, data: bytes | memoryview, deadline: float = NO_DEADLINE) -> None:
        try:
            await self._stream.send_data(bytes(data))
        except ClientGone as exc:  # the carrying loop ends on OSError
            raise ConnectionResetError(f"client stream closed: {exc}") from exc

    async def aclose(self) -> None:
        """The stream ends when its exchange does (END_STREAM, see `_finishing_code`)."""


class H2ServerSession(Session[H2ServerStream]):
    """Serves one client connection that negotiated ALPN h2, until it closes or idles out."""

    LINGERS = True
    PAUSES_READING = True

    def __init__(
        self,
        stream: ByteStream,
        info: ConnectionInfo,
        handler: Handler,
        limits: LimitsConfig,
        http2: Http2Config,
        slot: Slot,
    ) -> None:
        super().__init__(
            stream,
            client_side=False,
            validate_inbound=False,  # request_from_headers does it
            settings={
                Setting.MAX_CONCURRENT_STREAMS: http2.max_concurrent_streams,
                Setting.INITIAL_WINDOW_SIZE: http2.initial_window_size,
                Setting.MAX_FRAME_SIZE: http2.max_frame_size,
                Setting.MAX_HEADER_LIST_SIZE: http2.max_header_list_size,
                Setting.ENABLE_PUSH: 0,
                Setting.ENABLE_CONNECT_PROTOCOL: 1,  # WebSocket over HTTP/2 (RFC 8441)
            },
            connection_window=http2.connection_window_size,
            write_timeout=limits.client_timeout,
            # header_timeout for the first request, then keepalive_timeout after the last
            # stream ends.
            idle_timeout=limits.keepalive_timeout,
            first_idle_deadline=trio.current_time() + limits.header_timeout,
            peer_goaway_keeps_streams=False,  # the client's GOAWAY ends the connection
        )
        self._handler = handler
        self._slot = slot
        self._guard = FloodGuard(http2)
        self.info = info
        self.limits = limits
        # A response waiting this long for the client's window (or the writer) is reset.
        self.stall_timeout = min(float(http2.stall_timeout), limits.client_timeout)
        self._priority_of_request: h2.events.PriorityUpdated | None = None
        handlers = self._handlers
        handlers[h2.events.RequestReceived] = self._open_stream
        handlers[h2.events.PriorityUpdated] = self._on_priority
        handlers[h2.events.PingReceived] = self._on_control_frame
        handlers[h2.events.UnknownFrameReceived] = self._on_control_frame

    async def serve(self) -> None:
        self._slot.register(self)
        self._slot.idle()  # no stream open: may be closed to make room
        try:
            if self._slot.draining:
                self.go_away()
            await self._run()
        except Exception:  # a bug must cost this connection, not the process
            log.exception("client %s: HTTP/2 connection failed", self.info.client_ip)
        finally:
            self._slot.unregister(self)

    def close_if_idle(self) -> None:
        """Drain, or room for new clients (`Slot`): GOAWAY with the last stream id;
        in-flight streams finish."""
        self.go_away()

    # -- engine hooks ----------------------------------------------------------------------

    def _closed_error(self) -> Exception:
        return ClientGone("connection closed")

    def _connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("client %s: h2 connection ended: %r", self.info.client_ip, exc)

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        log.info("client %s: HTTP/2 protocol error: %s", self.info.client_ip, describe(exc))

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> bool:
        log.debug("client %s: %r", self.info.client_ip, event)
        return True

    async def _read_frames(self) -> None:
        try:
            await super()._read_frames()
        except EnhanceYourCalm as exc:
            log.warning("client %s: HTTP/2 flood: %s", self.info.client_ip, exc)
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, str(exc).encode())
            self.flush()

    def stream_stalled(self) -> None:
        """A stream's response got no room to send for `stall_timeout` (it is reset). If every
        other stream waits for room too, the client reads nothing: close the connection now,
        which ends all their upstream requests, rather than one stream at a time."""
        if len(self._blocked) + 1 >= self._active:
            log.info(
                "client %s: HTTP/2 client read nothing for %gs (%d streams stalled): closing",
                self.info.client_ip,
                self.stall_timeout,
                self._active,
            )
            self._peer_gone = True  # no linger: it does not read
            self._abort()

    # -- the flood guard ---------------------------------------------------------------------

    def _inspect(self, data: bytes) -> None:
        self._guard.received(data, trio.current_time)

    def _on_control_frame(self, event: h2.events.Event) -> None:
        self._guard.control.hit(trio.current_time())

    def _on_priority(self, event: h2.events.PriorityUpdated) -> None:
        if event is not self._priority_of_request:  # not the PRIORITY flag of HEADERS
            self._guard.control.hit(trio.current_time())

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._guard.control.hit(trio.current_time())
        super()._on_settings(event)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        if not event.data and not event.stream_ended:
            self._guard.control.hit(trio.current_time())  # empty DATA flood (CVE-2019-9518)
        super()._on_data(event)

    # -- streams -----------------------------------------------------------------------------

    def _open_stream(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        self._priority_of_request = event.priority_updated
        if self.goaway_last_id is not None and sid > self.goaway_last_id:
            self.send_reset(sid, ErrorCodes.REFUSED_STREAM)  # opened after our GOAWAY
            return
        try:
            request = request_from_headers(
                event.headers, event.stream_ended is not None, self.info.client_ip
            )
        except Malformed as exc:
            log.info("client %s: stream %d: malformed request: %s", self.info.client_ip, sid, exc)
            self.send_reset(sid, ErrorCodes.PROTOCOL_ERROR)
            self._guard.resets.hit(trio.current_time())
            return
        stream = self._streams[sid] = H2ServerStream(self, sid, request)
        self._active += 1
        self._slot.busy()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_stream, stream)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        try:
            trailers = trailers_from_headers(event.headers)
        except Malformed as exc:
            log.info("client %s: malformed trailers: %s", self.info.client_ip, exc)
            stream._reset(ErrorCodes.PROTOCOL_ERROR)
            self._cut_off(stream, ClientGone(f"malformed trailers: {exc}"))
            self._guard.resets.hit(trio.current_time())
            return
        stream._trailers_received(trailers)

    async def _run_stream(self, stream: H2ServerStream) -> None:
        try:
            try:
                if not stream.reset:  # reset in the same read as the request: never start it
                    with stream.scope:
                        await self._handler(stream)
            except* ClientGone as gone:  # may come out of the handler's own nursery
                why = "; ".join(map(str, gone.exceptions))
                log.debug("client %s: stream %d: %s", self.info.client_ip, stream.stream_id, why)
        except Exception:
            log.exception("client %s: stream %d failed", self.info.client_ip, stream.stream_id)
        finally:
            self.finish(stream)
            if not self._active:
                self._slot.idle()
