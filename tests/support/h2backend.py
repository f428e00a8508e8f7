"""A real HTTP/2 backend for tests (trio + h2): cleartext with prior knowledge, or TLS (ALPN h2).

Routes (each answers once the whole request has arrived):
  /echo       JSON of method, path, headers, body length and sha256, request trailers
  /slow/S     /echo after S seconds
  /bytes/N    N bytes, sent within the proxy's flow-control windows
  /trailers   a body, then trailers: x-status: 0 and the request trailers as x-echo-<name>
  /reset      RST_STREAM(INTERNAL_ERROR) instead of a response
  /refuse     RST_STREAM(REFUSED_STREAM): not processed, may be sent again
Knobs: max_concurrent_streams (announced in SETTINGS); goaway_after: once that many requests
arrived on a connection, GOAWAY naming only the first as processed, the others never answered.
The GOAWAY goes out in one write with that first response, as servers often send them.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

Fields = list[tuple[bytes, bytes]]


@dataclass
class H2Backend:
    max_concurrent_streams: int = 100
    goaway_after: int = 0
    ssl_context: ssl.SSLContext | None = None
    port: int = 0
    connections: int = 0
    closed: int = 0  # connections that have ended
    peak_streams: int = 0  # the most requests in flight at once on one connection
    requests: list[dict[str, object]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'h2c'}://127.0.0.1:{self.port}"


@dataclass
class _Request:
    headers: dict[str, str]
    body: Any = field(default_factory=hashlib.sha256)
    length: int = 0
    trailers: Fields = field(default_factory=list)
    window: trio.Event = field(default_factory=trio.Event)


class _Connection:
    def __init__(self, stream: trio.abc.Stream, backend: H2Backend) -> None:
        self.stream = stream
        self.backend = backend
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: backend.max_concurrent_streams
            },
        )
        self.requests: dict[int, _Request] = {}
        self.arrived = 0
        self.last_stream_id = 0  # after our GOAWAY: later streams are ignored
        self.goaway = b""  # sent ahead of whatever h2 has to send
        self.goaway_next = b""  # our GOAWAY, waiting for the next response to go with
        self.send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.goaway + self.h2.data_to_send()
            self.goaway = b""
            if data:
                await self.stream.send_all(data)

    async def serve(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        async with trio.open_nursery() as nursery:
            while data := await self.stream.receive_some(65536):
                for event in self.h2.receive_data(data):
                    self.handle(event, nursery)
                await self.flush()
            nursery.cancel_scope.cancel()

    def handle(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.request(event)
            return
        sid = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        request = self.requests.get(sid)
        if self.last_stream_id and sid > self.last_stream_id:
            return  # refused by our GOAWAY: never processed
        if isinstance(event, h2.events.DataReceived) and request is not None:
            request.body.update(event.data)
            request.length += len(event.data)
        elif isinstance(event, h2.events.TrailersReceived) and request is not None:
            request.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and request is not None:
            nursery.start_soon(self.respond, sid, request)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for waiting in self.requests.values():
                waiting.window.set()
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(sid, None)

    def request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        headers = {k.decode(): v.decode() for k, v in event.headers}
        self.backend.requests.append(headers)
        if self.last_stream_id:
            return
        self.requests[sid] = _Request(headers)
        self.arrived += 1
        self.backend.peak_streams = max(self.backend.peak_streams, len(self.requests))
        if self.arrived == self.backend.goaway_after:
            # Built by hand: h2 refuses to send anything after its own close_connection.
            last = self.last_stream_id = min(self.requests)
            self.goaway_next = GoAwayFrame(0, last_stream_id=last).serialize()
            self.requests = {sid: r for sid, r in self.requests.items() if sid <= last}

    async def respond(self, sid: int, request: _Request) -> None:
        path = request.headers[":path"].partition("?")[0]
        if path.startswith("/slow/"):
            await trio.sleep(float(path.rsplit("/", 1)[1]))
        self.goaway, self.goaway_next = self.goaway_next, b""  # in one write with this response
        if path == "/reset":
            self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
        elif path == "/refuse":
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        elif path.startswith("/bytes/"):
            self.h2.send_headers(sid, [(b":status", b"200")])
            await self.send_body(sid, request, b"x" * int(path.rsplit("/", 1)[1]))
        elif path == "/trailers":
            self.h2.send_headers(sid, [(b":status", b"200")])
            await self.send_body(sid, request, b"body", end=False)
            trailers = [(b"x-status", b"0")]
            trailers += [(b"x-echo-" + name, value) for name, value in request.trailers]
            self.h2.send_headers(sid, trailers, end_stream=True)
        else:
            echo = {
                "headers": request.headers,
                "length": request.length,
                "sha256": request.body.hexdigest(),
                "trailers": {k.decode(): v.decode() for k, v in request.trailers},
            }
            payload = json.dumps(echo).encode()
            self.h2.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/json")]
            )
            await self.send_body(sid, request, payload)
        self.requests.pop(sid, None)
        await self.flush()

    async def send_body(self, sid: int, request: _Request, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                request.window = trio.Event()
                await self.flush()
                await request.window.wait()
                continue
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(sid, bytes(view[:size]))
            view = view[size:]
            await self.flush()
        if end:
            self.h2.end_stream(sid)


async def _serve_connection(stream: trio.abc.Stream, backend: H2Backend) -> None:
    backend.connections += 1
    try:
        await _Connection(stream, backend).serve()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
        pass
    finally:
        backend.closed += 1
        await stream.aclose()


async def serve_h2_backend(
    backend: H2Backend, *, task_status: trio.TaskStatus[H2Backend] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = []
    for listener in await trio.open_tcp_listeners(0, host="127.0.0.1"):
        backend.port = listener.socket.getsockname()[1]
        if backend.ssl_context is None:
            listeners.append(listener)
        else:
            listeners.append(trio.SSLListener(listener, backend.ssl_context))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _serve_connection(s, backend), listeners)
        task_status.started(backend)
