"""Fuzzing the real proxy process over real TLS on loopback: mutated HTTP/1.1 requests,
mutated HTTP/2 frames after a valid preface, and mutated responses from a raw upstream.

What must hold for every input: the proxy answers or closes within a bound once the client
is done (no hang), a health request on another connection keeps being answered during the
run and after it, the process lives on, and its log holds no traceback (nor, with a
well-behaved upstream, any ERROR). The inputs are real protocol bytes (the corpora in
tests/corpus, frames made by the h2 library) mutated by tests/support/fuzzing.py; hypothesis drives
them from a worker thread, each example runs on the test's trio loop.
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
import struct
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import hpack
import pytest
import trio
from hypothesis import strategies as st

from proxy.h2session import describe
from tests.support.backend import Backend, serve_backend
from tests.support.fuzzing import fuzz_bytes, mutated, run_budget
from tests.support.h2client import h2_client
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.rawbackend import Answer, RawBackend
from tests.support.tls import client_context
from tests.support.tls_hello import big_hello, python_hello, split_records

CORPUS = Path(__file__).parent / "corpus"
SECONDS = 8  # CI budget per target
EXAMPLE_TIMEOUT = 10  # an answer or a close must come within this (timeouts below are 2-3 s)
LIMITS = """[limits]
header_timeout = 2
keepalive_timeout = 2
client_timeout = 3
upstream_timeout = 1
"""

# -- a raw TLS client, and what every fuzz run checks ----------------------------------------


async def tls_exchange(
    proxy: ProxyProcess,
    context: ssl.SSLContext,
    data: bytes,
    until: Callable[[bytes], bool] = lambda received: True,
    patience: float = 0.3,
) -> bytes:
    """Send `data` on a new TLS connection; once `until(received so far)` holds, or after
    `patience` seconds (a cut-off input leaves the proxy waiting for the rest, rightly), end
    the sending side (TCP FIN: the proxy sees EOF) and read everything until it closes."""
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.https_port)
    tls = trio.SSLStream(tcp, context, server_hostname="localhost", https_compatible=True)
    received = bytearray()
    try:
        with trio.fail_after(EXAMPLE_TIMEOUT):
            await tls.do_handshake()
            await tls.send_all(data)
            eof_at = trio.current_time() + patience
            while not until(bytes(received)):
                with trio.move_on_at(eof_at) as waiting:
                    chunk = await tls.receive_some(65536)
                if waiting.cancelled_caught:
                    break
                if not chunk:
                    return bytes(received)
                received += chunk
            await tcp.send_eof()
            while chunk := await tls.receive_some(65536):
                received += chunk
    except trio.BrokenResourceError:
        pass  # reset: the proxy closed with bytes of ours unread, an acceptable way to end
    except trio.TooSlowError:
        raise AssertionError(
            f"no close within {EXAMPLE_TIMEOUT}s; received {bytes(received[:300])!r}"
        ) from None
    finally:
        await trio.aclose_forcefully(tls)
    return bytes(received)


@dataclass
class Health:
    answered: int = 0
    failure: str | None = None


async def keep_checking(check: Callable[[], Awaitable[None]], health: Health) -> None:
    """A health request every quarter second, each bounded in time; the first failure ends
    the checks and is kept for the test to report."""
    while True:
        try:
            with trio.fail_after(EXAMPLE_TIMEOUT):
                await check()
        except (AssertionError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            health.failure = f"health request #{health.answered + 1} failed: {exc!r}"
            return
        health.answered += 1
        await trio.sleep(0.25)


def log_problems(log: str, allowed_errors: tuple[str, ...] = ()) -> list[str]:
    """Tracebacks (with the lines around them), CRITICAL lines, and ERROR lines other than
    `allowed_errors`."""
    lines = log.splitlines()
    problems = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback") or " CRITICAL " in line:
            problems.append("\n".join(lines[max(i - 1, 0) : i + 25]))
        elif " ERROR " in line and not any(allowed in line for allowed in allowed_errors):
            problems.append(line)
    return problems


async def fuzz_proxy(
    proxy: ProxyProcess,
    example: Callable[[Any], Awaitable[None]],
    strategy: st.SearchStrategy[Any],
    health_check: Callable[[], Awaitable[None]],
    *,
    allowed_errors: tuple[str, ...] = (),
) -> int:
    """Run `example` on inputs from `strategy` for the budget while `health_check` runs
    alongside, then check the health, the process and the log; returns the inputs tried."""
    health = Health()

    def run_example(data: Any) -> None:
        trio.from_thread.run(example, data)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_checking, health_check, health)
            fuzz = partial(
                run_budget,
                run_example,
                strategy,
                SECONDS,
                shrink=False,
                stop=lambda: health.failure is not None,
            )
            tried = await trio.to_thread.run_sync(fuzz)
            nursery.cancel_scope.cancel()
    except Exception as exc:  # an example failed: say what the proxy was doing meanwhile
        status = proxy.process.poll()
        state = "runs" if status is None else f"exited with status {status}"
        raise AssertionError(
            f"fuzzing stopped: {exc!r}; the proxy {state}; its log ends:\n{proxy.log()[-4000:]}"
        ) from exc
    assert health.failure is None, health.failure
    with trio.fail_after(EXAMPLE_TIMEOUT):
        await health_check()  # and after the run
    assert health.answered > 0
    assert proxy.process.poll() is None, "the proxy exited"
    problems = log_problems(proxy.log(), allowed_errors)
    assert not problems, "\n\n".join(problems[:5])
    return tried


# -- the HTTP/1.1 front end ------------------------------------------------------------------


def h1_seeds() -> list[bytes]:
    """The request-smuggling corpus and ordinary requests for the test backend's routes; no
    route that stalls (/hold, /stall become /echo) or streams a lot (/bytes)."""
    cases = tomllib.loads((CORPUS / "requests.toml").read_text())["case"]
    corpus = [
        case["request"].replace("{host}", "localhost").replace("/hold", "/echo").encode("latin-1")
        for case in cases
    ]
    host = b"Host: localhost\r\n"
    return [
        *corpus,
        b"GET /echo HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /echo HTTP/1.1\r\n" + host + b"\r\nGET /trailers HTTP/1.1\r\n" + host + b"\r\n",
        b"POST /upload HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\nTE: trailers\r\n"
        b"\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
        b"PUT /echo HTTP/1.1\r\n"
        + host
        + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        b"GET /upgrade HTTP/1.1\r\n" + host + b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\nhi",
        b"GET /trailers HTTP/1.0\r\n" + host + b"\r\n",
        b"OPTIONS * HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /hints HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n",
    ]


async def echo_health(proxy: ProxyProcess) -> None:
    response = await tls_exchange(
        proxy,
        client_context(proxy, "http/1.1"),
        b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]


@pytest.fixture
async def backend_proxy(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ProxyProcess]:
    backend: Backend = await nursery.start(serve_backend, Backend())
    proxy = await start_proxy(tmp_path, LIMITS + sites_toml((["localhost"], [backend.url])))
    yield proxy
    await proxy.terminate()


@pytest.mark.slow
async def test_fuzz_h1_front_end(backend_proxy: ProxyProcess) -> None:
    proxy = backend_proxy
    context = client_context(proxy, "http/1.1")

    async def example(data: bytes) -> None:
        response = await tls_exchange(proxy, context, data)
        assert response == b"" or response.startswith(b"HTTP/1.1 "), response[:300]

    tried = await fuzz_proxy(proxy, example, fuzz_bytes(h1_seeds()), partial(echo_health, proxy))
    assert tried >= 50


# -- the TLS front door: the ClientHello as the server peeks at it ---------------------------


async def tcp_exchange(proxy: ProxyProcess, data: bytes) -> bytes:
    """`data` on a plain TCP connection to the HTTPS port, then EOF; what comes back until
    the proxy closes (a handshake, an alert, a 400 for plain HTTP, or nothing)."""
    received = bytearray()
    with trio.fail_after(EXAMPLE_TIMEOUT):
        tcp = await trio.open_tcp_stream("127.0.0.1", proxy.https_port)
        async with tcp:
            try:
                await tcp.send_all(data)
                await tcp.send_eof()
                while chunk := await tcp.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # reset: closed with our bytes unread
    return bytes(received)


@pytest.mark.slow
async def test_fuzz_client_hello_on_the_wire(backend_proxy: ProxyProcess) -> None:
    """Mutated hellos, one or several records, as the server peeks at them before OpenSSL
    takes over; what OpenSSL then makes of them is its business."""
    hellos = [python_hello("localhost", ["h2", "http/1.1"]), python_hello(None), big_hello(90)]
    seeds = [*hellos, split_records(hellos[0], 64), b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"]
    strategy = fuzz_bytes(seeds, (b"\x16\x03\x01", b"\x00\x00", b"\xff\xff", b"\x40\x00"), 600)

    async def example(data: bytes) -> None:
        await tcp_exchange(backend_proxy, data)

    tried = await fuzz_proxy(backend_proxy, example, strategy, partial(echo_health, backend_proxy))
    assert tried >= 50


# -- the HTTP/2 front end, after a valid preface ---------------------------------------------

FRAME_HEADER = 9
LAST_STREAM = 2**31 - 1
FRAME_TYPES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 0xFF)  # DATA .. CONTINUATION, PRIORITY_UPDATE
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7
END_STREAM, END_HEADERS = 0x1, 0x4


def split_frames(data: bytes) -> list[bytes]:
    frames = []
    while len(data) >= FRAME_HEADER:
        end = FRAME_HEADER + int.from_bytes(data[:3], "big")
        frames.append(data[:end])
        data = data[end:]
    return frames


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def request_fields(path: str, method: str = "GET") -> list[tuple[str, str]]:
    return [(":method", method), (":scheme", "https"), (":authority", "localhost"), (":path", path)]


def h2_preface() -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn.data_to_send()


def h2_seed_flights() -> list[bytes]:
    """Frames a real client sends after its preface: requests with and without bodies,
    trailers, a header block in CONTINUATIONs, flow control, PING, PRIORITY, resets."""
    flights = []
    scenarios: list[Callable[[h2.connection.H2Connection], None]] = [
        lambda c: c.send_headers(1, request_fields("/echo"), end_stream=True),
        lambda c: (
            c.send_headers(1, [*request_fields("/upload", "POST"), ("content-length", "5")]),
            c.send_data(1, b"hello", end_stream=True),
        ),
        lambda c: (
            c.send_headers(1, [*request_fields("/upload", "POST"), ("te", "trailers")]),
            c.send_data(1, b"abc"),
            c.send_headers(1, [("x-trailer", "1")], end_stream=True),
        ),
        lambda c: c.send_headers(
            1, [*request_fields("/echo"), ("x-big", "b" * 20000)], end_stream=True
        ),
        lambda c: (
            c.send_headers(1, request_fields("/trailers"), end_stream=True),
            c.send_headers(3, request_fields("/hints"), end_stream=True),
            c.increment_flow_control_window(65535),
            c.ping(b"12345678"),
            c.reset_stream(3),
        ),
        lambda c: (
            c.prioritize(1, weight=200, depends_on=0),
            c.send_headers(1, [*request_fields("/echo"), ("expect", "100-continue")]),
            c.update_settings({4: 0}),
            c.end_stream(1),
        ),
    ]
    for scenario in scenarios:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.data_to_send()
        scenario(conn)
        flights.append(conn.data_to_send())
    return flights


SENTINEL = frame(
    HEADERS,
    END_STREAM | END_HEADERS,
    LAST_STREAM,
    hpack.Encoder().encode(request_fields("/echo")),
)


# Header fields a request may carry: the RFC 9113 section 8.2 cases (connection-specific
# fields, te, content-length against DATA, host against :authority), bytes an HTTP/1.1
# upstream cannot carry, and ordinary ones. No HEAD: the test backend cannot answer it.
H2_FIELDS: tuple[tuple[bytes, bytes], ...] = (
    (b":method", b"POST"), (b":method", b"OPTIONS"), (b":method", b"G\x00T"), (b":method", b""),
    (b":path", b"*"), (b":path", b""), (b":path", b"/e\xffcho"), (b":path", b"/echo?a=\x80"),
    (b":path", b"echo"), (b":path", b"/echo#f"), (b":path", b"/echo\r\nx: y"),
    (b":authority", b""), (b":authority", b"localhost:1"), (b":authority", b"other.test"),
    (b":scheme", b"http"), (b":protocol", b"websocket"), (b":status", b"200"), (b":x", b"1"),
    (b"host", b"localhost"), (b"host", b"other.test"), (b"content-length", b"1"),
    (b"content-length", b"0"), (b"content-length", b"-1"), (b"content-length", b"1,1"),
    (b"content-length", b"99999999999999999999"), (b"te", b"trailers"), (b"te", b"gzip"),
    (b"transfer-encoding", b"chunked"), (b"connection", b"close"), (b"keep-alive", b"1"),
    (b"upgrade", b"echo"), (b"proxy-connection", b"x"), (b"expect", b"100-continue"),
    (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"X-Upper", b"1"), (b"x-a", b"b\r\nc: d"),
    (b"x-a", b" padded "), (b"x-a", b"\x00"), (b"x-a", b"\xff\xfe"), (b"x y", b"1"), (b"", b"1"),
)  # fmt: skip


@st.composite
def h2_requests(draw: st.DrawFn) -> bytes:
    """A request as HEADERS (and maybe DATA) with well-formed frames and HPACK, whose fields
    are a valid request's with some added, replaced or left out."""
    fields = [(name.encode(), value.encode()) for name, value in request_fields("/echo")]
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from(H2_FIELDS))
        if draw(st.booleans()):
            fields.append(field)
        else:
            fields[draw(st.integers(0, len(fields) - 1))] = field
    if draw(st.booleans()):
        del fields[draw(st.integers(0, len(fields) - 1))]
    body = draw(st.sampled_from((None, b"", b"x", b"hello")))
    block = hpack.Encoder().encode(fields)
    out = frame(HEADERS, END_HEADERS | (END_STREAM if body is None else 0), 1, block)
    if body is not None:
        out += frame(DATA, END_STREAM, 1, body)
    return out


@st.composite
def h2_frames(draw: st.DrawFn, flights: list[bytes]) -> bytes:
    """Frames picked from real flights, each kept or with its type, flags, stream id or
    payload mutated; the length field follows the payload."""
    pool = [f for flight in flights for f in split_frames(flight)]
    out = []
    for original in draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6)):
        kind, flags = original[3], original[4]
        stream_id = int.from_bytes(original[5:9], "big")
        payload = original[FRAME_HEADER:]
        change = draw(st.sampled_from(("none", "type", "flags", "stream", "payload")))
        if change == "type":
            kind = draw(st.sampled_from(FRAME_TYPES))
        elif change == "flags":
            flags = draw(st.integers(0, 255))
        elif change == "stream":
            stream_id = draw(st.sampled_from((0, 1, 2, 3, 5, 101, LAST_STREAM)))
        elif change == "payload":
            payload = draw(mutated([payload], (b"\x00", b"\xff", b"\x00\x00\x00\x00")))
        out.append(frame(kind, flags, stream_id, payload))
    return b"".join(out)


def sentinel_settled(received: bytes) -> bool:
    """The proxy answered or refused the last request (it reads in order), or gave up on
    the connection (GOAWAY)."""
    for f in split_frames(received):
        if int.from_bytes(f[5:9], "big") == LAST_STREAM and f[3] in (HEADERS, RST_STREAM):
            return True
        if f[3] == GOAWAY:
            return True
    return False


@pytest.mark.slow
async def test_fuzz_h2_front_end(backend_proxy: ProxyProcess) -> None:
    proxy = backend_proxy
    context = client_context(proxy, "h2")
    preface = h2_preface()
    flights = h2_seed_flights()
    strategy = st.one_of(h2_frames(flights), h2_requests(), fuzz_bytes(flights, random_size=128))

    async def example(data: bytes) -> None:
        # A request at the end is answered only after everything before it was read; then
        # the client closes, and the proxy must close too.
        response = await tls_exchange(
            proxy, context, preface + data + SENTINEL, sentinel_settled, patience=0.1
        )
        assert response[3:4] == bytes([SETTINGS]), (
            f"the server preface is not SETTINGS: {response[:50]!r}"
        )

    tried = await fuzz_proxy(proxy, example, strategy, partial(echo_health, proxy))
    assert tried >= 50


# -- the upstream response parser -------------------------------------------------------------


def response_seeds() -> list[bytes]:
    cases = tomllib.loads((CORPUS / "upstream_responses.toml").read_text())["case"]
    return [
        *(case["response"].encode("latin-1") for case in cases),
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n"
        b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n",
    ]


@dataclass
class Scripted:
    """What the raw upstream answers each fuzz path; /clean is answered by RawBackend."""

    answers: dict[bytes, Answer]

    def __call__(self, path: bytes, nth: int) -> Answer:
        return self.answers.pop(path, (b"", True))


async def clean_health(proxy: ProxyProcess) -> None:
    """A request that must get its own answer: never bytes left over by another response."""
    response = await tls_exchange(
        proxy,
        client_context(proxy, "http/1.1"),
        b"GET /clean HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 200 "), response[:300]
    assert b"\r\n\r\nclean /clean #" in response, response[:300]


@pytest.mark.slow
async def test_fuzz_upstream_responses(tmp_path: Path, nursery: trio.Nursery) -> None:
    script = Scripted({})
    backend: RawBackend = await nursery.start(RawBackend(script).serve)
    proxy = await start_proxy(
        tmp_path, LIMITS + sites_toml((["localhost"], [backend.url])), http=False
    )
    context = client_context(proxy, "http/1.1")
    paths = (f"/fuzz/{n}" for n in itertools.count())
    strategy = st.tuples(
        fuzz_bytes(response_seeds()),
        st.sampled_from((True, True, True, False)),  # the upstream closes after its answer
        st.sampled_from(("h1", "h2")),
    )

    async def example(case: tuple[bytes, bool, str]) -> None:
        response, close, protocol = case
        path = next(paths)
        script.answers[path.encode()] = (response, close)
        if protocol == "h1":
            request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
            got = await tls_exchange(proxy, context, request)
            assert got.startswith(b"HTTP/1.1 "), got[:300]  # 502/504 at least
        else:
            async with h2_client(proxy) as client:
                answer = await client.get(path)  # a response or a reset, never a closed connection
                assert answer.reset is not None or answer.status >= 200, answer
        await clean_health(proxy)

    try:
        tried = await fuzz_proxy(
            proxy,
            example,
            strategy,
            partial(clean_health, proxy),
            allowed_errors=("upstream error:", "upstream timed out:"),
        )
        assert tried >= 50
    finally:
        await proxy.terminate()


# -- findings of the first fuzz runs, kept as tests ---------------------------------------------


async def vanish_mid_response(proxy: ProxyProcess, protocol: str, reset: bool) -> None:
    """Ask for a large response, read a little of it, and go: a reset (SO_LINGER 0) or a
    plain close with the response unread (the kernel answers the proxy's next bytes with
    a reset)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy.https_port)
    if reset:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls = trio.SSLStream(tcp, client_context(proxy, protocol), server_hostname="localhost")
    if protocol == "h2":
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.increment_flow_control_window(2**30)
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
        conn.send_headers(1, request_fields("/bytes/50000000"), end_stream=True)
        request = conn.data_to_send()
    else:
        request = b"GET /bytes/50000000 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with trio.fail_after(EXAMPLE_TIMEOUT):
        await tls.do_handshake()
        await tls.send_all(request)
        received = 0
        while received < 200_000:
            received += len(await tls.receive_some(65536))
    await tcp.aclose()


# The line each departure must leave: DEBUG, the client, the reason (for h2, the stream's
# or the connection's, whichever noticed first).
VANISHED = {
    "http/1.1": re.compile(r" DEBUG proxy\.http\.h1: client 127\.0\.0\.1: .*sending to client"),
    "h2": re.compile(
        r" DEBUG proxy\.http\.h2: client 127\.0\.0\.1: "
        r"(h2 connection ended: |stream 1: connection closed)"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", VANISHED)
async def test_client_vanishing_mid_response(backend_proxy: ProxyProcess, protocol: str) -> None:
    """SSLEOFError/BrokenPipeError tracebacks were logged when a client left mid-response."""
    for reset in (True, False):
        since = len(backend_proxy.log())
        await vanish_mid_response(backend_proxy, protocol, reset)
        await backend_proxy.wait_log(VANISHED[protocol], since=since, timeout=EXAMPLE_TIMEOUT)
    await echo_health(backend_proxy)
    problems = log_problems(backend_proxy.log())
    assert not problems, "\n\n".join(problems)


@pytest.mark.slow
async def test_h2_server_preface_comes_first_even_after_a_goaway(
    backend_proxy: ProxyProcess,
) -> None:
    """A fuzz finding: a client GOAWAY in the first read made h2 drop our queued SETTINGS,
    and the connection began with a GOAWAY (RFC 9113 section 3.4: SETTINGS comes first)."""
    goaway = frame(GOAWAY, 0, 0, bytes(8))
    context = client_context(backend_proxy, "h2")
    for _ in range(5):
        received = await tls_exchange(backend_proxy, context, h2_preface() + goaway + SENTINEL)
        kinds = [f[3] for f in split_frames(received)]
        assert kinds[:1] == [SETTINGS] and GOAWAY in kinds, kinds


def test_h2_protocol_errors_are_named() -> None:
    """A fuzz finding: stream errors were logged as a bare number ("protocol error: 3")."""
    assert describe(h2.exceptions.StreamClosedError(3)) == "StreamClosedError on stream 3"
    assert describe(h2.exceptions.ProtocolError("bad frame")) == "bad frame"
