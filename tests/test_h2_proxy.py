"""HTTP/2 to clients through the real proxy process: curl, h2load and an h2 client that
misbehaves on purpose, in front of the real HTTP/1.1 backend."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from proxy.config import Http2Config, LimitsConfig
from proxy.connections import ConnectionRegistry
from proxy.http.h2 import H2ServerSession, H2ServerStream
from proxy.http.model import ConnectionInfo, ResponseHead
from proxy.netio import SocketStream
from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.h2client import h2_client, h2_session
from tests.support.proxy import (
    RSS_GROWTH_LIMIT_KIB,
    ProxyProcess,
    curl_with_rss,
    sites_toml,
    start_proxy,
)
from tests.support.run import run


@pytest.mark.slow
async def test_curl_get_carries_forwarded_headers_and_hsts(proxy: ProxyProcess) -> None:
    reply = await curl("--http2", "-H", "Cookie: a=1", *proxy.curl_args("/echo?q=1"))
    lines, body = reply.heads[0], reply.body
    assert lines[0].rstrip() == "HTTP/2 200"
    assert "strict-transport-security: max-age=63072000; includeSubDomains" in lines
    assert "via: 1.1 port443" in lines
    seen = json.loads(body)
    assert seen["target"] == "/echo?q=1"
    assert seen["headers"]["host"] == f"localhost:{proxy.https_port}"
    assert seen["headers"]["via"] == "2 port443"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["x-forwarded-host"] == f"localhost:{proxy.https_port}"
    assert seen["headers"]["cookie"] == "a=1"


@pytest.mark.slow
async def test_curl_upload_larger_than_the_windows(proxy: ProxyProcess, tmp_path: Path) -> None:
    """3 MiB exceeds the stream (64 KiB) and connection (1 MiB) windows: it only gets through
    if the proxy opens them again as the upstream reads. Expect: 100-continue is answered."""
    payload = tmp_path / "payload"
    data = bytes(range(256)) * (3 * 4096)
    payload.write_bytes(data)
    result = await curl(
        "--http2", "-v", "-H", "Expect: 100-continue", "--data-binary", f"@{payload}",
        *proxy.curl_args("/upload"),
    )  # fmt: skip
    assert json.loads(result.body) == {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert b"< HTTP/2 100" in result.stderr


@pytest.mark.slow
async def test_h2load_2000_requests_50_streams_per_connection(proxy: ProxyProcess) -> None:
    result = await run("h2load", "-n", "2000", "-c", "4", "-m", "50", proxy.url("/echo"))
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "Application protocol: h2" in out
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", out), out
    assert "status codes: 2000 2xx" in out


@pytest.mark.slow
async def test_cookie_crumbs_are_joined_and_malformed_requests_reset_only_their_stream(
    proxy: ProxyProcess,
) -> None:
    async with h2_client(proxy) as client:
        malformed = [
            [(b"connection", b"keep-alive")],
            [(b"transfer-encoding", b"chunked")],
            [(b"te", b"gzip")],
            [(b"X-Upper", b"1")],
            [(b"x-bad", b"a\r\nb")],
            [(b"x-a", b"1"), (b":path", b"/echo")],  # pseudo-header after a regular field
        ]
        ids = [client.request("/echo", headers=fields) for fields in malformed]
        await client.flush()
        await client.until(lambda: all(client.responses[i].done for i in ids))
        assert [client.responses[i].reset for i in ids] == [ErrorCodes.PROTOCOL_ERROR] * len(ids)
        # The connection survives; cookie crumbs arrive as one header (RFC 9113 §8.2.3), and
        # TE is allowed with "trailers".
        cookies = [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")]
        response = await client.get("/echo", headers=cookies)
        assert response.status == 200
        seen = json.loads(response.body)["headers"]
        assert seen["cookie"] == "a=1; b=2"
    assert "malformed request" in proxy.log()


@pytest.mark.slow
async def test_100_streams_one_slow_does_not_hold_back_the_others(proxy: ProxyProcess) -> None:
    async with h2_client(proxy) as client:
        slow = client.request("/sleep/2")
        fast = [client.request(f"/echo?n={n}") for n in range(99)]
        await client.flush()
        await client.until(lambda: len(client.finished) == 100, timeout=30)
    assert client.finished[-1] == slow
    assert sorted(client.finished[:-1]) == fast
    assert {client.responses[i].status for i in client.responses} == {200}


@pytest.mark.slow
async def test_slow_reader_200mb_download_keeps_rss_bounded(proxy: ProxyProcess) -> None:
    """curl reads at 64 MB/s, slower than backend and proxy produce: the proxy must hold
    the upstream back (client window, then the socket) instead of buffering."""
    size = 200 * 1024 * 1024
    reply, growth = await curl_with_rss(
        proxy, "--http2", "--limit-rate", "64M", "-o", "/dev/null",
        "-w", "%{size_download} %{http_version}", *proxy.curl_args(f"/bytes/{size}"),
    )  # fmt: skip
    assert reply.body.split() == [str(size).encode(), b"2"]
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"


@pytest.mark.slow
async def test_response_data_stays_within_a_small_client_window(proxy: ProxyProcess) -> None:
    """h2 raises FlowControlError in the client if the proxy ever overruns its window."""
    async with h2_client(proxy, {SettingCodes.INITIAL_WINDOW_SIZE: 1000}) as client:
        response = await client.get("/bytes/300000")
    assert response.status == 200
    assert len(response.body) == 300000


@pytest.mark.slow
async def test_rst_stream_cancels_the_upstream_request(
    proxy: ProxyProcess, backend: Backend
) -> None:
    async with h2_client(proxy) as client:
        held = client.request("/hold")
        await client.flush()
        with trio.fail_after(10):
            while not any(r["target"] == "/hold" for r in backend.requests):
                await trio.sleep(0.02)
        client.conn.reset_stream(held, ErrorCodes.CANCEL)
        await client.flush()
        with trio.fail_after(10):
            while not backend.hangups:
                await trio.sleep(0.02)
        assert backend.hangups == ["/hold"]
        assert (await client.get("/echo")).status == 200


@pytest.mark.slow
async def test_data_for_finished_streams_is_still_acknowledged(proxy: ProxyProcess) -> None:
    """16 uploads fill the whole 1 MiB connection window, and the upstream answers 413 without
    reading: unless the proxy gives that window back, the last upload can never be sent
    (python-hyper/h2 issue 1210)."""
    async with h2_client(proxy) as client:
        early = [client.request("/early/413", method=b"POST", end=False) for _ in range(16)]
        for stream_id in early:
            for _ in range(4):
                client.conn.send_data(stream_id, bytes(16384))
        await client.flush()
        await client.until(lambda: all(client.responses[i].done for i in early))
        assert {client.responses[i].status for i in early} == {413}
        upload = client.request("/upload", method=b"POST", end=False)
        await client.send_body(upload, b"y" * 300_000)
        await client.until(lambda: client.responses[upload].done)
        assert json.loads(client.responses[upload].body)["length"] == 300_000


async def test_unread_request_data_is_acknowledged_when_a_stream_ends() -> None:
    """In process over a socketpair, with a handler that answers without reading the body:
    16 streams x 64 KiB fill the 1 MiB connection window and stay unread until their handlers
    end, so the last upload only gets through if ending a stream gives that window back."""

    async def handler(exchange: H2ServerStream) -> None:
        size = 0
        if exchange.request.target == b"/upload":
            while data := await exchange.receive_data():
                size += len(data)
        else:  # the stream's whole window arrives and stays unread
            while exchange.unread < 65536:
                await trio.sleep(0.01)
        await exchange.send_head(ResponseHead(200, []), str(size).encode(), end=True)

    ours, theirs = socket.socketpair()
    info = ConnectionInfo("127.0.0.1", None, "h2")
    connection = H2ServerSession(
        SocketStream(ours),
        info,
        handler,
        LimitsConfig(),
        Http2Config(),
        ConnectionRegistry(1).admit(),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            client_stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
            async with h2_session(client_stream, b"localhost") as client:
                early = [client.request("/early", method=b"POST", end=False) for _ in range(16)]
                for stream_id in early:
                    for _ in range(4):
                        client.conn.send_data(stream_id, bytes(16384))
                await client.flush()
                await client.until(lambda: all(client.responses[i].done for i in early))
                upload = client.request("/upload", method=b"POST", end=False)
                await client.send_body(upload, bytes(300_000))
                await client.until(lambda: client.responses[upload].done)
                assert bytes(client.responses[upload].body) == b"300000"


@pytest.mark.slow
async def test_trailers_pass_both_ways(proxy: ProxyProcess) -> None:
    async with h2_client(proxy) as client:
        stream_id = client.request("/trailers", method=b"POST", end=False)
        await client.send_body(stream_id, b"body", trailers=[(b"x-client", b"sent")])
        await client.until(lambda: client.responses[stream_id].done)
    response = client.responses[stream_id]
    assert response.status == 200
    assert json.loads(response.body)["length"] == 4
    assert response.trailers == [(b"x-trailer", b"done"), (b"x-echo-x-client", b"sent")]


@pytest.mark.slow
async def test_rapid_reset_gets_goaway_while_other_connections_work(
    proxy: ProxyProcess,
) -> None:
    async with h2_client(proxy) as bystander, h2_client(proxy) as attacker:
        with trio.move_on_after(10):
            for _ in range(50):  # 5000 HEADERS + RST_STREAM pairs, 100 per write
                for _ in range(100):
                    attacker.conn.reset_stream(attacker.request("/echo"), ErrorCodes.CANCEL)
                try:
                    await attacker.flush()
                except trio.BrokenResourceError:
                    break
        await attacker.until_closed()
        assert attacker.terminated is not None
        assert attacker.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert (await bystander.get("/echo")).status == 200
    assert "more than 200 stream resets per second" in proxy.log()


@pytest.mark.slow
@pytest.mark.parametrize("frame", ["ping", "settings"])
async def test_control_frame_floods_get_goaway(proxy: ProxyProcess, frame: str) -> None:
    async with h2_client(proxy) as client:
        for n in range(500):
            if frame == "ping":
                client.conn.ping(n.to_bytes(8, "big"))
            else:
                client.conn.update_settings({SettingCodes.MAX_HEADER_LIST_SIZE: 1000 + n})
        await client.flush()
        await client.until_closed()
    assert client.terminated is not None
    assert client.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM


@pytest.mark.slow
@pytest.mark.parametrize(
    ("frames", "size", "code"),
    [
        (20, 16384, ErrorCodes.ENHANCE_YOUR_CALM),  # a header block beyond the header list cap
        (100, 0, ErrorCodes.PROTOCOL_ERROR),  # beyond h2's 64 CONTINUATION frames
    ],
)
async def test_continuation_flood_is_cut_off(
    proxy: ProxyProcess, frames: int, size: int, code: ErrorCodes
) -> None:
    async with h2_client(proxy) as client:
        # The block never ends, so its bytes are never decoded: any will do.
        head = HeadersFrame(1, data=bytes(100), flags=["END_STREAM"])
        rest = ContinuationFrame(1, data=bytes(size)).serialize() * frames
        # The proxy may close before it has read everything.
        with trio.move_on_after(10), contextlib.suppress(trio.BrokenResourceError):
            await client.stream.send_all(head.serialize() + rest)
        await client.until_closed()
    assert client.terminated is not None
    assert client.terminated.error_code == code


@pytest.mark.slow
async def test_sigterm_sends_goaway_and_lets_the_stream_in_flight_finish(
    proxy: ProxyProcess, backend: Backend
) -> None:
    """nghttp prints every frame; the h2 library's own client cannot receive after GOAWAY."""
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def client() -> None:
        results.append(await run("nghttp", "-nv", proxy.url("/sleep/1"), timeout=20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        with trio.fail_after(10):
            while not backend.requests:
                await trio.sleep(0.02)
        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.wait(15) == 0
    out = results[0].stdout.decode()
    assert results[0].returncode == 0, out
    goaway = re.search(r"recv GOAWAY frame .*\n *\(last_stream_id=(\d+), error_code=NO_ERROR", out)
    assert goaway is not None, out
    status = out.index(f"recv (stream_id={goaway[1]}) :status: 200")
    assert goaway.start() < status  # GOAWAY first, then the response still in flight
    assert re.search(r"recv DATA frame .*\n *; END_STREAM", out[status:])


@pytest.mark.slow
async def test_idle_connection_gets_goaway_after_keepalive_timeout(
    tmp_path: Path, backend: Backend
) -> None:
    config = sites_toml((["localhost"], [backend.url])) + "[limits]\nkeepalive_timeout = 0.5\n"
    proxy = await start_proxy(tmp_path, config)
    try:
        async with h2_client(proxy) as client:
            assert (await client.get("/echo")).status == 200
            await client.until_closed()
        assert client.terminated is not None
        assert client.terminated.error_code == ErrorCodes.NO_ERROR
    finally:
        await proxy.terminate()
