"""TLS client connections to the proxy's HTTPS port, for tests that write their own bytes."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import trio

from tests.support.proxy import ProxyProcess


def client_context(proxy: ProxyProcess, *alpn: str, cafile: Path | None = None) -> ssl.SSLContext:
    """Trusting the proxy's local CA (or `cafile`), offering `alpn`."""
    context = ssl.create_default_context(cafile=str(cafile or proxy.root_ca))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def tls_socket(
    proxy: ProxyProcess, alpn: str = "http/1.1", host: str = "localhost"
) -> ssl.SSLSocket:
    """A blocking TLS socket, handshake done (10 s timeout on each operation)."""
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10)
    return client_context(proxy, alpn).wrap_socket(raw, server_hostname=host)


async def tls_stream(
    proxy: ProxyProcess, alpn: str = "http/1.1", host: str = "localhost", cafile: Path | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream for the test's event loop, handshake done."""
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.https_port)
    stream = trio.SSLStream(tcp, client_context(proxy, alpn, cafile=cafile), server_hostname=host)
    await stream.do_handshake()
    return stream
