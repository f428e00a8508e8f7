"""A real HTTP/1.1 backend for tests (trio + h11), with one route per behaviour under test.

Routes:
  /echo             JSON of method, target, headers and the request body's length
  /bytes/N          N bytes streamed in 64 KiB chunks with Content-Length
  /chunked/N        N bytes, chunked
  /upload           reads the body as it streams, answers its length and sha256
  /upload/slow      the same, reading 64 KiB per 10 ms (a slow upstream: flow-control tests)
  /sleep/S          answers after S seconds (drain tests)
  /stall            never answers (504 tests)
  /status/N         an empty response with status N (204, 304, ...)
  /early/413        answers 413 without reading the request body
  /hints            103 Early Hints, then 200
  /hsts             sets its own Strict-Transport-Security
  /trailers         chunked body with trailers: x-trailer, and x-echo-* of the request's trailers
  /hold             never answers; records in `hangups` when the proxy closes the connection
  /upgrade          accepts `Upgrade: echo`, then sends back every byte upper-cased
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import ssl
from dataclasses import dataclass, field

import h11
import trio

CHUNK = 65536


@dataclass
class Backend:
    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    connections: int = 0
    hangups: list[str] = field(default_factory=list)  # targets the proxy gave up on
    ssl_context: ssl.SSLContext | None = None  # serve HTTPS (an https:// upstream)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"


async def _send(stream: trio.SocketStream, conn: h11.Connection, *events: h11.Event) -> None:
    data = b"".join(conn.send(e) or b"" for e in events)
    await stream.send_all(data)


async def _read_body(
    stream: trio.SocketStream,
    conn: h11.Connection,
    trailers: list[tuple[bytes, bytes]] | None = None,
    pause: float = 0.0,
) -> bytes | None:
    """The whole body hashed as it arrives: returns (len, sha256) encoded, None if cut off.
    The request's trailers are appended to `trailers` if given."""
    digest = hashlib.sha256()
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if pause:
                await trio.sleep(pause)
            data = await stream.receive_some(CHUNK)
            conn.receive_data(data)
            if not data:
                return None
            continue
        if isinstance(event, h11.Data):
            digest.update(event.data)
            size += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            if trailers is not None:
                trailers.extend(event.headers)
            return json.dumps({"length": size, "sha256": digest.hexdigest()}).encode()
        else:
            return None


async def _respond(
    stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, backend: Backend
) -> None:
    path = request.target.decode()
    headers = {k.decode(): v.decode(errors="replace") for k, v in request.headers}  # obs-text
    fields = [(k.decode(), v.decode(errors="replace")) for k, v in request.headers]  # repeats too
    backend.requests.append(
        {"method": request.method.decode(), "target": path, "headers": headers, "fields": fields}
    )
    ok = 200
    if path.startswith("/bytes/") or path.startswith("/chunked/"):
        await _read_body(stream, conn)
        size = int(path.rsplit("/", 1)[1])
        fixed = path.startswith("/bytes/")
        resp_headers = [("content-length", str(size))] if fixed else []
        await _send(stream, conn, h11.Response(status_code=ok, headers=resp_headers))
        block = b"x" * CHUNK
        sent = 0
        while sent < size:
            piece = block[: min(CHUNK, size - sent)]
            await _send(stream, conn, h11.Data(data=piece))
            sent += len(piece)
        await _send(stream, conn, h11.EndOfMessage())
        return
    if path == "/upgrade":
        await _upgraded_echo(stream, conn, headers)
        return
    if path in ("/upload", "/upload/slow"):
        body = await _read_body(stream, conn, pause=0.01 if path == "/upload/slow" else 0.0)
        if body is None:
            return
        await _send(stream, conn, _ok(body), h11.Data(data=body), h11.EndOfMessage())
        return
    if path == "/trailers":
        trailers: list[tuple[bytes, bytes]] = []
        body = await _read_body(stream, conn, trailers)
        echoed = [(b"x-echo-" + name, value) for name, value in trailers]
        await _send(
            stream,
            conn,
            h11.Response(status_code=ok, headers=[("trailer", "x-trailer")]),
            h11.Data(data=body or b""),
            h11.EndOfMessage(headers=[(b"x-trailer", b"done"), *echoed]),
        )
        return
    if path == "/hold":
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(CHUNK):
                pass
        backend.hangups.append(path)
        return
    if path.startswith("/early/"):
        status = int(path.rsplit("/", 1)[1])
        await _send(
            stream,
            conn,
            h11.Response(
                status_code=status, headers=[("content-length", "0"), ("connection", "close")]
            ),
            h11.EndOfMessage(),
        )
        return
    body = await _read_body(stream, conn)
    if path.startswith("/sleep/"):
        await trio.sleep(float(path.rsplit("/", 1)[1]))
    elif path == "/stall":
        await trio.sleep(math.inf)
    elif path.startswith("/status/"):
        status = int(path.rsplit("/", 1)[1])
        await _send(stream, conn, h11.Response(status_code=status, headers=[]), h11.EndOfMessage())
        return
    elif path == "/hints":
        await _send(
            stream,
            conn,
            h11.InformationalResponse(status_code=103, headers=[("link", "</a.css>; rel=preload")]),
        )
    echo = {
        "method": request.method.decode(),
        "target": path,
        "headers": headers,
        "body": json.loads(body) if body else None,
    }
    payload = json.dumps(echo).encode()
    extra = [("strict-transport-security", "max-age=5")] if path == "/hsts" else []
    await _send(stream, conn, _ok(payload, extra), h11.Data(data=payload), h11.EndOfMessage())


async def _upgraded_echo(
    stream: trio.SocketStream, conn: h11.Connection, headers: dict[str, str]
) -> None:
    """A protocol switch as a WebSocket server does it, with a trivial protocol after it."""
    if headers.get("upgrade") != "echo" or "upgrade" not in headers.get("connection", ""):
        await _send(stream, conn, h11.Response(status_code=426, headers=[("content-length", "0")]))
        return
    switch = h11.InformationalResponse(
        status_code=101, headers=[("connection", "upgrade"), ("upgrade", "echo")]
    )
    await _send(stream, conn, switch)
    data = conn.trailing_data[0]
    while True:
        if data:
            await stream.send_all(data.upper())
        data = await stream.receive_some(CHUNK)
        if not data:
            return


def _ok(body: bytes, extra: list[tuple[str, str]] | None = None) -> h11.Response:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        *(extra or []),
    ]
    return h11.Response(status_code=200, headers=headers)


async def _connection(stream: trio.SocketStream, backend: Backend) -> None:
    backend.connections += 1
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(CHUNK))
                continue
            if isinstance(event, h11.Request):
                await _respond(stream, conn, event, backend)
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
            return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return
    finally:
        await stream.aclose()


async def serve_backend(
    backend: Backend, *, task_status: trio.TaskStatus[Backend] = trio.TASK_STATUS_IGNORED
) -> None:
    tcp = await trio.open_tcp_listeners(backend.port, host="127.0.0.1")  # 0: any free port
    backend.port = tcp[0].socket.getsockname()[1]
    context = backend.ssl_context
    listeners = tcp if context is None else [trio.SSLListener(t, context) for t in tcp]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda s: _connection(s, backend), listeners)
        task_status.started(backend)
