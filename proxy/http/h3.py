"""HTTP/3 front end: aioquic's `H3Connection` events <-> the shared request model.

One `H3Session` per QUIC connection turns each request stream into an `H3Exchange`, the same
`Exchange` the HTTP/1.1 and HTTP/2 front ends produce, and runs the forwarding handler for it
in its own task. The QUIC connection below (`proxy.quic`) is sans-IO; the session asks its
`Transport` to send what aioquic queued and waits on it for acknowledgements, so a response
body is held to SEND_BUFFER unacknowledged bytes per stream (backpressure to the upstream).
Request bodies the other way: the `ReceiveLedger` counts what each stream holds (bytes H3 has
not parsed yet, body bytes the exchange has not read), and the connection's receive windows
(`proxy.quic.WindowedConnection`) open only as far past what was taken.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived, StreamReset

from proxy.config import LimitsConfig
from proxy.http.h2_fields import Malformed, request_from_headers, trailers_from_headers
from proxy.http.model import ClientGone, ConnectionInfo, Exchange, Headers, Request, ResponseHead

log = logging.getLogger(__name__)

Handler = Callable[["H3Exchange"], Awaitable[None]]

SEND_BUFFER = 1 << 20  # unacknowledged response bytes per stream before the sender waits
RECEIVE_CHUNK = 1 << 16  # request body bytes handed on at once (packets bring ~1200 each)
STATUS = {code: str(code).encode("ascii") for code in range(100, 1000)}


class Transport(Protocol):
    """What a session needs of the QUIC connection's driver."""

    def transmit(self) -> None:
        """Send the datagrams aioquic has queued, and re-arm its timer."""

    async def acknowledged(self) -> None:
        """Return after the next datagram from the peer was processed (acks free buffers)."""


def send_backlog(quic: QuicConnection, stream_id: int | None = None) -> int:
    """Bytes queued and not yet acknowledged, on one stream or (None) on all of them (a
    reset stream's are never sent: none). aioquic buffers without bound and has no public
    count: the one read of its private stream state."""
    if stream_id is None:
        streams = list(quic._streams.values())
    else:
        stream = quic._streams.get(stream_id)
        streams = [] if stream is None else [stream]
    senders = [s.sender for s in streams if s.sender._reset_error_code is None]
    return sum(int(s._buffer_stop - s._buffer_start) for s in senders)


def h3_unparsed(h3: H3Connection, stream_id: int) -> int:
    """Bytes of a stream H3 holds unparsed (a partial frame; a HEADERS frame is kept whole
    until complete): the one read of its private per-stream buffer."""
    stream = h3._stream.get(stream_id)
    return 0 if stream is None else len(stream.buffer)


def _send_goaway(h3: H3Connection, quic: QuicConnection, stream_id: int) -> None:
    """GOAWAY (RFC 9114 §5.2) on our control stream: aioquic has no call for it, the one
    use of its private control stream id."""
    control = h3._local_control_stream_id
    if control is not None:
        frame = encode_frame(FrameType.GOAWAY, encode_uint_var(stream_id))
        quic.send_stream_data(control, frame)


class ReceiveLedger:
    """What each stream holds of the bytes QUIC delivered: the receive windows stay a fixed
    size past what was taken, so a client cannot send faster than the upstream reads."""

    __slots__ = ("_held", "_held_total", "delivered")

    def __init__(self) -> None:
        self.delivered = 0  # stream bytes QUIC handed up, all streams
        self._held: dict[int, int] = {}
        self._held_total = 0

    def held(self, stream_id: int) -> int:
        return self._held.get(stream_id, 0)

    def taken(self) -> int:
        """Bytes delivered and no longer held, all streams together."""
        return self.delivered - self._held_total

    def hold(self, stream_id: int, size: int) -> None:
        self._held_total += size - self._held.get(stream_id, 0)
        if size:
            self._held[stream_id] = size
        else:
            self._held.pop(stream_id, None)


class H3Exchange(Exchange):
    """One request stream: the `Exchange` the forwarding core drives."""

    __slots__ = (
        "_arrived",
        "_gone",
        "_inbox",
        "_session",
        "_trailers",
        "head_sent",
        "info",
        "received_end",
        "request",
        "scope",
        "sent_end",
        "stream_id",
        "unread",
    )

    def __init__(self, session: H3Session, stream_id: int, request: Request) -> None:
        self._session = session
        self.stream_id = stream_id
        self.request = request
        self.info = session.info
        self.head_sent = False
        self.sent_end = False
        self.received_end = not request.has_body
        self.scope = trio.CancelScope()
        self._inbox: deque[bytes] = deque()
        self.unread = 0  # bytes in the inbox
        self._arrived = trio.Event()
        self._trailers: Headers | None = None
        self._gone: ClientGone | None = None

    # -- from the session ----------------------------------------------------------------

    def _deliver(self, data: bytes, ended: bool) -> None:
        if data:
            self._inbox.append(data)
            self.unread += len(data)
        self.received_end = self.received_end or ended
        self._arrived.set()

    def _trailers_received(self, trailers: Headers) -> None:
        self._trailers = trailers
        self._deliver(b"", True)

    def _cut_off(self, gone: ClientGone) -> None:
        self._gone = gone
        self._arrived.set()
        self.scope.cancel()

    # -- Exchange ------------------------------------------------------------------------

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def receive_data(self) -> bytes:
        while not self._inbox:
            if self._gone is not None:
                raise self._gone
            if self.received_end:
                return b""
            self._arrived = trio.Event()
            timeout = self._session.limits.client_timeout
            with trio.move_on_after(timeout):
                await self._arrived.wait()
            if not self._arrived.is_set():
                raise ClientGone(f"stream {self.stream_id}: request body stalled {timeout:g}s")
        inbox = self._inbox
        data = inbox.popleft()
        if inbox and len(data) < RECEIVE_CHUNK:
            parts = [data]
            size = len(data)
            while inbox and size + len(inbox[0]) <= RECEIVE_CHUNK:
                size += len(inbox[0])
                parts.append(inbox.popleft())
            data = b"".join(parts)
        self.unread -= len(data)
        self._session.taken(self.stream_id)
        return data

    async def send_informational(self, head: ResponseHead) -> None:
        # Expect: 100-continue needs no answer (the body may always follow in HTTP/3), and
        # there is no 101 (RFC 9114 §4.5).
        if head.status not in (100, 101):
            self._session.send_headers(self.stream_id, head.status, head.headers, False)

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        if self.request.method == b"HEAD":
            body = b""
        self.head_sent = True
        self._session.send_headers(self.stream_id, head.status, head.headers, end and not body)
        self.sent_end = end
        if body:
            await self._session.send_data(self.stream_id, body, end)

    async def send_data(self, data: bytes) -> None:
        await self._session.send_data(self.stream_id, data, False)

    async def send_end(self, trailers: Headers | None = None) -> None:
        self.sent_end = True
        if trailers:
            self._session.send_trailers(self.stream_id, trailers)
        else:
            await self._session.send_data(self.stream_id, b"", True)

    async def abort(self) -> None:
        self._session.reset(self.stream_id, ErrorCode.H3_INTERNAL_ERROR)


class H3Session:
    """HTTP/3 on one QUIC connection: requests in, responses out, GOAWAY on drain."""

    def __init__(
        self,
        transport: Transport,
        quic: QuicConnection,
        info: ConnectionInfo,
        handler: Handler,
        limits: LimitsConfig,
        nursery: trio.Nursery,
        ledger: ReceiveLedger,
    ) -> None:
        self._transport = transport
        self._ledger = ledger
        self._quic = quic
        self._h3 = H3Connection(quic)
        self._handler = handler
        self._nursery = nursery
        self._exchanges: dict[int, H3Exchange] = {}
        self._goaway_id: int | None = None  # streams from this id on are refused
        self._closing = False  # after GOAWAY, once the last exchange ended
        self._next_id = 0  # the lowest client stream id not seen yet
        self.info = info
        self.limits = limits

    @property
    def busy(self) -> bool:
        return bool(self._exchanges)

    def go_away(self) -> None:
        """Drain: no new requests; the connection closes once the in-flight ones end."""
        if self._goaway_id is None:
            self._goaway_id = self._next_id
            _send_goaway(self._h3, self._quic, self._goaway_id)
            self._close_if_done()
            self._transport.transmit()

    def _close_if_done(self) -> None:
        if self._goaway_id is not None and not self._exchanges and not self._closing:
            self._closing = True
            self._nursery.start_soon(self._close_when_delivered)

    async def _close_when_delivered(self) -> None:
        """Closing drops what aioquic has not sent yet (and nothing lost is resent after
        it): the last responses are acknowledged first, for at most client_timeout."""
        with trio.move_on_after(self.limits.client_timeout):
            while send_backlog(self._quic):
                await self._transport.acknowledged()
        self._quic.close(error_code=ErrorCode.H3_NO_ERROR)
        self._transport.transmit()

    # -- events --------------------------------------------------------------------------

    def quic_event(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                exchange._cut_off(ClientGone(f"stream {event.stream_id} reset"))
        elif isinstance(event, ConnectionTerminated):
            for exchange in list(self._exchanges.values()):
                exchange._cut_off(ClientGone("connection closed"))
        for h3_event in self._h3.handle_event(event):
            self._h3_event(h3_event)
        if isinstance(event, StreamDataReceived):
            self._ledger.delivered += len(event.data)
            self._recount(event.stream_id)

    def _recount(self, stream_id: int) -> None:
        exchange = self._exchanges.get(stream_id)
        unread = 0 if exchange is None else exchange.unread
        self._ledger.hold(stream_id, h3_unparsed(self._h3, stream_id) + unread)

    def taken(self, stream_id: int) -> None:
        """An exchange read body bytes: its windows may open (MAX_STREAM_DATA, MAX_DATA)."""
        self._recount(stream_id)
        self._transport.transmit()

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is None:
                self._open(event)
            else:
                self._trailers(exchange, event.headers)
        elif isinstance(event, DataReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                exchange._deliver(event.data, event.stream_ended)

    def _open(self, event: HeadersReceived) -> None:
        sid = event.stream_id
        self._next_id = max(self._next_id, sid + 4)
        if self._goaway_id is not None and sid >= self._goaway_id:
            self.reset(sid, ErrorCode.H3_REQUEST_REJECTED)
            return
        try:
            request = request_from_headers(
                event.headers, event.stream_ended, self.info.client_ip, http_version=b"3"
            )
        except Malformed as exc:
            log.info("client %s: stream %d: malformed request: %s", self.info.client_ip, sid, exc)
            self.reset(sid, ErrorCode.H3_MESSAGE_ERROR)
            return
        exchange = self._exchanges[sid] = H3Exchange(self, sid, request)
        self._nursery.start_soon(self._run, exchange)

    def _trailers(self, exchange: H3Exchange, headers: Headers) -> None:
        try:
            exchange._trailers_received(trailers_from_headers(headers))
        except Malformed as exc:
            log.info("client %s: malformed trailers: %s", self.info.client_ip, exc)
            self.reset(exchange.stream_id, ErrorCode.H3_MESSAGE_ERROR)
            exchange._cut_off(ClientGone(f"malformed trailers: {exc}"))

    async def _run(self, exchange: H3Exchange) -> None:
        sid = exchange.stream_id
        try:
            try:
                with exchange.scope:
                    await self._handler(exchange)
            except* ClientGone as gone:
                log.debug("client %s: stream %d: %r", self.info.client_ip, sid, gone)
        except Exception:
            log.exception("client %s: stream %d failed", self.info.client_ip, sid)
        finally:
            del self._exchanges[sid]
            self._recount(sid)  # unread body bytes are dropped
            if exchange._gone is None:
                if not exchange.sent_end:
                    self.reset(sid, ErrorCode.H3_INTERNAL_ERROR)
                elif not exchange.received_end:  # answered early (e.g. 413): stop the upload
                    self._quic.stop_stream(sid, ErrorCode.H3_NO_ERROR)
            self._close_if_done()
            self._transport.transmit()

    # -- sending -------------------------------------------------------------------------

    def send_headers(self, stream_id: int, status: int, headers: Headers, end: bool) -> None:
        self._h3.send_headers(stream_id, [(b":status", STATUS[status]), *headers], end)
        self._transport.transmit()

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        self._h3.send_headers(stream_id, trailers, end_stream=True)
        self._transport.transmit()

    async def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        """Queue `data`, then wait while the stream holds more than SEND_BUFFER unacked."""
        exchange = self._exchanges[stream_id]
        if exchange._gone is not None:
            raise exchange._gone
        self._h3.send_data(stream_id, data, end)
        self._transport.transmit()
        timeout = self.limits.client_timeout
        while send_backlog(self._quic, stream_id) > SEND_BUFFER:
            with trio.move_on_after(timeout) as waited:
                await self._transport.acknowledged()
            if exchange._gone is not None:
                raise exchange._gone
            if waited.cancelled_caught:
                raise ClientGone(f"stream {stream_id}: response body stalled {timeout:g}s")

    def reset(self, stream_id: int, code: ErrorCode) -> None:
        """End a stream both ways with `code` (it may be half closed already)."""
        for action in (self._quic.reset_stream, self._quic.stop_stream):
            with contextlib.suppress(ValueError):  # that direction is over already
                action(stream_id, code)
        self._transport.transmit()
