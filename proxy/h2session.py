"""The HTTP/2 session engine both roles run on: the client-facing server and the upstream client.

A session is one HTTP/2 connection driven by h2 (called a session so that it cannot be taken
for h2's own `H2Connection`, which it holds as `h2`). The engine owns what the roles share:
  * the reader: socket bytes -> h2 -> events routed by type to handlers a role may extend;
  * the coalescing writer: h2 queues the frames of every stream, one task sends all of them
    in one write per wake-up;
  * flow control both ways: DATA is queued only within the peer's windows and while the
    writer keeps up (OUTPUT_HIGH_WATER), streams without room wait in one blocked set; DATA
    received is acknowledged (WINDOW_UPDATE) only as it is consumed;
  * the state of each stream (ends, reset, unread bytes) and how a stream is finished;
  * idling out, GOAWAY, and the lingering close.
A role subclasses `Session` and `SessionStream` and supplies only what differs: the server
accepts streams and guards against floods (`proxy.http.h2`), the client opens streams and
resends refused ones (`proxy.upstream.h2`). A session calls its streams' methods and a stream
calls its session's: neither writes the other's fields.

Two private APIs of h2 are used, each behind one function below (`pending_output`,
`keep_streams_after_goaway`); tests/test_h2_session.py fails with a clear message when an h2
release removes one, and pyproject.toml caps h2's version.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.netio import ByteStream, StreamTimeout

log = logging.getLogger(__name__)
logging.getLogger("hpack").setLevel(logging.INFO)  # a debug line per header field otherwise

DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2: every window starts here until SETTINGS/WINDOW_UPDATE
OUTPUT_HIGH_WATER = 256 * 1024  # output queued behind a busy writer before senders wait
LINGER_SECONDS = 2.0
Setting = h2.settings.SettingCodes

SessionT = TypeVar("SessionT", bound="Session[Any]")
StreamT = TypeVar("StreamT", bound="SessionStream[Any]")


# -- h2 private APIs, one function each ----------------------------------------------------


def pending_output(conn: h2.connection.H2Connection) -> int:
    """Bytes h2 has queued and not handed out yet. h2 has no public query (data_to_send()
    would take them, and copy); reads the private `H2Connection._data_to_send`."""
    return len(conn._data_to_send)


def keep_streams_after_goaway(conn: h2.connection.H2Connection) -> None:
    """Let a GOAWAY from the peer leave the connection open, for the client role.

    RFC 9113 §6.8: streams up to the GOAWAY's last stream id may still complete, but h2 closes
    the connection on any GOAWAY (python-hyper/h2 issue 1181) and then refuses their frames,
    even those that arrived in the same read. Replaces h2's state machine with one whose
    private `_transitions` table differs in that one entry.
    """
    conn.state_machine = _goaway_keeps_streams()()


@functools.cache
def _goaway_keeps_streams() -> type[h2.connection.H2ConnectionStateMachine]:
    state = h2.connection.ConnectionState
    inputs = h2.connection.ConnectionInputs

    class GoawayKeepsStreams(h2.connection.H2ConnectionStateMachine):
        _transitions = {
            **h2.connection.H2ConnectionStateMachine._transitions,
            (state.CLIENT_OPEN, inputs.RECV_GOAWAY): (None, state.CLIENT_OPEN),
        }

    return GoawayKeepsStreams


def describe(exc: h2.exceptions.ProtocolError) -> str:
    """An h2 error for a log line: the stream errors carry only the stream id as message."""
    if isinstance(exc, h2.exceptions.NoSuchStreamError):
        return f"{type(exc).__name__} on stream {exc.stream_id}"
    return str(exc)


# -- the writer ----------------------------------------------------------------------------


class CoalescingWriter:
    """The single writer of a session: whatever was queued since the last write goes out in
    one send per wake-up, so many small frames cost one syscall and one TLS record."""

    def __init__(
        self,
        stream: ByteStream,
        timeout: float,
        take: Callable[[], bytes],
        sent: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._timeout = timeout
        self._take = take  # the bytes queued since the last write (b"" if none)
        self._sent = sent  # after a write: wake whoever waits for room
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False

    def wake(self) -> None:
        self._lot.unpark_all()

    def close(self) -> None:
        """Send what is queued, then end `run`."""
        self._closing = True
        self._lot.unpark_all()

    async def run(self) -> None:
        """Until closed; raises OSError or StreamTimeout when the stream fails."""
        while True:
            data = self._take()
            if data:
                await self._stream.send_all(data, trio.current_time() + self._timeout)
                self._sent()
            elif self._closing:
                return
            else:
                await self._lot.park()


# -- streams -------------------------------------------------------------------------------


class SessionStream(Generic[SessionT]):
    """The state of one stream that both roles share; a role adds its exchange API and the
    errors its callers expect (the `_error_*` hooks)."""

    __slots__ = (
        "_arrived",
        "_error",
        "received_end",
        "reset",
        "sent_end",
        "session",
        "stream_id",
        "trailers",
        "unread",
    )

    def __init__(self, session: SessionT, stream_id: int, received_end: bool = False) -> None:
        self.session = session
        self.stream_id = stream_id  # 0 until a client's head is sent
        self.sent_end = False  # our END_STREAM is queued
        self.received_end = received_end  # the peer's END_STREAM arrived
        self.reset = False  # RST_STREAM sent or received, or cut off: nothing more either way
        self.unread = 0  # DATA bytes received and not consumed yet (not acknowledged)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self._error: Exception | None = None  # why the stream was cut off
        self._arrived: trio.Event | None = None  # a reader waiting for input

    # -- role hooks ------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        """Queue received DATA for the role's reader (and wake it)."""
        raise NotImplementedError

    def _input_ended(self) -> None:
        """The peer's END_STREAM arrived (trailers, if any, are in `trailers`)."""
        raise NotImplementedError

    def _error_when_reset(self) -> Exception:
        """What a call raises once the stream was reset by us (it was never cut off)."""
        raise NotImplementedError

    def _error_from_h2(self, exc: h2.exceptions.ProtocolError) -> Exception:
        """What a call raises when h2 refuses a frame on this stream (the peer closed it)."""
        raise NotImplementedError

    def _error_stalled(self, timeout: float) -> Exception:
        """What sending raises when no room came up within `timeout`."""
        raise NotImplementedError

    def _error_reset_by_peer(self, code: ErrorCodes | int) -> Exception:
        """What calls raise after the peer's RST_STREAM with `code`."""
        raise NotImplementedError

    def _unfinished_code(self) -> ErrorCodes:
        """The RST_STREAM code for a stream whose exchange ended before both sides did."""
        raise NotImplementedError

    # -- events, from the session ----------------------------------------------------------

    def _data_received(self, data: bytes, flow_length: int) -> None:
        if data:
            self.unread += len(data)
            self._deliver(data)
        if flow_length > len(data):  # padding: nothing to consume, give the window back now
            self.session.acknowledge(self.stream_id, flow_length - len(data))

    def _trailers_received(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = trailers

    def _ended(self) -> None:
        self.received_end = True
        self._input_ended()

    def _cut_off(self, error: Exception) -> None:
        """Reset by the peer, refused, or the connection is gone: nothing more goes either
        way; calls raise `error` (input already received is still consumed first)."""
        self.reset = True
        if self._error is None:
            self._error = error
        self._wake()

    def _finishing_code(self) -> ErrorCodes | None:
        """The RST_STREAM code to send as the exchange ends, None when none is due."""
        if self.reset or (self.sent_end and self.received_end):
            return None
        self.reset = True
        return self._unfinished_code()

    # -- for the role ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def _wait_for_input(self, timeout: float) -> bool:
        """Until `_wake`; False when `timeout` passed first."""
        arrived = self._arrived = trio.Event()
        with trio.move_on_after(timeout):
            await arrived.wait()
        return arrived.is_set()

    def _reset_error(self) -> Exception:
        """What a call raises once `reset` is set (one object per raise: tasks may share
        an error)."""
        return self._error_when_reset() if self._error is None else copy.copy(self._error)

    def _consumed(self, size: int) -> None:
        """The role's reader took `size` bytes: open the windows again."""
        self.unread -= size
        self.session.acknowledge(self.stream_id, size)

    def _h2_call(self, call: Callable[..., None], *args: object) -> None:
        """An h2 send call on this stream; h2 refuses it once the peer closed or reset it."""
        if self.reset:
            raise self._reset_error()
        try:
            call(*args)
        except h2.exceptions.ProtocolError as exc:
            raise self._error_from_h2(exc) from exc

    def _send_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """Queue HEADERS; the caller wakes the writer (or queues DATA first)."""
        self._h2_call(self.session.h2.send_headers, self.stream_id, headers, end)
        if end:
            self.sent_end = True

    def _send_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if trailers:
            self._h2_call(self.session.h2.send_headers, self.stream_id, trailers, True)
        else:
            self._h2_call(self.session.h2.end_stream, self.stream_id)
        self.sent_end = True
        self.session.wake_writer()

    async def _send_data(self, data: bytes, end: bool, timeout: float) -> None:
        """Queue DATA frames within the peer's windows; wait for WINDOW_UPDATE or for the
        writer to catch up, so a slow peer holds back the other side, not our memory."""
        session = self.session
        conn = session.h2
        stream_id = self.stream_id
        view = memoryview(data)
        while view:
            if self.reset:
                raise self._reset_error()
            try:
                window = conn.local_flow_control_window(stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise self._error_from_h2(exc) from exc
            if window <= 0 or session.backlog() >= OUTPUT_HIGH_WATER:
                if not await session.wait_for_room(stream_id, timeout):
                    raise self._error_stalled(timeout)
                continue
            size = min(window, conn.max_outbound_frame_size, len(view))
            chunk = view[:size] if size < len(view) else view
            self._h2_call(conn.send_data, stream_id, chunk, end and chunk is view)
            view = view[size:]
        if end:
            self.sent_end = True
        session.wake_writer()

    def _reset(self, code: ErrorCodes) -> None:
        """Send RST_STREAM (once)."""
        if not self.reset:
            self.reset = True
            self.session.send_reset(self.stream_id, code)


# -- sessions ------------------------------------------------------------------------------


class Session(Generic[StreamT]):
    """One HTTP/2 connection: h2's state, the streams, a reader and a writer.

    Our preface is queued at once; the role then calls `_run` (both tasks, until the session
    ends). It adds to `_handlers` the events it routes itself, and overrides the hooks below.
    """

    LINGERS: ClassVar[bool] = False  # after our last frames, read until the peer closes
    PAUSES_READING: ClassVar[bool] = False  # no reading while output piles up

    def __init__(
        self,
        stream: ByteStream,
        *,
        client_side: bool,
        validate_inbound: bool,
        settings: dict[Setting, int],
        connection_window: int,
        write_timeout: float,
        idle_timeout: float,
        first_idle_deadline: float,
        peer_goaway_keeps_streams: bool,
    ) -> None:
        self._stream = stream
        self._idle_timeout = idle_timeout
        conn = self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                validate_inbound_headers=validate_inbound,
                normalize_inbound_headers=validate_inbound,
                # Outbound fields come from the forwarding core, already clean: h2's
                # per-byte validation of them would cost more than the rest of the request.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        if Setting.MAX_FRAME_SIZE in settings:
            conn.max_inbound_frame_size = settings[Setting.MAX_FRAME_SIZE]
        if Setting.MAX_HEADER_LIST_SIZE in settings:
            conn.decoder.max_header_list_size = settings[Setting.MAX_HEADER_LIST_SIZE]
        if peer_goaway_keeps_streams:
            keep_streams_after_goaway(conn)
        self._rescues_output = peer_goaway_keeps_streams
        self._streams: dict[int, StreamT] = {}  # by id, once HEADERS went either way
        self._active = 0  # exchanges begun and not finished (a client's may have no id yet)
        self._last_active = -math.inf  # when `_active` last fell to 0
        self._closing = False  # no new streams; the session ends once `_active` is 0
        self._blocked: dict[int, trio.Event] = {}  # streams waiting for room to send DATA
        self._room = trio.lowlevel.ParkingLot()  # the reader, waiting for the writer's progress
        self._goaway = b""  # our graceful GOAWAY, sent after h2's output (see go_away)
        self.goaway_last_id: int | None = None  # set once that GOAWAY is queued
        self._writer = CoalescingWriter(stream, write_timeout, self._take_output, self._sent)
        # Idle timeout of the reader, re-armed lazily: see _finished and _read_loop.
        self._idle = trio.CancelScope(deadline=first_idle_deadline)
        self._peer_gone = False  # the peer closed, reset or stopped reading: no linger
        self._nursery: trio.Nursery | None = None
        self._handlers: dict[type[h2.events.Event], Callable[[Any], bool | None]] = {
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.TrailersReceived: self._on_trailers,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.ConnectionTerminated: self._on_goaway,
        }
        # Our preface and SETTINGS, and the connection window opened beyond its default.
        conn.initiate_connection()
        if connection_window > DEFAULT_WINDOW:
            conn.increment_flow_control_window(connection_window - DEFAULT_WINDOW)
        # Output taken out of h2 before a GOAWAY could drop it. The preface is taken at once:
        # a GOAWAY in the peer's first read would drop it, and SETTINGS must come first.
        self._rescued = conn.data_to_send()

    # -- role hooks ------------------------------------------------------------------------

    def _connection_lost(self, exc: Exception | None) -> None:
        """The peer closed (`exc` None) or the socket failed, reading or writing."""

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """The peer broke the protocol (h2 queued GOAWAY); the reader stops."""

    def _closed_error(self) -> Exception:
        """What calls on streams still open raise once the session has ended."""
        raise NotImplementedError

    def _inspect(self, data: bytes) -> None:
        """Sees raw input before h2 parses it (the server's flood guard)."""

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> bool | None:
        """The peer's GOAWAY; True ends the reader."""
        return True

    # -- flow control and output -----------------------------------------------------------

    def backlog(self) -> int:
        """Output queued that the writer has not taken yet."""
        return pending_output(self.h2) + len(self._rescued)

    def wake_writer(self) -> None:
        self._writer.wake()

    def flush(self) -> None:
        """Wake the writer if output is queued: most reads and acknowledgments queue none,
        and a needless wake-up costs two task switches."""
        if pending_output(self.h2) or self._rescued:
            self._writer.wake()

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Received bytes consumed: open the windows again (h2 decides when WINDOW_UPDATE is
        due). Also for streams already closed: the connection window counts them."""
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return  # the connection is gone: no window to open
        self.flush()

    def send_reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # already closed in h2
            self.h2.reset_stream(stream_id, code)
        self.wake_writer()

    async def wait_for_room(self, stream_id: int, timeout: float) -> bool:
        """Until a WINDOW_UPDATE, new SETTINGS or the writer's progress may let the stream
        send; False when `timeout` passed first."""
        self.wake_writer()  # what was queued so far must go out for the window to open
        ready = self._blocked[stream_id] = trio.Event()
        try:
            with trio.move_on_after(timeout):
                await ready.wait()
        finally:
            del self._blocked[stream_id]
        return ready.is_set()

    def _unblock(self, stream_id: int) -> None:
        ready = self._blocked.get(stream_id)
        if ready is not None:
            ready.set()

    def _unblock_all(self) -> None:
        for ready in self._blocked.values():
            ready.set()

    def _take_output(self) -> bytes:
        """For the writer: output rescued earlier, h2's queued frames, then our own GOAWAY
        (h2 sends nothing after its own close_connection, so go_away builds it)."""
        data = self.h2.data_to_send()
        if self._rescued:
            data = self._rescued + data
            self._rescued = b""
        if self._goaway:
            data += self._goaway
            self._goaway = b""
        return data

    def _sent(self) -> None:
        self._unblock_all()
        self._room.unpark_all()

    # -- streams -------------------------------------------------------------------------

    def finish(self, stream: StreamT) -> None:
        """The exchange ended, completed or not: give back the window of what was never
        consumed, reset the stream unless both sides ended it, and free its slot. Once."""
        stream_id = stream.stream_id
        if stream_id and self._streams.pop(stream_id, None) is not None:
            if stream.unread:
                self.acknowledge(stream_id, stream.unread)
            code = stream._finishing_code()
            if code is not None:
                self.send_reset(stream_id, code)
            self.flush()
        self._active -= 1
        if not self._active:
            now = self._last_active = trio.current_time()
            if self._closing:
                self._idle.cancel()  # drained
            elif now + self._idle_timeout < self._idle.deadline:
                self._idle.deadline = now + self._idle_timeout

    def _cut_off(self, stream: StreamT, error: Exception) -> None:
        stream._cut_off(error)
        self._unblock(stream.stream_id)

    def _cut_off_all(self, error: Exception) -> None:
        for stream in list(self._streams.values()):
            self._cut_off(stream, error)

    # -- GOAWAY and closing ----------------------------------------------------------------

    def close_when_idle(self) -> None:
        """Take no new streams; close once those in flight have finished."""
        self._closing = True
        if not self._active:
            self._idle.cancel()

    def go_away(self) -> None:
        """Graceful GOAWAY with the last stream id, streams in flight finish: h2 refuses all
        frames after its own close_connection, so the frame is built here and the writer
        sends it after h2's output."""
        if self.goaway_last_id is not None:
            return
        last = self.goaway_last_id = self.h2.highest_inbound_stream_id
        self._goaway = GoAwayFrame(0, last_stream_id=last, error_code=0).serialize()
        self.wake_writer()
        self.close_when_idle()

    def _goodbye(self) -> None:
        """GOAWAY(NO_ERROR) as the session ends idle or drained, unless go_away sent one."""
        if self.goaway_last_id is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()

    # -- running ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """The reader and the writer until the session ends; then what is left of the streams
        is cut off, our last frames go out (briefly), and the socket closes."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_loop)
                await self._read_loop()
                self._closing = True
                self._cut_off_all(self._closed_error())  # a server's handlers stop now
                nursery.cancel_scope.deadline = trio.current_time() + LINGER_SECONDS
                self._writer.close()
            if self.LINGERS and not self._peer_gone:  # let it read our last frames
                await self._linger()
        finally:
            self._closing = True
            self._cut_off_all(self._closed_error())  # also when cancelled
            await self._stream.aclose()

    def _abort(self) -> None:
        """Stop both tasks now: nothing more can be sent."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _write_loop(self) -> None:
        try:
            await self._writer.run()
        except (OSError, StreamTimeout) as exc:
            self._peer_gone = True
            self._connection_lost(exc)
            self._abort()

    async def _read_loop(self) -> None:
        """Read and dispatch until the peer leaves or breaks the protocol, or the session
        idles out, or drains after GOAWAY (ours or the peer's)."""
        while True:
            with self._idle:
                await self._read_frames()
                return
            now = trio.current_time()
            if self._active:  # a stream began just as the timeout fired: look again later
                deadline = now + self._idle_timeout
            elif self._closing:
                break  # drained
            else:
                deadline = self._last_active + self._idle_timeout
                if deadline <= now:
                    break
            self._idle = trio.CancelScope(deadline=deadline)
        self._closing = True
        self._goodbye()

    async def _read_frames(self) -> None:
        conn = self.h2
        receive = self._stream.receive_some
        rescue = self._rescues_output
        while True:
            if self.PAUSES_READING:
                while self.backlog() >= OUTPUT_HIGH_WATER:
                    # The peer is not reading: take nothing more to answer (requests, PINGs)
                    # until the writer gets through, so replies cannot pile up in memory.
                    await self._room.park()
            try:
                data = await receive()
            except (OSError, StreamTimeout) as exc:
                self._peer_gone = True
                self._connection_lost(exc)
                return
            if not data:
                self._peer_gone = True
                self._connection_lost(None)
                return
            try:
                self._inspect(data)
                if rescue and pending_output(conn):
                    # h2 drops output not yet taken when a GOAWAY arrives, which may include
                    # frames of streams it lets finish: take it first.
                    self._rescued += conn.data_to_send()
                for event in conn.receive_data(data):
                    if self._dispatch(event):
                        return
            except h2.exceptions.ProtocolError as exc:
                self._protocol_error(exc)
                return
            finally:
                self.flush()

    def _dispatch(self, event: h2.events.Event) -> bool | None:
        """Route one h2 event; True when the reader must stop."""
        handler = self._handlers.get(type(event))
        return handler is not None and handler(event)

    # -- events both roles route the same way --------------------------------------------

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        flow_length = event.flow_controlled_length
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.reset:
            stream._data_received(event.data, flow_length)
        elif flow_length:
            # Nobody will read it: give the window back at once, or one dead stream starves
            # the whole connection (python-hyper/h2 issue 1210).
            self.h2.acknowledge_received_data(flow_length, stream_id)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._ended()

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._trailers_received(list(event.headers))

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            self._unblock(event.stream_id)
        else:
            self._unblock_all()

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            self._cut_off(stream, stream._error_reset_by_peer(event.error_code))

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        self._unblock_all()  # the initial window or max frame size may have grown

    async def _linger(self) -> None:
        """Read until the peer closes (briefly): closing with unread input (its last
        WINDOW_UPDATEs) makes the kernel send a reset that can destroy our last frames."""
        deadline = trio.current_time() + LINGER_SECONDS
        with contextlib.suppress(OSError, StreamTimeout):
            while await self._stream.receive_some(deadline):
                pass
