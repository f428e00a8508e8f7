"""HTTP/2 front end (h2): one reader, one writer, one task per request stream.

The reader feeds socket bytes to h2 and routes its events to streams; each request runs the
forwarding handler in its own task, so a slow stream never stalls the others; h2 queues
every frame those tasks produce and a single writer sends the queue, so the frames of many
streams leave in one TLS write. Flow control gives backpressure both ways: request DATA is
acknowledged (WINDOW_UPDATE) only once the handler has read it, and response DATA is
queued only within the client's window and while the writer keeps up with the socket (the
reader, too, stops while output piles up).

h2's own header validation is off (see `proxy.http.h2_fields`, which does it for less and
makes a malformed request a stream error, not a connection error).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.config import Http2Config, LimitsConfig
from proxy.http.h2_fields import Malformed, request_from_headers, trailers_from_headers
from proxy.http.h2_guard import EnhanceYourCalm, FloodGuard
from proxy.http.model import ClientGone, ConnectionInfo, Headers, Request, ResponseHead
from proxy.lifecycle import Lifecycle
from proxy.netio import ByteStream, CoalescingWriter, StreamTimeout

log = logging.getLogger(__name__)
logging.getLogger("hpack").setLevel(logging.INFO)  # a debug line per header field otherwise

Handler = Callable[["H2Stream"], Awaitable[None]]

DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2: every window starts here until SETTINGS/WINDOW_UPDATE
OUTPUT_HIGH_WATER = 256 * 1024  # output queued behind a busy writer before we wait for it
LINGER_SECONDS = 2.0
STATUS = {code: str(code).encode("ascii") for code in range(100, 1000)}
Setting = h2.settings.SettingCodes


def _wake(event: trio.Event | None) -> None:
    if event is not None:
        event.set()


class H2Stream:
    """One request stream: the `Exchange` the forwarding core drives."""

    __slots__ = (
        "_conn",
        "_continue",
        "_data_ready",
        "_inbox",
        "_owner",
        "_send_ready",
        "_trailers",
        "_unread",
        "head_sent",
        "in_ended",
        "info",
        "out_ended",
        "request",
        "reset",
        "scope",
        "stream_id",
    )

    def __init__(self, owner: H2Connection, stream_id: int, request: Request) -> None:
        self._owner = owner
        self._conn = owner.h2
        self.stream_id = stream_id
        self.request = request
        self.info = owner.info
        self.head_sent = False
        self.out_ended = False  # our END_STREAM is queued
        self.reset = False  # RST_STREAM sent or received: nothing more goes either way
        self.scope = trio.CancelScope()
        self._inbox: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self._unread = 0  # flow-controlled bytes received and not yet read by the handler
        self.in_ended = not request.has_body
        self._trailers: Headers | None = None
        self._data_ready: trio.Event | None = None
        self._send_ready: trio.Event | None = None
        self._continue = request.has_body and any(
            name == b"expect" and value.lower() == b"100-continue"
            for name, value in request.headers
        )

    # -- events routed by the reader --------------------------------------------------------

    def data_received(self, data: bytes, flow_length: int) -> None:
        if data:
            self._inbox.append((data, flow_length))
            self._unread += flow_length
            _wake(self._data_ready)
        elif flow_length:  # padding only: nothing for the handler, give the window back
            self._conn.acknowledge_received_data(flow_length, self.stream_id)

    def input_ended(self, trailers: Headers | None = None) -> None:
        if trailers is not None:
            self._trailers = trailers
        self.in_ended = True
        _wake(self._data_ready)

    def was_reset(self) -> None:
        """The client reset the stream (or the connection is going): stop the handler now."""
        self.reset = True
        self.scope.cancel()

    def may_send(self) -> None:
        _wake(self._send_ready)

    def unread_flow(self) -> int:
        return self._unread

    # -- Exchange ------------------------------------------------------------------------

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def receive_data(self) -> bytes:
        while not self._inbox:
            if self.in_ended:
                return b""
            if self.reset:
                raise ClientGone("stream reset")
            if self._continue:  # the client waits for this before sending the body
                self._continue = False
                self._send_1xx(100, [])
            self._data_ready = trio.Event()
            await self._wait(self._data_ready, "request body")
        data, flow_length = self._inbox.popleft()
        self._unread -= flow_length
        self._conn.acknowledge_received_data(flow_length, self.stream_id)
        self._owner.flush()
        return data

    async def send_informational(self, head: ResponseHead) -> None:
        # We answer Expect ourselves when the body is first read (as the HTTP/1.1 front end
        # does), and HTTP/2 has no 101 (RFC 9113 §8.6).
        if head.status not in (100, 101):
            self._send_1xx(head.status, head.headers)

    def _send_1xx(self, status: int, headers: Headers) -> None:
        self._h2_call(
            self._conn.send_headers, self.stream_id, [(b":status", STATUS[status]), *headers]
        )
        self._owner.wake_writer()

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        headers = [(b":status", STATUS[head.status]), *head.headers]
        if self.request.method == b"HEAD":
            body = b""
        self.head_sent = True
        self._continue = False
        self._h2_call(self._conn.send_headers, self.stream_id, headers, end and not body)
        if body:
            await self._send_body(body, end)
        else:
            self.out_ended = end
            self._owner.wake_writer()

    async def send_data(self, data: bytes) -> None:
        await self._send_body(data, False)

    async def send_end(self, trailers: Headers | None = None) -> None:
        if trailers:
            self._h2_call(self._conn.send_headers, self.stream_id, trailers, True)
        else:
            self._h2_call(self._conn.end_stream, self.stream_id)
        self.out_ended = True
        self._owner.wake_writer()

    async def abort(self) -> None:
        self._owner.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    # -- internals -------------------------------------------------------------------------

    def _h2_call(self, call: Callable[..., None], *args: object) -> None:
        """h2 refuses frames on a stream the client reset: the client is gone, for us."""
        if self.reset:
            raise ClientGone("stream reset")
        try:
            call(*args)
        except h2.exceptions.ProtocolError as exc:
            raise ClientGone(f"stream {self.stream_id}: {exc}") from exc

    async def _send_body(self, data: bytes, end: bool) -> None:
        """Queue DATA frames within the client's window; wait for WINDOW_UPDATE or for the
        writer to catch up, so a slow reader holds back the upstream instead of our memory."""
        owner = self._owner
        conn = self._conn
        stream_id = self.stream_id
        view = memoryview(data)
        while view:
            if self.reset:
                raise ClientGone("stream reset")
            try:
                window = conn.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise ClientGone(f"stream {stream_id} closed") from exc
            if window <= 0 or owner.backlog() >= OUTPUT_HIGH_WATER:
                owner.wake_writer()  # what we queued so far must go out for the window to open
                self._send_ready = trio.Event()
                owner.blocked.add(self)
                try:
                    await self._wait(self._send_ready, "response body")
                finally:
                    owner.blocked.discard(self)
                continue
            size = min(window, conn.max_outbound_frame_size, len(view))
            chunk = view[:size] if size < len(view) else view
            self._h2_call(conn.send_data, stream_id, chunk, end and chunk is view)
            view = view[size:]
        if end:
            self.out_ended = True
        owner.wake_writer()

    async def _wait(self, event: trio.Event, what: str) -> None:
        timeout = self._owner.limits.client_timeout
        with trio.move_on_after(timeout):
            await event.wait()
            return
        raise ClientGone(f"stream {self.stream_id}: client stalled the {what} for {timeout:g}s")


class H2Connection:
    """Serves one client connection that negotiated ALPN h2, until it closes or idles out."""

    def __init__(
        self,
        stream: ByteStream,
        info: ConnectionInfo,
        handler: Handler,
        limits: LimitsConfig,
        http2: Http2Config,
        lifecycle: Lifecycle,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._lifecycle = lifecycle
        self._config = http2
        self._guard = FloodGuard(http2)
        self.info = info
        self.limits = limits
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # request_from_headers does it
            normalize_inbound_headers=False,
            validate_outbound_headers=False,  # the forwarding core sends clean fields
            normalize_outbound_headers=False,
        )
        conn = self.h2 = h2.connection.H2Connection(config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                Setting.MAX_CONCURRENT_STREAMS: http2.max_concurrent_streams,
                Setting.INITIAL_WINDOW_SIZE: http2.initial_window_size,
                Setting.MAX_FRAME_SIZE: http2.max_frame_size,
                Setting.MAX_HEADER_LIST_SIZE: http2.max_header_list_size,
                Setting.ENABLE_PUSH: 0,
            },
        )
        conn.max_inbound_frame_size = http2.max_frame_size
        conn.decoder.max_header_list_size = http2.max_header_list_size
        self._streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams waiting to send response DATA
        self._room = trio.lowlevel.ParkingLot()  # the reader, waiting for the writer's progress
        self._writer = CoalescingWriter(
            stream, limits.client_timeout, self._take_output, self._output_sent
        )
        self._goaway: bytes = b""  # our graceful GOAWAY, sent outside h2 (see close_if_idle)
        self._last_stream_id: int | None = None  # set once GOAWAY is queued
        # The reader's idle timeout: header_timeout for the first request, then
        # keepalive_timeout after the last stream ends (`_last_active`), re-armed lazily.
        self._idle = trio.CancelScope(deadline=trio.current_time() + limits.header_timeout)
        self._last_active = -math.inf
        self._peer_gone = False  # the client closed, reset or stopped reading: no linger
        self._nursery: trio.Nursery | None = None
        self._priority_of_request: h2.events.PriorityUpdated | None = None

    async def serve(self) -> None:
        self._lifecycle.register(self)
        try:
            conn = self.h2
            conn.initiate_connection()
            window_increase = self._config.connection_window_size - DEFAULT_WINDOW
            if window_increase > 0:
                conn.increment_flow_control_window(window_increase)
            if self._lifecycle.draining:
                self.close_if_idle()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                for stream in list(self._streams.values()):  # left only if cut off
                    stream.was_reset()
                nursery.cancel_scope.deadline = trio.current_time() + LINGER_SECONDS
                self._writer.close()
            if not self._peer_gone:  # let it read our last frames, GOAWAY included
                await self._linger()
        except Exception:  # a bug must cost this connection, not the process
            log.exception("client %s: HTTP/2 connection failed", self.info.client_ip)
        finally:
            self._lifecycle.unregister(self)
            await self._stream.aclose()

    def close_if_idle(self) -> None:
        """Graceful shutdown: GOAWAY with the last stream id; in-flight streams finish.

        h2 refuses all frames after its own close_connection, so the GOAWAY frame is built
        here and sent by the writer after h2's output.
        """
        if self._last_stream_id is not None:
            return
        last = self._last_stream_id = self.h2.highest_inbound_stream_id
        self._goaway = GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()
        self.wake_writer()
        if not self._streams:
            self._idle.cancel()

    def wake_writer(self) -> None:
        self._writer.wake()

    def backlog(self) -> int:
        """Bytes h2 has queued that the writer has not taken yet. h2 has no public query:
        data_to_send() would take them, and would copy."""
        return len(self.h2._data_to_send)

    def flush(self) -> None:
        """Wake the writer if h2 queued output: most reads and stream ends queue nothing, and
        a needless wake-up costs two task switches."""
        if self.h2._data_to_send:
            self._writer.wake()

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        if not stream.reset:
            stream.reset = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.stream_id, code)
            self.wake_writer()

    # -- reading ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read and dispatch until the client leaves or must be cut off, or the connection
        idles out, or drains after our GOAWAY."""
        while True:
            with self._idle:
                await self._read_frames()
                return
            now = trio.current_time()
            if self._streams:
                deadline = now + self.limits.keepalive_timeout
            elif self._last_stream_id is not None:
                return  # drained after our GOAWAY
            else:
                deadline = self._last_active + self.limits.keepalive_timeout
                if deadline <= now:
                    self.h2.close_connection()  # idle: GOAWAY(NO_ERROR)
                    return
            self._idle = trio.CancelScope(deadline=deadline)

    async def _read_frames(self) -> None:
        """Read and dispatch until the client leaves or must be cut off."""
        conn = self.h2
        receive = self._stream.receive_some
        guard = self._guard
        while True:
            while self.backlog() >= OUTPUT_HIGH_WATER:
                # The client is not reading: take no more requests (or PINGs) to answer
                # until the writer gets through, so replies cannot pile up in memory.
                await self._room.park()
            try:
                data = await receive()
            except (OSError, StreamTimeout) as exc:
                log.debug("client %s: h2 connection ended: %r", self.info.client_ip, exc)
                data = b""
            if not data:
                self._peer_gone = True
                return
            try:
                guard.received(data)
                events = conn.receive_data(data)
                for event in events:
                    if self._dispatch(event):
                        return
            except h2.exceptions.ProtocolError as exc:  # h2 queued GOAWAY
                log.info("client %s: HTTP/2 protocol error: %s", self.info.client_ip, exc)
                return
            except EnhanceYourCalm as exc:
                log.warning("client %s: HTTP/2 flood: %s", self.info.client_ip, exc)
                conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, str(exc).encode())
                return
            finally:
                self.flush()

    def _dispatch(self, event: h2.events.Event) -> bool:
        """Route one h2 event; True when the connection must end (client GOAWAY)."""
        streams = self._streams
        stream: H2Stream | None
        if isinstance(event, h2.events.RequestReceived):
            self._open_stream(event)
            self._priority_of_request = event.priority_updated
        elif isinstance(event, h2.events.StreamEnded):
            stream = streams.get(event.stream_id or 0)
            if stream is not None:
                stream.input_ended()
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.may_send()
            else:
                self._unblock_all()
        elif isinstance(event, h2.events.StreamReset):
            stream = streams.get(event.stream_id or 0)
            if stream is not None:
                stream.was_reset()
            self._guard.resets.hit(trio.current_time())
        elif isinstance(event, h2.events.TrailersReceived):
            self._trailers(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            log.debug("client %s: %r", self.info.client_ip, event)
            return True
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._guard.control.hit(trio.current_time())
            self._unblock_all()  # the initial window or max frame size may have grown
        elif isinstance(event, h2.events.PriorityUpdated):
            if event is not self._priority_of_request:  # not the PRIORITY flag of HEADERS
                self._guard.control.hit(trio.current_time())
        elif isinstance(event, h2.events.PingReceived | h2.events.UnknownFrameReceived):
            self._guard.control.hit(trio.current_time())
        return False

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id or 0
        data = event.data or b""
        flow_length = event.flow_controlled_length or 0
        if not data and not event.stream_ended:
            self._guard.control.hit(trio.current_time())  # empty DATA flood (CVE-2019-9518)
        stream = self._streams.get(sid)
        if stream is not None and not stream.reset:
            stream.data_received(data, flow_length)
        elif flow_length:
            # Nobody will read it: give the window back at once, or one dead stream starves
            # the whole connection (python-hyper/h2 issue 1210).
            self.h2.acknowledge_received_data(flow_length, sid)

    def _open_stream(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id or 0
        if self._last_stream_id is not None and sid > self._last_stream_id:
            self._refuse(sid, ErrorCodes.REFUSED_STREAM)  # opened after our GOAWAY
            return
        try:
            request = request_from_headers(
                event.headers or (), event.stream_ended is not None, self.info.client_ip
            )
        except Malformed as exc:
            log.info("client %s: stream %d: malformed request: %s", self.info.client_ip, sid, exc)
            self._refuse(sid, ErrorCodes.PROTOCOL_ERROR)
            self._guard.resets.hit(trio.current_time())
            return
        stream = self._streams[sid] = H2Stream(self, sid, request)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_stream, stream)

    def _trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None:
            return
        try:
            trailers = trailers_from_headers(event.headers or ())
        except Malformed as exc:
            log.info("client %s: malformed trailers: %s", self.info.client_ip, exc)
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            stream.was_reset()
            self._guard.resets.hit(trio.current_time())
            return
        stream.input_ended(trailers)

    def _refuse(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)

    def _unblock_all(self) -> None:
        for stream in self.blocked:
            stream.may_send()

    # -- streams ---------------------------------------------------------------------------

    async def _run_stream(self, stream: H2Stream) -> None:
        try:
            try:
                if not stream.reset:  # reset in the same read as the request: never start it
                    with stream.scope:
                        await self._handler(stream)
            except* ClientGone as gone:  # may come out of the handler's own nursery
                log.debug("client %s: stream %d: %r", self.info.client_ip, stream.stream_id, gone)
        except Exception:
            log.exception("client %s: stream %d failed", self.info.client_ip, stream.stream_id)
        finally:
            self._finish(stream)

    def _finish(self, stream: H2Stream) -> None:
        """Close our side of a stream whose handler ended, and give back its unread window."""
        sid = stream.stream_id
        del self._streams[sid]
        conn = self.h2
        unread = stream.unread_flow()
        if unread:
            conn.acknowledge_received_data(unread, sid)
        if not stream.out_ended:
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
        elif not stream.in_ended:
            # A complete response before the whole request (e.g. 413): the client may stop
            # sending (RFC 9113 §8.1).
            self.reset_stream(stream, ErrorCodes.NO_ERROR)
        self.flush()
        if not self._streams:
            now = self._last_active = trio.current_time()
            if self._last_stream_id is not None:
                self._idle.cancel()  # drained
            elif now + self.limits.keepalive_timeout < self._idle.deadline:
                self._idle.deadline = now + self.limits.keepalive_timeout

    # -- writing ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            await self._writer.run()
        except (OSError, StreamTimeout) as exc:
            log.debug("client %s: h2 write failed: %r", self.info.client_ip, exc)
            self._peer_gone = True
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()

    def _take_output(self) -> bytes:
        """h2's queued frames, then our own GOAWAY (h2 sends none after close_if_idle)."""
        data = self.h2.data_to_send()
        if self._goaway:
            data += self._goaway
            self._goaway = b""
        return data

    def _output_sent(self) -> None:
        self._unblock_all()
        self._room.unpark_all()

    async def _linger(self) -> None:
        """Read until the client closes (briefly): closing with unread input (its last
        WINDOW_UPDATEs) makes the kernel send a reset that can destroy our last frames."""
        deadline = trio.current_time() + LINGER_SECONDS
        with contextlib.suppress(OSError, StreamTimeout):
            while await self._stream.receive_some(deadline):
                pass
