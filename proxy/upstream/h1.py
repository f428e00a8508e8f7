"""An HTTP/1.1 connection to an upstream backend (h11, client role)."""

from __future__ import annotations

import socket
from typing import Any

import h11
import trio

from proxy.config import Upstream
from proxy.http.model import Headers
from proxy.netio import SocketStream

UpstreamEvent = h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage


class UpstreamClosed(Exception):
    """The upstream closed the connection or broke the protocol before the response ended."""


class UpstreamConnection:
    """One keep-alive connection; used by one request at a time, pooled while idle."""

    __slots__ = ("_h11", "idle_since", "reused", "stream", "upstream")

    def __init__(self, sock: socket.socket, upstream: Upstream, max_head_bytes: int) -> None:
        self.stream = SocketStream(sock)
        self.upstream = upstream
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self.reused = False
        self.idle_since = 0.0

    def request_bytes(self, method: bytes, target: bytes, headers: Headers, end: bool) -> bytes:
        """The request head, plus the end of message when there is no body: one write."""
        conn = self._h11
        data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if end:
            data += conn.send(h11.EndOfMessage()) or b""
        return data

    def data_bytes(self, data: bytes) -> bytes:
        return self._h11.send(h11.Data(data=data)) or b""

    def end_bytes(self, trailers: Headers | None) -> bytes:
        return self._h11.send(h11.EndOfMessage(headers=trailers or [])) or b""

    async def send(self, data: bytes, deadline: float) -> None:
        await self.stream.send_all(data, deadline)

    async def wait_for_response(self, timeout: float) -> None:
        """Right after sending a request nothing can be there yet: wait, don't read."""
        await self.stream.wait_readable(trio.current_time() + timeout)

    async def next_event(self, timeout: float) -> UpstreamEvent:
        """The next response event, reading as needed; each read may wait up to `timeout`."""
        conn = self._h11
        try:
            while True:
                event: Any = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(trio.current_time() + timeout)
                    conn.receive_data(data)
                    continue
                if type(event) is h11.ConnectionClosed or event is h11.PAUSED:
                    raise UpstreamClosed("upstream closed the connection")
                return event  # type: ignore[no-any-return]
        except h11.RemoteProtocolError as exc:
            raise UpstreamClosed(f"upstream broke HTTP/1.1: {exc}") from exc

    def buffered_event(self) -> UpstreamEvent | None:
        """An event already decodable from received bytes, without reading: lets the
        forwarder coalesce a response head with the body bytes that came with it."""
        try:
            event: Any = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamClosed(f"upstream broke HTTP/1.1: {exc}") from exc
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return None
        if type(event) is h11.ConnectionClosed:
            raise UpstreamClosed("upstream closed the connection")
        return event  # type: ignore[no-any-return]

    def finish_cycle(self) -> bool:
        """True if both sides completed cleanly and the connection can serve another request."""
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    def is_stale(self) -> bool:
        """An idle connection the upstream has closed (or sent junk on) must not be reused."""
        try:
            self.stream.socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True  # EOF, or bytes nobody asked for

    async def aclose(self) -> None:
        await self.stream.aclose()
