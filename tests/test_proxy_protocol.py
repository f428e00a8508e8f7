"""The PROXY protocol parser (table-driven, a property over random and mutated bytes), the
listener gate over real loopback sockets in process, and the [listen] keys."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings

from proxy.config import ListenConfig
from proxy.config_load import ConfigError, load_config
from proxy.proxy_gate import ProxyProtocolGate, Rejected
from proxy.proxy_protocol import (
    MAX_HEADER_LENGTH,
    NotProxyProtocol,
    ProxyHeader,
    ProxyProtocolError,
    Signature,
    parse_proxy_header,
    signature,
)
from tests.support.fuzzing import fuzz_bytes
from tests.support.proxy_protocol import LOCAL, V2_SIGNATURE, tlv, v1, v2

AWS_VPCE = tlv(0xEA, b"\x01vpce-0123456789abcdef")  # AWS NLB's endpoint id TLV
VALID: list[tuple[bytes, str | None]] = [
    (v1("198.51.100.7", "10.0.0.1"), "198.51.100.7"),
    (v1("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    (v1("2001:DB8:0:0:0:0:0:7", "::1"), "2001:db8::7"),  # written out: the short form kept
    (v1("0.0.0.0", "255.255.255.255", 0, 65535), "0.0.0.0"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),  # whatever follows UNKNOWN is ignored
    (v2("198.51.100.7", "10.0.0.1"), "198.51.100.7"),
    (v2("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    (v2("198.51.100.7", "10.0.0.1", tlvs=AWS_VPCE + tlv(0x04, b"")), "198.51.100.7"),
    (v2("198.51.100.7", "10.0.0.1", command=LOCAL), None),  # a balancer's health check
    (v2(command=LOCAL), None),
    (v2(), None),  # PROXY over an unspecified family: the peer is the client
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), None),  # unix stream: no IP
    (V2_SIGNATURE + b"\x20\x77\x00\x00", None),  # LOCAL ignores the family byte
]


@pytest.mark.parametrize(("header", "client"), VALID)
def test_valid_headers(header: bytes, client: str | None) -> None:
    rest = b"\x16\x03\x01\x00\xc8"  # a ClientHello follows, untouched
    assert parse_proxy_header(header + rest) == ProxyHeader(length=len(header), client=client)


@pytest.mark.parametrize(("header", "client"), VALID)
def test_every_prefix_asks_for_more(header: bytes, client: str | None) -> None:
    """Cut anywhere, a header is undecided (never refused) and asks for bytes it lacks,
    never past its own end."""
    for end in range(len(header)):
        needed = parse_proxy_header(header[:end])
        assert isinstance(needed, int) and end < needed <= len(header), (end, needed)


MALFORMED: list[tuple[bytes, str]] = [
    (b"PROXY TCP4 198.51.100.7 10.0.0.1 40000\r\n", "bad v1 line"),
    (b"PROXY TCP5 198.51.100.7 10.0.0.1 40000 443\r\n", "bad v1 line"),
    (b"PROXY  TCP4 198.51.100.7 10.0.0.1 40000 443\r\n", "bad v1 line"),
    (b"PROXY \r\n", "bad v1 line"),
    (b"PROXY UNKNOWNX\r\n", "bad v1 line"),
    (b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 443\r\n", "bad v1 address"),
    (b"PROXY TCP6 198.51.100.7 ::1 40000 443\r\n", "bad v1 address"),
    (b"PROXY TCP4 198.51.100.07 10.0.0.1 40000 443\r\n", "bad v1 address"),
    (b"PROXY TCP4 198.51.100.7 10.0.0.1 65536 443\r\n", "bad v1 port"),
    (b"PROXY TCP4 198.51.100.7 10.0.0.1 040000 443\r\n", "bad v1 port"),
    (b"PROXY TCP4 198.51.100.7 10.0.0.1 -1 443\r\n", "bad v1 port"),
    (b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 \xff\r\n", "bad v1 port"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "longer than 107"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version/command"),  # version 1
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "version/command"),  # command 2
    (V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "family/transport"),
    (V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "family/transport"),
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "address block of 8 bytes"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "address block of 12 bytes, needs 36"),
    (v2("198.51.100.7", "10.0.0.1", tlvs=b"\x04\x00"), "truncated v2 TLV"),
    (v2("198.51.100.7", "10.0.0.1", tlvs=b"\x04\x00\x05abc"), "TLV longer than the header"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED)
def test_malformed_headers(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message) as info:
        parse_proxy_header(data)
    assert not isinstance(info.value, NotProxyProtocol)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello
        b"GET / HTTP/1.1\r\n",
        b"PROPFIND / HTTP/1.1\r\n",  # shares "PRO" with the v1 prefix
        b"proxy TCP4 ",  # the keyword is upper case
        b"\r\n\r\nGET",  # shares "\r\n\r\n" with the v2 signature
    ],
)
def test_other_protocols_are_no_header(data: bytes) -> None:
    assert signature(data) is Signature.NONE
    with pytest.raises(NotProxyProtocol):
        parse_proxy_header(data)


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"", 1),
        (b"PRO", 4),
        (b"\r\n\r\n\x00", 6),
        (b"PROXY ", Signature.V1),
        (V2_SIGNATURE, Signature.V2),
        (b"\x16", Signature.NONE),
    ],
)
def test_signature(data: bytes, verdict: Signature | int) -> None:
    assert signature(data) == verdict


def test_v2_length_bounds_what_is_asked_for() -> None:
    assert parse_proxy_header(V2_SIGNATURE + b"\x21\x11\xff\xff") == MAX_HEADER_LENGTH


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    fuzz_bytes(
        [header for header, _ in VALID],
        (b"\r\n", b" ", b"\x00", b"\xff\xff", b"PROXY ", V2_SIGNATURE, b"TCP4", b"TCP6", b"::"),
    )
)
def test_any_bytes_parse_or_raise_only_the_parsers_error(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if isinstance(result, int):
        assert len(data) < result <= MAX_HEADER_LENGTH
    else:
        assert 0 < result.length <= len(data)


# -- the listener gate over loopback sockets --------------------------------------------------


@contextlib.contextmanager
def connected() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, accepted server side) of a loopback TCP connection, the server non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    with client, server:
        yield client, server


def make_gate(sources: str, rejections: list[str], timeout: float = 5.0) -> ProxyProtocolGate:
    return ProxyProtocolGate(
        (ip_network(sources),), timeout=lambda: timeout, rejected=rejections.append
    )


REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (v1("198.51.100.7", "127.0.0.1"), "198.51.100.7"),
        (v2("2001:db8::7", "::1", tlvs=AWS_VPCE), "2001:db8::7"),
        (v2(command=LOCAL), "127.0.0.1"),
    ],
)
async def test_gate_consumes_exactly_the_header(header: bytes, client: str | None) -> None:
    """Sent in pieces with the request behind it: the client is the header's, and what
    follows the header is still there for TLS or h11."""
    rejections: list[str] = []
    with connected() as (peer, sock):
        gate = make_gate("127.0.0.0/8", rejections)
        assert gate.expects("127.0.0.1")

        async def send() -> None:
            peer.sendall(header[:10])
            await trio.sleep(0.05)
            peer.sendall(header[10:] + REQUEST)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert await gate.client_address(sock, "127.0.0.1", expected=True) == client
        await trio.lowlevel.wait_readable(sock)
        assert sock.recv(1000) == REQUEST
    assert rejections == []


async def reject(
    data: bytes, *, expected: bool = True, close: bool = False, timeout: float = 5.0
) -> Rejected:
    """What the gate makes of a peer sending `data` (then closing, if `close`)."""
    with connected() as (peer, sock):
        peer.sendall(data)
        if close:
            peer.shutdown(socket.SHUT_WR)
        gate = make_gate("127.0.0.0/8" if expected else "10.0.0.0/8", [], timeout)
        with pytest.raises(Rejected) as info:
            await gate.client_address(sock, "127.0.0.1", expected=expected)
    return info.value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (REQUEST, "missing"),
        (b"\x16\x03\x01\x02\x00\x01\x00", "missing"),
        (b"PROXY TCP4 1.2.3.4\r\n", "malformed"),
        (V2_SIGNATURE + b"\x21\x41\x00\x00", "malformed"),
    ],
)
async def test_gate_refuses_a_bad_header(data: bytes, reason: str) -> None:
    assert (await reject(data)).reason == reason


async def test_gate_refuses_a_header_cut_short_or_stalled() -> None:
    header = v2("198.51.100.7", "10.0.0.1")
    assert (await reject(header[:20], close=True)).reason == "truncated"
    start = trio.current_time()
    assert (await reject(header[:20], timeout=0.3)).reason == "timeout"
    assert trio.current_time() - start < 3


async def test_gate_refuses_a_header_from_an_unexpected_peer() -> None:
    for header in (v1("198.51.100.7", "10.0.0.1"), v2("198.51.100.7", "10.0.0.1")):
        assert (await reject(header, expected=False)).reason == "untrusted"
    # One that sends nothing in time is closed quietly: no PROXY matter.
    assert (await reject(b"", expected=False, timeout=0.3)).reason is None


async def test_gate_leaves_an_unexpected_peers_bytes_alone() -> None:
    with connected() as (peer, sock):
        peer.sendall(REQUEST)
        gate = make_gate("10.0.0.0/8", [])
        assert not gate.expects("127.0.0.1")
        assert await gate.client_address(sock, "127.0.0.1", expected=False) == "127.0.0.1"
        assert sock.recv(1000) == REQUEST


def test_gate_reports_each_reason_to_the_metric(caplog: pytest.LogCaptureFixture) -> None:
    rejections: list[str] = []
    gate = make_gate("10.0.0.0/8", rejections)
    gate.report("10.0.0.9", Rejected("malformed", "bad v1 line"))
    gate.report("10.0.0.9", Rejected("malformed", "bad v1 line"))  # counted, not logged again
    gate.report("10.0.0.9", Rejected(None, "nothing sent"))
    assert rejections == ["malformed", "malformed"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["client 10.0.0.9: PROXY protocol malformed: bad v1 line; connection closed"]


# -- [listen] keys ----------------------------------------------------------------------------

SITE = '[[sites]]\nhosts = ["a.example"]\nupstreams = ["http://127.0.0.1:8000"]\n'


def load(tmp_path: Path, listen: str) -> ListenConfig:
    path = tmp_path / "port443.toml"
    path.write_text(f"[listen]\n{listen}\n{SITE}")
    return load_config(path).listen


def test_listen_keys(tmp_path: Path) -> None:
    listen = load(tmp_path, 'proxy_protocol = true\nproxy_protocol_from = ["10.0.0.0/8", "::1"]')
    assert listen.proxy_protocol is True
    assert listen.proxy_protocol_from == (ip_network("10.0.0.0/8"), ip_network("::1/128"))
    off = load(tmp_path, 'proxy_protocol_from = ["10.0.0.0/8"]')  # kept while switched off
    assert off.proxy_protocol is False


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("proxy_protocol = true", "listen.proxy_protocol: needs proxy_protocol_from"),
        ('proxy_protocol = "yes"', "listen.proxy_protocol: must be true or false"),
        ('proxy_protocol_from = ["10.0.0.0/33"]', "listen.proxy_protocol_from: must be an array"),
    ],
)
def test_listen_key_problems(tmp_path: Path, listen: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, listen)
    assert len(info.value.problems) == 1 and message in info.value.problems[0]
