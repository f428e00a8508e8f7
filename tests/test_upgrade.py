"""HTTP/1.1 protocol upgrades (what WebSockets use) tunnel through the proxy, and survive a
config reload."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.proxy import ProxyProcess, sites_toml, write_config
from tests.support.tls import tls_socket

pytestmark = pytest.mark.slow

UPGRADE = (
    b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
)


def _read_head(tls: ssl.SSLSocket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"closed before a full head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_exactly(tls: ssl.SSLSocket, size: int, got: bytes = b"") -> bytes:
    while len(got) < size:
        chunk = tls.recv(65536)
        assert chunk, "tunnel closed"
        got += chunk
    return got


def _echo(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    tls.sendall(payload)
    return _read_exactly(tls, len(payload))


# The backend runs in this test's event loop: blocking client I/O goes to a thread.
in_thread = trio.to_thread.run_sync


async def test_upgrade_tunnels_both_ways_and_survives_reload(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    tls = await in_thread(tls_socket, proxy)
    with tls:
        early = b"early bytes "  # may arrive with the head, as clients do
        await in_thread(tls.sendall, UPGRADE + early)
        head, rest = await in_thread(_read_head, tls)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        assert "upgrade: echo" in lines and "connection: upgrade" in lines
        assert await in_thread(_read_exactly, tls, len(early), rest) == early.upper()
        assert await in_thread(_echo, tls, b"hello") == b"HELLO"
        forwarded = backend.requests[-1]["headers"]
        assert isinstance(forwarded, dict) and forwarded["upgrade"] == "echo"

        write_config(
            tmp_path,
            sites_toml((["localhost"], [backend.url]), (["other.test"], [backend.url])),
            http_port=proxy.http_port,
            https_port=proxy.https_port,
        )
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_log("site other.test added", timeout=10)
        assert await in_thread(_echo, tls, b"after reload") == b"AFTER RELOAD"


async def test_upgrade_refused_by_the_upstream_is_a_plain_response(proxy: ProxyProcess) -> None:
    tls = await in_thread(tls_socket, proxy)
    with tls:
        await in_thread(tls.sendall, UPGRADE.replace(b"Upgrade: echo", b"Upgrade: other"))
        head, _ = await in_thread(_read_head, tls)
    assert head.startswith(b"HTTP/1.1 426 ")
