"""Sending a request again after its upstream failed: the replay buffer that lets a body go
out twice, and the one policy deciding when another attempt is safe.

As nginx's `proxy_next_upstream`: once the upstream may have acted on a request, only an
idempotent method (RFC 9110 §9.2.2) is sent again, unless the group allows non-idempotent
ones (`retry_non_idempotent`, nginx's `non_idempotent`). A request the upstream provably did
not process (connect failure, HTTP/2 REFUSED_STREAM or GOAWAY) goes again whatever its
method. Never once the upstream started answering: its response is the client's.
"""

from __future__ import annotations

import enum

from proxy.config import UpstreamGroup
from proxy.http.model import Exchange, Outcome
from proxy.upstream.stream import (
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamStream,
)

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))  # RFC 9110
MAX_REFUSALS = 3  # sends of one request that upstreams refused unprocessed


class ReplayBuffer:
    """The client's request body as every attempt of one request sends it: the bytes read
    so far are kept, up to `limit`, for the next attempt to send first; past the limit, or
    once the upstream answers, they are dropped and no attempt follows."""

    __slots__ = ("_exchange", "_kept", "_limit", "_outcome", "answered", "ended")

    def __init__(self, exchange: Exchange, outcome: Outcome, limit: int) -> None:
        self._exchange = exchange
        self._outcome = outcome  # bytes_in: the body bytes read from the client
        self._limit = limit
        self._kept: list[bytes] | None = []  # None: past the limit, or no longer needed
        self.answered = False  # the upstream sent a response event (1xx included)
        self.ended = not exchange.request.has_body  # the client's body was read to its end

    @property
    def replayable(self) -> bool:
        """Whether another attempt can send everything this one did."""
        return self._kept is not None

    def answer_started(self) -> None:
        """The upstream started answering: no attempt follows, the kept bytes can go."""
        self.answered = True
        self._kept = None

    async def send(self, upstream: UpstreamStream, timeout: float) -> None:
        """The body to `upstream`: what earlier attempts read, then the rest from the client."""
        for data in self._kept or ():
            await upstream.send_data(data, timeout)
        outcome = self._outcome
        while not self.ended:
            data = await self._exchange.receive_data()
            if not data:
                self.ended = True
                break
            outcome.bytes_in += len(data)
            if self._kept is not None:
                if outcome.bytes_in <= self._limit:
                    self._kept.append(data)
                else:
                    self._kept = None
            await upstream.send_data(data, timeout)
        await upstream.send_end(self._exchange.request_trailers, timeout)


class Resend(enum.Enum):
    """What follows a failed attempt."""

    NO = enum.auto()  # the failure is the answer (502)
    AGAIN = enum.auto()  # on a new connection; not the backend's fault, not a retry
    ELSEWHERE = enum.auto()  # on another backend: counts as a retry and a backend failure


def after_failure(
    error: UpstreamClosed,
    *,
    method: bytes,
    replay: ReplayBuffer,
    group: UpstreamGroup,
    refusals: int,
    stale: bool,
) -> Resend:
    """The policy for an attempt whose upstream closed before the response ended.

    `refusals`: earlier attempts the upstreams refused; `stale`: the attempt was the
    request's first, on a pooled connection the upstream may have closed as it was reused
    (nginx resends once on such a connection: neither the request's nor the backend's fault).
    The caller still checks the retry count, the deadline and that a backend is left.
    """
    if replay.answered or not replay.replayable or isinstance(error, UpstreamProtocolError):
        return Resend.NO
    if isinstance(error, UpstreamRefused):
        return Resend.AGAIN if refusals + 1 < MAX_REFUSALS else Resend.NO
    if method not in IDEMPOTENT and not group.retry_non_idempotent:
        return Resend.NO  # the upstream may have acted on it
    return Resend.AGAIN if stale else Resend.ELSEWHERE
