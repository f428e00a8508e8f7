"""What the forwarding core needs from an upstream, whatever protocol carries it.

An `UpstreamStream` is one request/response exchange: an HTTP/1.1 connection serving one
request, or one HTTP/2 stream on a shared connection. Events coming back are protocol-neutral.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.config import Upstream
from proxy.http.model import Headers, ResponseHead, UpstreamRequest


class UpstreamClosed(Exception):
    """The upstream closed, reset or broke the protocol before the response ended (502)."""


class UpstreamRefused(UpstreamClosed):
    """The upstream did not process the request at all (HTTP/2 GOAWAY above its last stream
    id, REFUSED_STREAM, or a connection that was closing) and no request body was taken from
    the client for it: safe to send again on another connection."""


class UpstreamProtocolError(UpstreamClosed):
    """The upstream's response was malformed or ambiguous (502). Never resent: the upstream
    may have acted on the request; the connection is closed, never reused."""


class UnforwardableRequest(Exception):
    """The client's request cannot be expressed to this upstream (e.g. a body shorter than
    its content-length): the client's fault (400), and the upstream connection is closed."""


class UpstreamTimeout(Exception):
    """The upstream did not make progress within upstream_timeout (504)."""


@dataclass(slots=True)
class BodyEnd:
    trailers: Headers | None = None


# A ResponseHead with a 1xx status is informational; bytes are body data.
UpstreamEvent = ResponseHead | bytes | BodyEnd


class UpstreamStream(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    url: str
    reused: bool  # carried by a connection that already served requests (retry policy)

    async def send_head(self, request: UpstreamRequest, timeout: float) -> None:
        """Send the request head, framed as this protocol does; with the end of the request
        when it has no body."""
        ...

    async def send_data(self, data: bytes, timeout: float) -> None: ...

    async def send_end(self, trailers: Headers | None, timeout: float) -> None: ...

    async def next_event(self, timeout: float) -> UpstreamEvent:
        """The next response event, waiting up to `timeout` for each piece of input."""
        ...

    def buffered_event(self) -> UpstreamEvent | None:
        """An event available without waiting, so a head can be sent with its first bytes."""
        ...

    def release(self) -> None:
        """The exchange completed: the connection may serve another request."""
        ...

    async def aclose(self) -> None:
        """The exchange failed or was abandoned: never reuse what carried it."""
        ...


class Pool(Protocol):
    """Connections to one upstream, handing out an `UpstreamStream` per exchange."""

    __slots__ = ()  # slotted implementations stay slotted

    upstream: Upstream

    async def open_stream(self) -> UpstreamStream:
        """Raises OSError (refused, unreachable) or StreamTimeout (connect timed out)."""
        ...

    def close_all(self) -> None: ...
