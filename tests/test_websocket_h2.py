"""WebSocket over HTTP/2 (RFC 8441 extended CONNECT) through the real proxy to an HTTP/1.1
WebSocket backend, with wsproto framing on both ends."""

from __future__ import annotations

from pathlib import Path

import h2.settings
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)

from tests.support.h2client import h2_client
from tests.support.proxy import sites_toml, start_proxy

pytestmark = pytest.mark.slow


async def websocket_echo(stream: trio.SocketStream) -> None:
    """A WebSocket server (wsproto, HTTP/1.1 handshake): echoes every message, upper-cased
    for text, so the test sees the backend really answered."""
    ws = WSConnection(ConnectionType.SERVER)
    async with stream:
        while data := await stream.receive_some(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    await stream.send_all(ws.send(Message(data=event.data.upper())))
                elif isinstance(event, BytesMessage):
                    await stream.send_all(ws.send(Message(data=bytes(event.data))))
                elif isinstance(event, CloseConnection):
                    await stream.send_all(ws.send(event.response()))
                    return


async def test_websocket_over_http2_reaches_an_http1_backend(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, websocket_echo, listeners)
    proxy = await start_proxy(
        tmp_path, sites_toml((["localhost"], [f"http://127.0.0.1:{port}"])), http=False
    )
    try:
        async with h2_client(proxy) as client:
            assert client.conn.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
            sid = client.request(
                "/chat",
                method=b"CONNECT",
                headers=[(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")],
                end=False,
            )
            await client.flush()
            response = client.responses[sid]
            await client.until(lambda: response.status != 0)
            assert response.status == 200
            names = {name for name, _ in response.headers}
            assert not names & {b"upgrade", b"connection", b"sec-websocket-accept"}
            ws = Connection(ConnectionType.CLIENT)  # framing only: the handshake was h2's
            client.conn.send_data(sid, ws.send(Message(data="hello over h2")))
            client.conn.send_data(sid, ws.send(Message(data=b"\x00\x01" * 6000)))
            await client.flush()
            received: list[str | bytes] = []
            seen = 0

            def echoed() -> bool:
                nonlocal seen
                ws.receive_data(bytes(response.body[seen:]))
                seen = len(response.body)
                for event in ws.events():
                    if isinstance(event, TextMessage):
                        received.append(event.data)
                    elif isinstance(event, BytesMessage):
                        received.append(bytes(event.data))
                return len(received) == 2

            await client.until(echoed)
            assert received == ["HELLO OVER H2", b"\x00\x01" * 6000]
            client.conn.send_data(sid, ws.send(CloseConnection(code=1000)))
            await client.flush()
            await client.until(lambda: response.done)
            # Closed in order: END_STREAM (then NO_ERROR, as the client had not ended its side).
            assert response.ended and response.reset in (None, 0)
    finally:
        await proxy.terminate()
    assert "Traceback" not in proxy.log()
