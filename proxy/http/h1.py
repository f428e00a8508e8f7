"""HTTP/1.1 front end: h11 parses requests from a byte stream, one task per connection.

The connection object is also the `Exchange` of the request in progress (HTTP/1.1 has one
at a time), so a keep-alive request costs no task and no extra objects beyond h11's own.
Responses are written by `h1_writer` (their fields are validated already); h11 parses each
request, and a fresh h11 connection takes over the bytes that follow a completed exchange.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

import h11
import trio

from proxy.config import LimitsConfig
from proxy.connections import Slot
from proxy.http.h1_strict import ambiguity, has_bare_lf, head_of
from proxy.http.h1_writer import FramingError, ResponseWriter, informational
from proxy.http.h11_internals import declared_chunk_size
from proxy.http.headers import requested_upgrade
from proxy.http.model import (
    CONNECTION_CLOSE,
    ClientGone,
    ConnectionInfo,
    Exchange,
    Headers,
    MalformedBody,
    Request,
    ResponseHead,
    Upgradable,
    plain_response,
)
from proxy.netio import ByteStream, StreamTimeout

log = logging.getLogger(__name__)

Handler = Callable[["H1Connection"], Awaitable[None]]
LINGER_SECONDS = 2.0
MAX_CHUNK_SIZE = 2**63 - 1  # no real body is larger; a size beyond is an attack on parsers


class H1Connection(Exchange, Upgradable):
    """Serves requests on one client connection until it closes, errs or idles out."""

    def __init__(
        self,
        stream: ByteStream,
        sock: socket.socket,
        info: ConnectionInfo,
        handler: Handler,
        limits: LimitsConfig,
        slot: Slot,
    ) -> None:
        self._stream = stream
        self._socket = sock
        self._handler = handler
        self._limits = limits
        self._slot = slot
        self._h11 = self._new_parser()
        self._writer = ResponseWriter()
        self._leftover = b""  # bytes after the last request, handed to the new parser
        self._keep_alive = True  # what the request in progress allows
        self._continued = False  # 100 Continue sent for the request in progress
        self.info = info
        self.client_ip = client_ip = info.client_ip
        # The exchange in progress:
        self.request = Request(
            method=b"",
            target=b"",
            host=b"",
            headers=[],
            http_version=b"1.1",
            has_body=False,
            client_ip=client_ip,
        )
        self.head_sent = False
        self._trailers: Headers | None = None

    async def serve(self) -> None:
        self._slot.register(self)
        try:
            deadline = trio.current_time() + self._limits.header_timeout
            while not self._slot.draining:
                request = await self._receive_request(deadline)
                if request is None:
                    return
                self.request, self.head_sent, self._trailers = request, False, None
                self._writer, self._continued = ResponseWriter(), False
                await self._handler(self)
                if not self._next_cycle():
                    return
                deadline = trio.current_time() + self._limits.keepalive_timeout
        except h11.RemoteProtocolError as exc:
            await self._reject(exc)
        except (ClientGone, StreamTimeout, OSError, FramingError) as exc:
            log.debug("client %s: connection ended: %r", self.client_ip, exc)
        finally:
            self._slot.unregister(self)
            if self.head_sent and self._h11.their_state in (h11.SEND_BODY, h11.ERROR):
                await self._linger()
            await self._stream.aclose()

    def _new_parser(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)

    def _next_cycle(self) -> bool:
        """Get ready for the next request if both sides finished cleanly and the connection
        may stay open; h11 only parsed, so a new parser takes over what the client sent
        after this request (pipelining)."""
        writer = self._writer
        if not (writer.complete and writer.keep_alive and self._h11.their_state is h11.DONE):
            return False
        leftover, closed = self._h11.trailing_data
        self._h11 = parser = self._new_parser()
        self._leftover = leftover
        if leftover:
            parser.receive_data(leftover)
        if closed:
            parser.receive_data(b"")
        return True

    async def _linger(self) -> None:
        """Discard what the client is still sending before closing, as nginx's lingering
        close does: closing with unread input makes the kernel send a reset, which can
        destroy our response (a 431 or 413) before the client has read it."""
        deadline = trio.current_time() + LINGER_SECONDS
        try:
            while await self._stream.receive_some(deadline):
                pass
        except (OSError, StreamTimeout):
            pass

    def close_if_idle(self) -> None:
        if self._slot.is_idle:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RD)

    async def _receive_request(self, deadline: float) -> Request | None:
        """The next request head, or None when the client closes between requests.

        Until the first byte the keep-alive deadline applies; from then on the whole head
        must arrive within header_timeout (slow-loris clients are cut off).
        """
        conn = self._h11
        raw = self._leftover  # what h11 parses, kept for the checks it does not make
        started = False
        self._slot.idle()  # until a whole head is in: may be closed to make room
        try:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    break
                if not started:
                    await self._stream.wait_readable(deadline)
                data = await self._stream.receive_some(deadline)
                if not started and data:
                    started = True
                    deadline = min(deadline, trio.current_time() + self._limits.header_timeout)
                conn.receive_data(data)
                raw += data
        finally:
            self._slot.busy()
        if type(event) is not h11.Request:
            return None  # ConnectionClosed
        host: bytes | None = None
        headers: Headers = []
        has_body = has_length = has_te = upgrade_asked = False
        keep_alive = event.http_version == b"1.1" and not self._slot.draining
        for name, value in event.headers:
            if name == b"host":
                host = value
            else:
                if name == b"transfer-encoding":
                    has_body = has_te = True
                elif name == b"content-length":
                    has_length = True
                    has_body = has_body or value != b"0"
                elif name == b"upgrade":
                    upgrade_asked = True
                elif name == b"connection" and b"close" in value.lower():
                    keep_alive = False
                headers.append((name, value))
        refused = ambiguity(
            head_of(raw),
            event.http_version,
            event.target,
            host=host,
            has_length=has_length,
            has_transfer_encoding=has_te,
        )
        if refused is not None:
            raise h11.RemoteProtocolError(refused, error_status_hint=400)
        self._keep_alive = keep_alive
        if not has_body:
            conn.next_event()  # the EndOfMessage of an empty body is already decodable
        upgrade = requested_upgrade(headers) if upgrade_asked else None
        return Request(
            method=event.method,
            target=event.target,
            host=host or b"",
            headers=headers,
            http_version=event.http_version,
            has_body=has_body,
            client_ip=self.client_ip,
            upgrade=upgrade,
        )

    async def _reject(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed request (400, 431 for an oversized head) if the state allows."""
        status = exc.error_status_hint
        log.info("client %s: bad request (%d): %s", self.client_ip, status, exc)
        if self.head_sent:
            return
        reason = "Request Header Fields Too Large" if status == 431 else "Bad Request"
        head, body = plain_response(status, reason, CONNECTION_CLOSE)
        with contextlib.suppress(ClientGone, FramingError):
            await self.send_head(head, body, end=True)

    # -- Exchange ------------------------------------------------------------------------

    def _client_deadline(self) -> float:
        return trio.current_time() + self._limits.client_timeout

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def receive_data(self) -> bytes:
        conn = self._h11
        if not self._continued and not self.head_sent and conn.they_are_waiting_for_100_continue:
            self._continued = True
            await self._send(informational(100, []))
        while True:
            try:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if has_bare_lf(conn.trailing_data[0]):
                        # h11 waits for a CRLF where a bare LF ended a chunk line: the
                        # framing is broken, and nothing the client sends will mend it.
                        raise MalformedBody("bare LF in the chunked framing")
                    conn.receive_data(await self._stream.receive_some(self._client_deadline()))
                    continue
            except h11.RemoteProtocolError as exc:
                raise MalformedBody(f"malformed request body: {exc}") from exc
            except (OSError, StreamTimeout) as exc:
                # A cut-off body ends the exchange, never the process.
                raise ClientGone(f"reading request body: {exc!r}") from exc
            if type(event) is h11.Data:
                if event.chunk_start and declared_chunk_size(conn, event) > MAX_CHUNK_SIZE:
                    raise MalformedBody("chunk size beyond 2^63")
                return bytes(event.data)
            if type(event) is h11.EndOfMessage:
                self._trailers = list(event.headers) or None
                return b""
            raise ClientGone(f"client closed mid-body ({event!r})")

    async def send_informational(self, head: ResponseHead) -> None:
        # 100: we sent our own when the body was first read. HTTP/1.0 knows no 1xx.
        if head.status != 100 and self.request.http_version == b"1.1":
            await self._send(informational(head.status, head.headers))

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """Send the 101, and hand over the connection with any bytes the client already
        sent in the new protocol (h11 holds them, paused after the Upgrade request). The
        connection ends when the tunnel does."""
        assert head is not None
        await self._send(informational(head.status, head.headers))
        self.head_sent = True
        return self._h11.trailing_data[0], self._stream

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        writer = self._writer
        data = writer.head(
            head.status,
            head.headers,
            head_request=self.request.method == b"HEAD",
            http11=self.request.http_version == b"1.1",
            keep_alive=self._keep_alive and not self._slot.draining,
        )
        self.head_sent = True
        if body:
            data += writer.data(body)
        if end:
            data += writer.end()
        await self._send(data)

    async def send_data(self, data: bytes) -> None:
        await self._send(self._writer.data(data))

    async def send_end(self, trailers: Headers | None = None) -> None:
        await self._send(self._writer.end(trailers))

    async def abort(self) -> None:
        """Break the connection so a truncated body cannot pass for a complete one."""
        await self._stream.aclose()

    async def _send(self, data: bytes | None) -> None:
        """Client I/O failures become ClientGone, so they are never blamed on the upstream."""
        if data:
            try:
                await self._stream.send_all(data, self._client_deadline())
            except (OSError, StreamTimeout) as exc:
                raise ClientGone(f"sending to client: {exc!r}") from exc
