"""The request/response model every front end produces and the forwarding core consumes.

Front ends (HTTP/1.1 via h11, HTTP/2 via h2) translate their protocol events into these
objects and implement `Exchange`; everything after that point is protocol-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from proxy.config import ClientAuth
from proxy.netio import ByteStream
from proxy.tls.client_cert import ClientCertificate

if TYPE_CHECKING:  # tracing.context builds on this module's Headers
    from proxy.tracing.context import TraceContext

Headers = list[tuple[bytes, bytes]]  # lower-case names


class ClientGone(Exception):
    """The client closed or broke its connection (or stream) mid-exchange."""


class MalformedBody(ClientGone):
    """The client broke its request body's framing (a bad chunk, more or less data than its
    content-length): 400 if nothing was answered yet, and the exchange ends upstream too."""


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes  # origin-form: path and query, or b"*"
    host: bytes  # the Host header or :authority, as sent (may carry a port)
    headers: Headers  # as received, without Host; hop-by-hop headers not yet removed
    http_version: bytes  # b"1.0", b"1.1" or b"2"
    has_body: bool  # whether body data follows (known from framing)
    client_ip: str
    upgrade: bytes | None = None  # HTTP/1.1 protocol upgrade asked for (e.g. b"websocket")

    @property
    def protocol(self) -> str:
        """ "HTTP/1.1", "HTTP/2": as access logs and metrics name it."""
        return "HTTP/" + self.http_version.decode("ascii")


@dataclass(slots=True, kw_only=True)
class UpstreamRequest:
    """A request as the forwarding core hands it to an upstream, whatever protocol carries
    it. Only end-to-end fields: each upstream protocol frames it its own way (HTTP/1.1:
    Host, Content-Length or chunked, Connection/Upgrade; HTTP/2: pseudo-header fields)."""

    method: bytes
    target: bytes
    authority: bytes  # the client's Host or :authority
    fields: Headers  # without Host, Content-Length and any connection-specific field
    has_body: bool
    body_length: int | None = None  # the client's Content-Length, when it sent one
    upgrade: bytes | None = None  # an HTTP/1.1 protocol upgrade to ask the upstream for


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers
    http_version: bytes = b"1.1"  # of the upstream that sent it (for Via)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What the access log and metrics say about the client connection, and who the client
    proved to be with a certificate."""

    client_ip: str
    tls_version: str | None  # "TLSv1.3"; None on plain HTTP
    alpn: str | None  # "h2", "http/1.1"
    client_auth: ClientAuth | None = None  # the client-certificate settings of the handshake
    client_cert: ClientCertificate | None = None  # the client's certificate, if it verified


@dataclass(slots=True, kw_only=True)
class Outcome:
    """What became of one request: the input of access logs and metrics."""

    request: Request
    info: ConnectionInfo
    listener: str  # "https", "http" (redirects, ACME answers) or "admin"
    client_ip: str  # the peer, or behind trusted proxies the first untrusted hop
    started: float  # trio.current_time() when handling began
    finished: float
    site: str | None = None  # None: no site serves the Host (or not an HTTPS request)
    status: int = 0  # 0 if the client went away before any response
    bytes_in: int = 0  # request body bytes forwarded
    bytes_out: int = 0  # response body bytes sent
    route: str | None = None  # the matched route's path pattern ("/api/*"), if any
    upstream: str | None = None
    upstream_time: float | None = None  # from request start to upstream response head
    trace: TraceContext | None = None  # set when tracing is on
    peer_trusted: bool = False  # the peer is one of trusted_proxies (its X-Forwarded-* kept)


class Observer(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    def record(self, outcome: Outcome) -> None:
        """Called once per request, after it ended; must not block."""
        ...


@runtime_checkable
class Upgradable(Protocol):
    """A connection that can leave HTTP for the protocol the client asked for (HTTP/1.1
    Upgrade: WebSocket). Both the client side and an upstream connection may be one."""

    __slots__ = ()  # slotted implementations stay slotted

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """Complete the switch (the client side sends `head`, the 101) and hand over the raw
        stream with the bytes already read past the HTTP head."""
        ...


class Exchange(Protocol):
    """One request/response on a client connection, as the forwarding core sees it."""

    __slots__ = ()  # slotted implementations stay slotted

    request: Request
    info: ConnectionInfo
    head_sent: bool

    async def receive_data(self) -> bytes:
        """The next piece of request body; b"" once it has ended. Raises ClientGone."""
        ...

    @property
    def request_trailers(self) -> Headers | None:
        """Trailers that ended the request body, available once receive_data returned b""."""
        ...

    async def send_informational(self, head: ResponseHead) -> None:
        """Relay a 1xx response (e.g. 103 Early Hints)."""
        ...

    async def send_head(self, head: ResponseHead, body: bytes, end: bool) -> None:
        """Send the final response head with the body bytes at hand, in one write."""
        ...

    async def send_data(self, data: bytes) -> None: ...

    async def send_end(self, trailers: Headers | None = None) -> None: ...

    async def abort(self) -> None:
        """The response cannot be completed: make the client see an error, not a short body."""
        ...


CONNECTION_CLOSE = (b"connection", b"close")  # a response after which the connection ends


def plain_response(
    status: int, message: str, *extra: tuple[bytes, bytes]
) -> tuple[ResponseHead, bytes]:
    """A short text/plain response the proxy itself generates (errors, redirects)."""
    body = message.encode("utf-8") + b"\n"
    headers: Headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *extra,
    ]
    return ResponseHead(status, headers), body
