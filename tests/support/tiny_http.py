"""The one small HTTP/1.1 server (trio + h11) that the test doubles answering whole requests
share: each request is read with its whole body, handed to `answer`, and its reply sent with
a Content-Length; connections are kept alive until the peer closes or asks to, and closed on
any broken or malformed input. Servers that stream, stall or misbehave on purpose keep their
own loops (backend.py, rawbackend.py, test_compression.py, test_retries.py)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from functools import partial

import h11
import trio

Reply = tuple[int, list[tuple[str, str]], bytes]  # status, header fields, body
Answer = Callable[[h11.Request, bytes], Awaitable[Reply]]


async def serve_http(
    answer: Answer,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on a free loopback port (HTTPS with `ssl_context`); started with that port."""
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(tcp[0].socket.getsockname()[1])
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context) for listener in tcp]
    task_status.started(port)
    await trio.serve_listeners(partial(_connection, answer), listeners)


async def _connection(answer: Answer, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request, body = await _read_request(conn, stream)
            if request is None:
                return
            status, headers, payload = await answer(request, body)
            fields = [*headers, ("content-length", str(len(payload)))]
            out = conn.send(h11.Response(status_code=status, headers=fields)) or b""
            if request.method != b"HEAD":
                out += conn.send(h11.Data(data=payload)) or b""
            await stream.send_all(out + (conn.send(h11.EndOfMessage()) or b""))
            if conn.our_state is not h11.DONE:  # the peer asked to close
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError):
        return
    finally:
        await stream.aclose()


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream
) -> tuple[h11.Request | None, bytes]:
    """The next request and its whole body; (None, b"") once the peer has closed."""
    request, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, body
        else:  # ConnectionClosed
            return None, b""
