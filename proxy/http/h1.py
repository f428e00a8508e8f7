"""HTTP/1.1 front end: requests parsed from a byte stream (`h1_parser`), one task per
connection.

The connection object is also the `Exchange` of the request in progress (HTTP/1.1 has one
at a time), so a keep-alive request costs no task and no extra objects beyond the parser's.
Responses are written by `h1_writer` (their fields are validated already); a fresh parser
takes over the bytes that follow a completed exchange (pipelining).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from proxy.config import LimitsConfig
from proxy.connections import Slot
from proxy.http.h1_parser import NEED_DATA, H1Parser, MessageEnd, MessageHead, ParseError
from proxy.http.h1_strict import ambiguity
from proxy.http.h1_writer import REASONS, FramingError, ResponseWriter, informational
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
        self._parser = self._new_parser()
        self._writer = ResponseWriter()
        self._keep_alive = True  # what the request in progress allows
        self._continued = False  # 100 Continue sent for the request in progress
        self._expects_continue = False  # the request in progress asked for 100 Continue
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
        except ParseError as exc:
            await self._reject(exc)
        except (ClientGone, StreamTimeout, OSError, FramingError) as exc:
            log.debug("client %s: connection ended: %r", self.client_ip, exc)
        finally:
            self._slot.unregister(self)
            if self.head_sent and not self._parser.complete:
                await self._linger()
            await self._stream.aclose()

    def _new_parser(self, pending: bytes = b"") -> H1Parser:
        return H1Parser(request=True, max_head_bytes=self._limits.max_header_bytes, pending=pending)

    def _next_cycle(self) -> bool:
        """Get ready for the next request if both sides finished cleanly and the connection
        may stay open; a new parser takes over what the client sent after this request
        (pipelining). Bytes that followed a chunked body in one read are not kept apart from
        it by the parser (`overrun`): the connection closes, as pipelining allows."""
        writer, parser = self._writer, self._parser
        if not (writer.complete and writer.keep_alive and parser.complete) or parser.overrun:
            return False
        self._parser = self._new_parser(parser.trailing_data)
        if parser.closed:
            self._parser.receive_data(b"")
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
        parser = self._parser
        started = False
        self._slot.idle()  # until a whole head is in: may be closed to make room
        try:
            while True:
                event = parser.next_event()
                if event is not NEED_DATA:
                    break
                if not started:
                    await self._stream.wait_readable(deadline)
                data = await self._stream.receive_some(deadline)
                if not started and data:
                    started = True
                    deadline = min(deadline, trio.current_time() + self._limits.header_timeout)
                parser.receive_data(data)
        finally:
            self._slot.busy()
        if type(event) is not MessageHead:
            return None  # closed, maybe mid-head: nobody is left to answer
        version = event.http_version
        if version != b"1.1" and version != b"1.0":
            raise ParseError(f"HTTP version {version.decode()} is not supported", 505)
        host: bytes | None = None
        headers: Headers = []
        has_body = has_te = upgrade_asked = expects_continue = False
        keep_alive = version == b"1.1" and not self._slot.draining
        for name, value in event.headers:
            if name == b"host":
                if host is not None:
                    raise ParseError("more than one Host header")
                host = value
            else:
                if name == b"transfer-encoding":
                    if b"," in value:  # codings applied before chunked (RFC 9112 §6.1)
                        raise ParseError(f"transfer coding {value!r} is not implemented", 501)
                    has_body = has_te = True
                elif name == b"content-length":
                    has_body = has_body or value != b"0"
                elif name == b"upgrade":
                    upgrade_asked = True
                elif name == b"connection" and b"close" in value.lower():
                    keep_alive = False
                elif name == b"expect" and value.lower() == b"100-continue":
                    expects_continue = True
                headers.append((name, value))
        if host is None and version == b"1.1":
            raise ParseError("an HTTP/1.1 request without Host")
        refused = ambiguity(
            event.raw,
            version,
            event.target,
            host=host,
            has_transfer_encoding=has_te,
        )
        if refused is not None:
            raise ParseError(refused)
        self._keep_alive = keep_alive
        self._expects_continue = expects_continue and has_body and version == b"1.1"
        if not has_body:
            parser.next_event()  # the MessageEnd of an empty body is already there
        upgrade = requested_upgrade(headers) if upgrade_asked else None
        return Request(
            method=event.method,
            target=event.target,
            host=host or b"",
            headers=headers,
            http_version=version,
            has_body=has_body,
            client_ip=self.client_ip,
            upgrade=upgrade,
        )

    async def _reject(self, exc: ParseError) -> None:
        """Answer a malformed request (400, 431 for an oversized head, 505 for a version)
        if the state allows."""
        status = exc.status
        log.info("client %s: bad request (%d): %s", self.client_ip, status, exc)
        if self.head_sent:
            return
        head, body = plain_response(status, REASONS[status].decode(), CONNECTION_CLOSE)
        with contextlib.suppress(ClientGone, FramingError):
            await self.send_head(head, body, end=True)

    # -- Exchange ------------------------------------------------------------------------

    def _client_deadline(self) -> float:
        return trio.current_time() + self._limits.client_timeout

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def receive_data(self) -> bytes:
        parser = self._parser
        if self._expects_continue and not self._continued and not self.head_sent:
            self._continued = True
            await self._send(informational(100, []))
        while True:
            try:
                event = parser.next_event()
                if event is NEED_DATA:
                    parser.receive_data(await self._stream.receive_some(self._client_deadline()))
                    continue
            except ParseError as exc:
                raise MalformedBody(f"malformed request body: {exc}") from exc
            except (OSError, StreamTimeout) as exc:
                # A cut-off body ends the exchange, never the process.
                raise ClientGone(f"reading request body: {exc!r}") from exc
            if type(event) is bytes:
                return event
            if type(event) is MessageEnd:
                self._trailers = event.trailers
                return b""
            raise ClientGone(f"client closed mid-body ({event!r})")

    async def send_informational(self, head: ResponseHead) -> None:
        # 100: we sent our own when the body was first read. HTTP/1.0 knows no 1xx.
        if head.status != 100 and self.request.http_version == b"1.1":
            await self._send(informational(head.status, head.headers))

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """Send the 101, and hand over the connection with any bytes the client already
        sent in the new protocol (the parser stopped after the Upgrade request). The
        connection ends when the tunnel does."""
        assert head is not None
        await self._send(informational(head.status, head.headers))
        self.head_sent = True
        return self._parser.trailing_data, self._stream

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
