"""An HTTP/2 test client (h2 over a real TLS connection) that can also misbehave on purpose.

Tests drive it step by step: queue requests or raw frames, `flush()`, then `until()` some
condition on the responses collected so far. Received DATA is acknowledged at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from tests.support.proxy import ProxyProcess
from tests.support.tls import tls_stream

Fields = list[tuple[bytes, bytes]]


@dataclass
class Response:
    status: int = 0
    headers: Fields = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: Fields = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Client:
    def __init__(self, stream: trio.abc.Stream, authority: bytes) -> None:
        self.stream = stream
        self.authority = authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,  # tests send malformed requests on purpose
                normalize_outbound_headers=False,
            )
        )
        self.responses: dict[int, Response] = {}
        self.finished: list[int] = []  # stream ids in the order their responses completed
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.settings_received = False
        self.eof = False

    def request(
        self, path: str, *, method: bytes = b"GET", headers: Fields = (), end: bool = True
    ) -> int:
        """Queue a request head; returns its stream id."""
        stream_id: int = self.conn.get_next_available_stream_id()
        pseudo = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", self.authority),
            (b":path", path.encode()),
        ]
        self.conn.send_headers(stream_id, [*pseudo, *headers], end_stream=end)
        self.responses[stream_id] = Response()
        return stream_id

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def receive(self) -> None:
        """Read once and record what arrived; sets `eof` when the server closes."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return
        for event in self.conn.receive_data(data):
            self._record(event)
        await self.flush()

    async def until(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not condition():
                if self.eof:
                    raise AssertionError("server closed the connection")
                await self.receive()

    async def until_closed(self, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not self.eof:
                await self.receive()

    async def get(self, path: str, **kwargs: object) -> Response:
        stream_id = self.request(path, **kwargs)  # type: ignore[arg-type]
        await self.flush()
        response = self.responses[stream_id]
        await self.until(lambda: response.done)
        return response

    async def send_body(self, stream_id: int, data: bytes, trailers: Fields | None = None) -> None:
        """Send a request body within the server's windows, waiting for WINDOW_UPDATEs."""
        conn = self.conn
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                await self.receive()
                continue
            conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            await self.flush()
        if trailers:
            conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            conn.end_stream(stream_id)
        await self.flush()

    def _record(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            return
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            return
        response = self.responses.get(getattr(event, "stream_id", None) or 0)
        if response is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            response.headers = list(event.headers or [])
            response.status = int(dict(response.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            response.body += event.data or b""
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            response.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            response.ended = True
            self.finished.append(event.stream_id or 0)
        elif isinstance(event, h2.events.StreamReset):
            response.reset = event.error_code
            self.finished.append(event.stream_id or 0)


@contextlib.asynccontextmanager
async def h2_client(
    proxy: ProxyProcess, settings: dict[int, int] | None = None
) -> AsyncIterator[H2Client]:
    """A connection through the proxy's TLS port (ALPN h2), after the server's SETTINGS."""
    stream = await tls_stream(proxy, "h2")
    assert stream.selected_alpn_protocol() == "h2"
    authority = f"localhost:{proxy.https_port}".encode()
    async with h2_session(stream, authority, settings) as client:
        yield client


@contextlib.asynccontextmanager
async def h2_session(
    stream: trio.abc.Stream, authority: bytes, settings: dict[int, int] | None = None
) -> AsyncIterator[H2Client]:
    """HTTP/2 over an established stream, after the server's SETTINGS."""
    client = H2Client(stream, authority)
    if settings:  # in force from the start, as if the server had acknowledged them
        client.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
    client.conn.initiate_connection()
    await client.flush()
    try:
        await client.until(lambda: client.settings_received)
        yield client
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
