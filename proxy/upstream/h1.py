"""HTTP/1.1 upstream connections (h11, client role) and their keep-alive pool."""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any

import h11
import trio

from proxy.config import LimitsConfig, Upstream
from proxy.http.h1 import start_next_cycle
from proxy.http.model import Headers, ResponseHead
from proxy.netio import ByteStream, StreamTimeout, close_socket
from proxy.upstream.connect import Connector, Transport
from proxy.upstream.stream import BodyEnd, UpstreamClosed, UpstreamEvent, UpstreamTimeout

IDLE_LIFETIME = 60.0  # seconds an idle pooled connection is kept (nginx: keepalive_timeout 60s)


class H1UpstreamConnection:
    """One keep-alive connection. It is the `UpstreamStream` of the one request it carries
    at a time, and goes back to its pool when that exchange completes cleanly."""

    __slots__ = ("_h11", "_pool", "_waited", "idle_since", "reused", "socket", "stream", "url")

    def __init__(self, transport: Transport, pool: H1Pool, max_head_bytes: int) -> None:
        self.stream = transport.stream
        self.socket = transport.socket
        self.url = pool.upstream.url
        self._pool = pool
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._waited = False
        self.reused = False
        self.idle_since = 0.0

    async def _send(self, data: bytes, timeout: float) -> None:
        try:
            await self.stream.send_all(data, trio.current_time() + timeout)
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"{self.url} stopped reading the request") from exc
        except OSError as exc:
            raise UpstreamClosed(f"sending to {self.url}: {exc}") from exc

    async def send_head(
        self, method: bytes, target: bytes, headers: Headers, end: bool, timeout: float
    ) -> None:
        conn = self._h11
        data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if end:  # no body: head and end of message in one write
            data += conn.send(h11.EndOfMessage()) or b""
        self._waited = False
        await self._send(data, timeout)

    async def send_data(self, data: bytes, timeout: float) -> None:
        await self._send(self._h11.send(h11.Data(data=data)) or b"", timeout)

    async def send_end(self, trailers: Headers | None, timeout: float) -> None:
        await self._send(self._h11.send(h11.EndOfMessage(headers=trailers or [])) or b"", timeout)

    async def next_event(self, timeout: float) -> UpstreamEvent:
        conn = self._h11
        try:
            while True:
                event = self._decode(conn.next_event())
                if event is not None:
                    return event
                deadline = trio.current_time() + timeout
                if not self._waited:  # right after the request nothing can be there yet
                    self._waited = True
                    await self.stream.wait_readable(deadline)
                conn.receive_data(await self.stream.receive_some(deadline))
        except StreamTimeout as exc:
            raise UpstreamTimeout(f"no response from {self.url} within {timeout:g}s") from exc
        except OSError as exc:
            raise UpstreamClosed(f"reading from {self.url}: {exc}") from exc

    def buffered_event(self) -> UpstreamEvent | None:
        return self._decode(self._h11.next_event())

    def _decode(self, event: Any) -> UpstreamEvent | None:
        """h11's event as an UpstreamEvent; None when more input is needed."""
        kind = type(event)
        if kind is h11.Data:
            return bytes(event.data)
        if kind is h11.Response or kind is h11.InformationalResponse:
            return ResponseHead(event.status_code, list(event.headers), event.http_version)
        if kind is h11.EndOfMessage:
            return BodyEnd(list(event.headers) or None)
        if event is h11.NEED_DATA:
            return None
        raise UpstreamClosed(f"{self.url} closed the connection mid-response")

    async def switch_protocols(self, head: ResponseHead | None) -> tuple[bytes, ByteStream]:
        """After the upstream's 101: the raw connection and the bytes read past its head.
        The connection is never pooled again (h11 stays in SWITCHED_PROTOCOL)."""
        del head  # the upstream sent it; nothing to send from this side
        return self._h11.trailing_data[0], self.stream

    def release(self) -> None:
        self._pool.release(self)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def ready_for_reuse(self) -> bool:
        return start_next_cycle(self._h11)

    def is_stale(self) -> bool:
        """An idle connection the upstream has closed (or sent junk on) must not be reused.

        Reading a byte is harmless: any byte arriving while idle makes the connection
        unusable. Over TLS the read also takes in session tickets sent after the handshake.
        """
        try:
            self.socket.recv(1)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            return True
        return True  # EOF, or bytes nobody asked for


class H1Pool:
    """Idle connections to one upstream, most recently used first (warm sockets, and the
    upstream's idle timeout closes the cold ones at the other end)."""

    def __init__(self, upstream: Upstream, limits: LimitsConfig, connector: Connector) -> None:
        self.upstream = upstream
        self._limits = limits
        self._connector = connector
        self._idle: deque[H1UpstreamConnection] = deque()
        self._closed = False

    async def open_stream(self) -> H1UpstreamConnection:
        """A live idle connection, or a new one. Raises OSError or StreamTimeout."""
        return self.take_idle() or self.adopt(await self._connector.connect())

    def take_idle(self) -> H1UpstreamConnection | None:
        idle = self._idle
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_LIFETIME and not conn.is_stale():
                conn.reused = True
                return conn
            close_socket(conn.socket)
        return None

    def adopt(self, transport: Transport) -> H1UpstreamConnection:
        """A connection of this pool over a new `transport`."""
        return H1UpstreamConnection(transport, self, self._limits.max_header_bytes)

    def release(self, conn: H1UpstreamConnection) -> None:
        """Keep a connection whose exchange completed cleanly; close anything else."""
        if self._closed or not conn.ready_for_reuse():
            close_socket(conn.socket)
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        if len(self._idle) > self._limits.upstream_keepalive:
            close_socket(self._idle.popleft().socket)

    def close_all(self) -> None:
        """Close idle connections; those in use close when released (a retired pool)."""
        self._closed = True
        while self._idle:
            close_socket(self._idle.pop().socket)
