"""HTTP/1.1 front end: h11 over a byte stream, one task per connection.

The connection object is also the `Exchange` of the request in progress (HTTP/1.1 has one
at a time), so a keep-alive request costs no task and no extra objects beyond h11's own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11
import trio

from proxy.config import LimitsConfig
from proxy.http.headers import requested_upgrade
from proxy.http.model import (
    CONNECTION_CLOSE,
    ClientGone,
    ConnectionInfo,
    Headers,
    Request,
    ResponseHead,
    plain_response,
)
from proxy.lifecycle import Lifecycle
from proxy.netio import ByteStream, StreamTimeout

log = logging.getLogger(__name__)

Handler = Callable[["H1Connection"], Awaitable[None]]
LINGER_SECONDS = 2.0
REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def start_next_cycle(conn: h11.Connection) -> bool:
    """Ready an h11 connection (either role) for its next request, if both sides finished
    cleanly; False means it cannot be reused and must be closed."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False


def _informational(status: int, headers: Headers) -> h11.InformationalResponse:
    return h11.InformationalResponse(
        status_code=status, headers=headers, reason=REASONS.get(status, b"")
    )


class H1Connection:
    """Serves requests on one client connection until it closes, errs or idles out."""

    def __init__(
        self,
        stream: ByteStream,
        sock: socket.socket,
        info: ConnectionInfo,
        handler: Handler,
        limits: LimitsConfig,
        lifecycle: Lifecycle,
    ) -> None:
        self._stream = stream
        self._socket = sock
        self._handler = handler
        self._limits = limits
        self._lifecycle = lifecycle
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._idle = False
        self.info = info
        self.client_ip = client_ip = info.client_ip
        # The exchange in progress:
        self.request: Request = Request(b"", b"", b"", [], b"1.1", False, client_ip)
        self.head_sent = False
        self._trailers: Headers | None = None

    async def serve(self) -> None:
        self._lifecycle.register(self)
        try:
            deadline = trio.current_time() + self._limits.header_timeout
            while not self._lifecycle.draining:
                request = await self._receive_request(deadline)
                if request is None:
                    return
                self.request, self.head_sent, self._trailers = request, False, None
                await self._handler(self)
                if not start_next_cycle(self._h11):
                    return
                deadline = trio.current_time() + self._limits.keepalive_timeout
        except h11.RemoteProtocolError as exc:
            await self._reject(exc)
        except (ClientGone, StreamTimeout, OSError, h11.LocalProtocolError) as exc:
            log.debug("client %s: connection ended: %r", self.client_ip, exc)
        finally:
            self._lifecycle.unregister(self)
            if self.head_sent and self._h11.their_state in (h11.SEND_BODY, h11.ERROR):
                await self._linger()
            await self._stream.aclose()

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
        if self._idle:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RD)

    async def _receive_request(self, deadline: float) -> Request | None:
        """The next request head, or None when the client closes between requests.

        Until the first byte the keep-alive deadline applies; from then on the whole head
        must arrive within header_timeout (slow-loris clients are cut off).
        """
        conn = self._h11
        started = False
        self._idle = True
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
        finally:
            self._idle = False
        if type(event) is not h11.Request:
            return None  # ConnectionClosed
        host = b""
        headers: Headers = []
        has_body = upgrade_asked = False
        for name, value in event.headers:
            if name == b"host":
                host = value
            else:
                if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                    has_body = True
                elif name == b"upgrade":
                    upgrade_asked = True
                headers.append((name, value))
        if not has_body:
            conn.next_event()  # the EndOfMessage of an empty body is already decodable
        upgrade = requested_upgrade(headers) if upgrade_asked else None
        return Request(
            event.method,
            event.target,
            host,
            headers,
            event.http_version,
            has_body,
            self.client_ip,
            upgrade,
        )

    async def _reject(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed request (400, 431 for an oversized head) if the state allows."""
        status = exc.error_status_hint
        log.info("client %s: bad request (%d): %s", self.client_ip, status, exc)
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reason = "Request Header Fields Too Large" if status == 431 else "Bad Request"
        head, body = plain_response(status, reason, CONNECTION_CLOSE)
        with contextlib.suppress(OSError, StreamTimeout, h11.LocalProtocolError):
            await self.send_head(head, body, end=True)

    # -- Exchange ------------------------------------------------------------------------

    def _client_deadline(self) -> float:
        return trio.current_time() + self._limits.client_timeout

    @property
    def request_trailers(self) -> Headers | None:
        return self._trailers

    async def receive_data(self) -> bytes:
        conn = self._h11
        if conn.they_are_waiting_for_100_continue:
            await self._send(conn.send(_informational(100, [])))
        while True:
            try:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await self._stream.receive_some(self._client_deadline()))
                    continue
            except (OSError, StreamTimeout, h11.RemoteProtocolError) as exc:
                # A cut-off or malformed body (bad chunk, EOF before Content-Length) ends the
                # exchange, never the process.
                raise ClientGone(f"reading request body: {exc!r}") from exc
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._trailers = list(event.headers) or None
                return b""
            raise ClientGone(f"client closed mid-body ({event!r})")

    async def send_informational(self, head: ResponseHead) -> None:
        if head.status == 100:
            return  # we sent our own 100 Continue when the body was first read
        await self._send(self._h11.send(_informational(head.status, head.headers)))

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """Send the 101: h11 then hands the connection over, with any bytes the client
        already sent in the new protocol. The connection ends when the tunnel does."""
        assert head is not None
        await self._send(self._h11.send(_informational(head.status, head.headers)))
        self.head_sent = True
        return self._h11.trailing_data[0], self._stream

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        conn = self._h11
        headers = head.headers
        if self._lifecycle.draining:
            headers = [*headers, CONNECTION_CLOSE]
        reason = REASONS.get(head.status, b"")
        data = conn.send(h11.Response(status_code=head.status, headers=headers, reason=reason))
        self.head_sent = True
        if body and self.request.method != b"HEAD":
            data += conn.send(h11.Data(data=body))
        if end:
            data += conn.send(h11.EndOfMessage())
        await self._send(data)

    async def send_data(self, data: bytes) -> None:
        await self._send(self._h11.send(h11.Data(data=data)))

    async def send_end(self, trailers: Headers | None = None) -> None:
        await self._send(self._h11.send(h11.EndOfMessage(headers=trailers or [])))

    async def abort(self) -> None:
        """Break the connection so a truncated body cannot pass for a complete one."""
        self._h11.send_failed()
        await self._stream.aclose()

    async def _send(self, data: bytes | None) -> None:
        """Client I/O failures become ClientGone, so they are never blamed on the upstream."""
        if data:
            try:
                await self._stream.send_all(data, self._client_deadline())
            except (OSError, StreamTimeout) as exc:
                raise ClientGone(f"sending to client: {exc!r}") from exc
