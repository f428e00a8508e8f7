"""A small HTTP/3 client for the tests: aioquic's sans-IO QUIC and HTTP/3 driven by trio
over a UDP socket on loopback. It verifies the server's certificate for the SNI name."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamReset
from aioquic.tls import SessionTicket

Headers = list[tuple[bytes, bytes]]


@dataclass
class Response:
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    reset: int | None = None
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H3Client:
    def __init__(self, sock: socket.socket, quic: QuicConnection) -> None:
        self._sock = sock
        self._trio_sock = trio.socket.from_stdlib_socket(sock)
        self.quic = quic
        self.h3 = H3Connection(quic)
        self.handshake = trio.Event()
        self.closed = trio.Event()
        self._responses: dict[int, Response] = {}
        self._sent = trio.Event()

    def transmit(self) -> None:
        for data, _ in self.quic.datagrams_to_send(trio.current_time()):
            self._sock.send(data)  # a non-blocking send: loss is QUIC's to recover
        self._sent.set()

    async def run(self) -> None:
        while not self.closed.is_set():
            timer = self.quic.get_timer()
            with trio.move_on_at(math.inf if timer is None else timer):
                self._sent = trio.Event()
                data = await self._trio_sock.recv(65535)
                peer = self._sock.getpeername()
                self.quic.receive_datagram(data, peer, trio.current_time())
            timer = self.quic.get_timer()
            if timer is not None and trio.current_time() >= timer:
                self.quic.handle_timer(trio.current_time())
            self._events()
            self.transmit()

    def _events(self) -> None:
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake.set()
            elif isinstance(event, ConnectionTerminated):
                self.closed.set()
                for response in self._responses.values():
                    response.done.set()
            elif isinstance(event, StreamReset) and event.stream_id in self._responses:
                self._responses[event.stream_id].reset = event.error_code
                self._responses[event.stream_id].done.set()
            for h3_event in self.h3.handle_event(event):
                response = self._responses.get(getattr(h3_event, "stream_id", -1))
                if response is None:
                    continue
                if isinstance(h3_event, HeadersReceived):
                    if response.headers and int(dict(response.headers)[b":status"]) >= 200:
                        response.trailers = h3_event.headers
                    else:
                        response.headers = h3_event.headers
                elif isinstance(h3_event, DataReceived):
                    response.body += h3_event.data
                if getattr(h3_event, "stream_ended", False):
                    response.done.set()

    async def request(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        *,
        body: bytes = b"",
        headers: Headers | None = None,
        trailers: Headers | None = None,
    ) -> Response:
        sid = self.quic.get_next_available_stream_id()
        response = self._responses[sid] = Response()
        request_headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path),
            *(headers or []),
        ]
        self.h3.send_headers(sid, request_headers, end_stream=not body and not trailers)
        for start in range(0, len(body), 1 << 16):
            last = start + (1 << 16) >= len(body)
            self.h3.send_data(sid, body[start : start + (1 << 16)], last and not trailers)
            self.transmit()
            await trio.sleep(0)
        if trailers:
            self.h3.send_headers(sid, trailers, end_stream=True)
        self.transmit()
        await response.done.wait()
        return response


@asynccontextmanager
async def h3_client(
    port: int,
    server_name: str,
    cafile: Path,
    *,
    handshake: bool = True,
    token: bytes = b"",
    session_ticket: SessionTicket | None = None,
    tickets: list[SessionTicket] | None = None,
) -> AsyncIterator[H3Client]:
    """A connected client (handshake done unless `handshake` is False); closed on exit.
    `token` is sent in its Initial; with `session_ticket` it resumes (and sends early data
    if the ticket allows); session tickets the server issues are appended to `tickets`."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=server_name,
        idle_timeout=30,
        token=token,
        session_ticket=session_ticket,
    )
    configuration.load_verify_locations(cafile=str(cafile))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        quic = QuicConnection(
            configuration=configuration,
            session_ticket_handler=None if tickets is None else tickets.append,
        )
        quic.connect(("127.0.0.1", port), trio.current_time())
        client = H3Client(sock, quic)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            client.transmit()
            if handshake:
                with trio.fail_after(10):
                    await client.handshake.wait()
            yield client
            client.quic.close()
            client.transmit()
            nursery.cancel_scope.cancel()
