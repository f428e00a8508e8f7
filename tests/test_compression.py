"""Response compression through the real proxy: curl over HTTP/1.1 and HTTP/2 negotiates
each coding and decodes it (`--compressed`; curl here is built with zlib, brotli and zstd),
a backend shapes the responses that must stay as they are, a slow event stream arrives
event by event, and 50 MB pass through under a memory bound."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio

from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.slow

PROTOCOLS = ("--http1.1", "--http2")
CODINGS = ("zstd", "br", "gzip")
LINE = b"%08d the quick brown fox jumps over the lazy dog\n"  # 50 bytes
BIG = 50 * 1024 * 1024
HWM_GROWTH_LIMIT_KIB = 24 * 1024  # half the body: holding it whole would exceed this


def text(start: int, size: int) -> bytes:
    """`size` bytes of numbered lines from line `start`: compressible, never repeating."""
    count = size // len(LINE % 0) + 1
    return b"".join(LINE % i for i in range(start, start + count))[:size]


def big_pieces() -> Iterator[bytes]:
    """The 50 MB body in 64 KiB pieces (1,310 lines each, the last piece shorter)."""
    lines = 65536 // 50
    for offset in range(0, BIG, lines * 50):
        yield text(offset // 50, min(lines * 50, BIG - offset))


@dataclass
class ShapedBackend:
    """HTTP/1.1 backend whose response the query shapes:
    /doc?size=N&type=T&chunked=1&etag=E&vary=V&cc=C&gzipped=1 (honours Range),
    /events (an event, then the next once `release` is set), /big (50 MB, chunked)."""

    port: int = 0
    release: trio.Event = field(default_factory=trio.Event)
    FIELDS = (("etag", "etag"), ("vary", "vary"), ("cc", "cache-control"))  # query -> field

    def response(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], list[bytes]]:
        url = urlsplit(request.target.decode())
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        body = text(0, int(query.get("size", "20000")))
        headers = [("content-type", query.get("type", "text/html; charset=utf-8"))]
        headers += [(name, query[key]) for key, name in self.FIELDS if key in query]
        status = 200
        ranged = dict(request.headers).get(b"range", b"")
        if ranged.startswith(b"bytes="):
            first, _, last = ranged[6:].decode().partition("-")
            start, end = int(first), min(int(last), len(body) - 1)
            status, total = 206, len(body)
            body = body[start : end + 1]
            headers.append(("content-range", f"bytes {start}-{end}/{total}"))
        if "gzipped" in query:
            body = gzip.compress(body)
            headers.append(("content-encoding", "gzip"))
        if "chunked" not in query:
            headers.append(("content-length", str(len(body))))
        return status, headers, [body]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await self._exchanges(stream, conn)

    async def _exchanges(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        """Requests of one connection answered in turn until it closes."""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                pass  # GET requests: no body to read
            await self._answer(stream, conn, event)
            conn.start_next_cycle()

    async def _answer(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
    ) -> None:
        path = urlsplit(request.target.decode()).path

        async def send(event: h11.Event) -> None:
            await stream.send_all(conn.send(event) or b"")

        if path == "/events":
            await send(
                h11.Response(status_code=200, headers=[("content-type", "text/event-stream")])
            )
            await send(h11.Data(data=b"data: 1\n\n"))
            with trio.fail_after(20):
                await self.release.wait()
            await send(h11.Data(data=b"data: 2\n\n"))
        elif path == "/big":
            await send(
                h11.Response(status_code=200, headers=[("content-type", "application/json")])
            )
            for piece in big_pieces():
                await send(h11.Data(data=piece))
        else:
            status, headers, pieces = self.response(request)
            await send(h11.Response(status_code=status, headers=headers))
            if request.method != b"HEAD":
                for piece in pieces:
                    await send(h11.Data(data=piece))
        await send(h11.EndOfMessage())


async def start(
    tmp_path: Path, nursery: trio.Nursery, encode: str
) -> tuple[ProxyProcess, ShapedBackend]:
    backend = ShapedBackend()
    await nursery.start(backend.serve)
    upstream = f"http://127.0.0.1:{backend.port}"
    body = f"""
[[sites]]
hosts = ["localhost"]
upstreams = ["{upstream}"]
encode = {encode}
[[sites.routes]]
path_prefix = "/gzip-first"
rewrite = "/doc"
upstreams = ["{upstream}"]
encode = ["gzip", "br"]
[[sites.routes]]
path_prefix = "/plain"
rewrite = "/doc"
upstreams = ["{upstream}"]
encode = []
"""
    return await start_proxy(tmp_path, body, http=False), backend


async def get(proxy: ProxyProcess, path: str, *args: str) -> Reply:
    return await curl(*args, *proxy.curl_args(path))


async def test_each_coding_negotiated_over_h1_and_h2(tmp_path: Path, nursery: trio.Nursery) -> None:
    proxy, _ = await start(tmp_path, nursery, '["zstd", "br", "gzip"]')
    try:
        expected = text(0, 20000)
        for protocol in PROTOCOLS:
            for coding in CODINGS:
                reply = await get(
                    proxy, '/doc?etag="v1"&vary=Origin', protocol, "--compressed",
                    "-H", f"Accept-Encoding: {coding}",
                )  # fmt: skip
                assert reply.header("content-encoding") == coding, (protocol, reply.head)
                assert reply.body == expected
                assert reply.header("content-length") is None
                assert reply.header("vary") == "Origin, Accept-Encoding"
                assert reply.header("etag") == 'W/"v1"'
            # The client's full list: the route's order of preference decides.
            reply = await get(proxy, "/doc", protocol, "--compressed")
            assert (reply.header("content-encoding"), reply.body) == ("zstd", expected)
            reply = await get(proxy, "/gzip-first", protocol, "--compressed")
            assert (reply.header("content-encoding"), reply.body) == ("gzip", expected)
            reply = await get(
                proxy, "/doc", protocol, "--compressed", "-H", "Accept-Encoding: br;q=0.5, gzip"
            )
            assert (reply.header("content-encoding"), reply.body) == ("gzip", expected)
            # Unknown length (chunked upstream): compressed.
            reply = await get(proxy, "/doc?chunked=1&size=300", protocol, "--compressed")
            assert (reply.header("content-encoding"), reply.body) == ("zstd", text(0, 300))
    finally:
        await proxy.terminate()


async def test_responses_left_as_they_are(tmp_path: Path, nursery: trio.Nursery) -> None:
    proxy, _ = await start(tmp_path, nursery, '["zstd", "br", "gzip"]')
    try:
        body = text(0, 20000)
        for protocol in PROTOCOLS:
            cases: list[tuple[str, list[str], bytes, str | None]] = [
                # (path, curl arguments, body, Vary expected)
                ("/doc", [], body, "Accept-Encoding"),  # no Accept-Encoding
                ("/doc", ["-H", "Accept-Encoding: identity"], body, "Accept-Encoding"),
                ("/doc", ["-H", "Accept-Encoding: deflate"], body, "Accept-Encoding"),
                ("/doc?size=1000", ["--compressed"], text(0, 1000), None),  # too small
                ("/doc?type=image/png", ["--compressed"], body, None),
                ("/doc?cc=no-transform", ["--compressed"], body, None),
                ("/plain", ["--compressed"], body, None),  # the route's encode = []
                ("/doc", ["--compressed", "-r", "100-199"], body[100:200], None),
            ]
            for path, args, expected, vary in cases:
                reply = await get(proxy, path, protocol, *args)
                assert reply.header("content-encoding") is None, (protocol, path, args)
                assert reply.body == expected, (protocol, path, args)
                assert reply.header("vary") == vary, (protocol, path, args)
            # Already encoded by the upstream: passed on, not encoded twice.
            reply = await get(proxy, "/doc?gzipped=1", protocol, "--compressed")
            assert (reply.header("content-encoding"), reply.body) == ("gzip", body)
            # HEAD: the identity length stays true.
            reply = await get(proxy, "/doc", protocol, "--compressed", "-I")
            assert reply.header("content-encoding") is None
            assert reply.header("content-length") == str(len(body))
    finally:
        await proxy.terminate()


async def test_a_slow_stream_arrives_event_by_event(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The backend sends its second event only once the client has decoded the first: a
    proxy holding compressed bytes until more come would stall this until the timeout."""
    proxy, backend = await start(tmp_path, nursery, '["zstd", "br", "gzip"]')
    try:
        for protocol in PROTOCOLS:
            for coding in CODINGS:
                backend.release = trio.Event()
                argv = [
                    "curl", "-sS", "-N", "-D", "-", "--max-time", "30", protocol, "--compressed",
                    "-H", f"Accept-Encoding: {coding}", *proxy.curl_args("/events"),
                ]  # fmt: skip
                client = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
                assert client.stdout is not None
                seen = b""
                try:
                    with trio.fail_after(15):
                        while b"data: 1\n\n" not in seen:
                            chunk = await client.stdout.receive_some()
                            assert chunk, seen
                            seen += chunk
                        backend.release.set()
                        while chunk:
                            chunk = await client.stdout.receive_some()
                            seen += chunk
                        await client.wait()
                finally:
                    if client.returncode is None:
                        client.kill()
                        await client.wait()
                assert client.returncode == 0
                head, _, events = seen.partition(b"\r\n\r\n")
                assert f"content-encoding: {coding}".encode() in head.lower(), head
                assert events == b"data: 1\n\ndata: 2\n\n"
    finally:
        await proxy.terminate()


def vm_hwm_kib(proxy: ProxyProcess) -> int:
    """The proxy's peak resident memory so far."""
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


@pytest.mark.parametrize(("protocol", "coding"), [("--http1.1", "br"), ("--http2", "zstd")])
async def test_50mb_compressed_stream_under_a_memory_bound(
    tmp_path: Path, nursery: trio.Nursery, protocol: str, coding: str
) -> None:
    proxy, _ = await start(tmp_path, nursery, '["zstd", "br", "gzip"]')
    try:
        args = [protocol, "--compressed", "-H", f"Accept-Encoding: {coding}"]
        await get(proxy, "/doc", *args)  # warm: encoders loaded, TLS and pools set up
        baseline = vm_hwm_kib(proxy)
        out = tmp_path / "big"
        reply = await get(proxy, "/big", *args, "-o", str(out), "-w", "%{size_download}")
        growth = vm_hwm_kib(proxy) - baseline
        assert reply.header("content-encoding") == coding
        digest = hashlib.sha256()
        for piece in big_pieces():
            digest.update(piece)
        assert out.stat().st_size == BIG
        with out.open("rb") as received:
            assert hashlib.file_digest(received, "sha256").digest() == digest.digest()
        assert int(reply.body) < BIG // 5, "compressed on the wire"
        assert growth < HWM_GROWTH_LIMIT_KIB, f"proxy peak RSS grew by {growth} KiB"
    finally:
        await proxy.terminate()
