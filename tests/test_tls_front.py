"""The TLS front door under hostile and unusual ClientHellos, against the running proxy:
stalled partial hellos cost no CPU, a hello spanning records still works, a malformed
hello gets a TLS alert and only an HTTP request line gets an HTTP answer."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import trio

from tests.support.curl import curl
from tests.support.proxy import ProxyProcess
from tests.support.tls_hello import long_alpn, python_hello, with_short_extensions

pytestmark = pytest.mark.slow

ALERT = 0x15
FATAL = 2
DECODE_ERROR = 50
STALLED = 300
STALL_SECONDS = 3.0
CPU_BOUND = 0.5  # seconds of proxy CPU over the stall: polling 300 sockets costs several


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def stalled_hellos(port: int, count: int, data: bytes) -> Iterator[list[socket.socket]]:
    """`count` connections that each send `data` (a ClientHello prefix) and stall."""
    with ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            sock.sendall(data)
            socks.append(sock)
        yield socks


def still_waiting(sock: socket.socket) -> bool:
    """Nothing received and not closed: the proxy still waits for the rest of the hello."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


def read_until_closed(sock: socket.socket) -> bytes:
    """All the peer sends before closing; a reset (it closed with our bytes unread) ends it
    the same way."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


class PiecewiseClient:
    """A real TLS client (Python's OpenSSL over memory BIOs) whose first flight reaches the
    proxy in pieces, with pauses: what a slow or fragmenting network delivers."""

    def __init__(self, port: int, cafile: Path, server_name: str, alpn: list[str]) -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.set_alpn_protocols(alpn)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._incoming, self._outgoing, server_hostname=server_name)
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self._sock.close()

    def handshake(self, cuts: list[int], pause: float) -> int:
        """Send the ClientHello cut at the offsets `cuts`, then finish the handshake;
        returns the hello's size."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self._outgoing.read()
        for start, end in zip([0, *cuts], [*cuts, len(hello)], strict=True):
            self._sock.sendall(hello[start:end])
            time.sleep(pause)
        while True:
            try:
                self.tls.do_handshake()
                return len(hello)
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()

    def request(self, raw: bytes) -> bytes:
        """Send a request and read the response until the server closes."""
        self.tls.write(raw)
        self._flush()
        response = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._feed():
                    return response
                continue
            if not chunk:  # close_notify
                return response
            response += chunk

    def _flush(self) -> None:
        self._sock.sendall(self._outgoing.read())

    def _feed(self) -> bool:
        data = self._sock.recv(65536)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        return bool(data)


async def test_stalled_partial_hellos_cost_no_cpu(proxy: ProxyProcess) -> None:
    partial = python_hello("localhost", ["h2", "http/1.1"])[:60]
    with stalled_hellos(proxy.https_port, STALLED, partial) as socks:
        await trio.sleep(0.5)  # the proxy accepts and peeks them all
        before = cpu_seconds(proxy.process.pid)
        end = trio.current_time() + STALL_SECONDS
        answered = 0
        while trio.current_time() < end:
            result = await curl(*proxy.curl_args("/echo"), "-o", "/dev/null", check=False)
            assert result.status == 200, result
            answered += 1
            await trio.sleep(0.25)
        used = cpu_seconds(proxy.process.pid) - before
        assert all(still_waiting(sock) for sock in socks)
    assert answered >= 5
    assert used < CPU_BOUND, f"{used:.2f}s CPU over {STALL_SECONDS}s of {STALLED} stalled hellos"


async def test_partial_hello_then_close_is_closed_at_once(proxy: ProxyProcess) -> None:
    partial = python_hello("localhost")[:60]
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as sock:
        sock.sendall(partial)
        await trio.sleep(0.2)  # the proxy waits for the rest of the hello
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        reply = await trio.to_thread.run_sync(read_until_closed, sock)
    assert reply == b""
    assert time.monotonic() - started < 2  # not the 10 s header timeout
    assert (await curl(*proxy.curl_args("/echo"))).returncode == 0


async def test_hello_over_16k_in_pieces_across_two_records(proxy: ProxyProcess) -> None:
    """Post-quantum key shares and many extensions make hellos span records; the pieces
    end mid-record, mid-header and mid-handshake-message."""
    alpn = [*long_alpn(80), "http/1.1"]
    client = PiecewiseClient(proxy.https_port, proxy.root_ca, "localhost", alpn)
    try:
        sent = await trio.to_thread.run_sync(client.handshake, [60, 2**14 + 5 + 3], 0.3)
        assert sent > 2**14 + 5 + 3  # two records, the second cut after its header's 3rd byte
        assert client.tls.selected_alpn_protocol() == "http/1.1"
        request = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        response = await trio.to_thread.run_sync(client.request, request)
    finally:
        client.close()
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]


async def exchange_raw(proxy: ProxyProcess, data: bytes) -> bytes:
    """Send `data` to the TLS port and read the answer until the proxy closes."""
    with socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as sock:
        sock.sendall(data)
        return await trio.to_thread.run_sync(read_until_closed, sock)


@pytest.mark.parametrize("missing", [4, 1, -4])
async def test_malformed_hello_gets_decode_error_alert(proxy: ProxyProcess, missing: int) -> None:
    """A hello whose extensions length is off: OpenSSL's decode_error, as nginx sends."""
    hello = with_short_extensions(python_hello("localhost", ["h2", "http/1.1"]), missing)
    reply = await exchange_raw(proxy, hello)
    assert len(reply) == 7, reply  # one alert record, nothing else
    assert (reply[0], reply[1], reply[5], reply[6]) == (ALERT, 3, FATAL, DECODE_ERROR), reply
    assert b"HTTP" not in reply
    assert "malformed ClientHello" in proxy.log()


async def test_http_request_line_gets_http_400(proxy: ProxyProcess) -> None:
    reply = await exchange_raw(proxy, b"POST /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400 Bad Request\r\n"), reply


async def test_other_bytes_get_no_http_answer(proxy: ProxyProcess) -> None:
    reply = await exchange_raw(proxy, b"\x00\x01 neither TLS nor HTTP\r\n\r\n")
    assert b"HTTP" not in reply
    assert (await curl(*proxy.curl_args("/echo"))).returncode == 0
