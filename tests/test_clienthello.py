"""ClientHello parsing against hellos produced by real TLS clients (Python ssl, openssl)."""

from __future__ import annotations

import socket
import subprocess

import pytest

from proxy.tls.clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    MAX_HELLO_LENGTH,
    ClientHello,
    ClientHelloError,
    Incomplete,
    PlainHTTPRequest,
    parse_client_hello,
)
from tests.support.tls_hello import big_hello, python_hello, split_records, with_short_extensions


def openssl_hello(*args: str) -> bytes:
    """The first flight of `openssl s_client`, read from a listening loopback socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while isinstance(parse_client_hello(data), Incomplete):
                    chunk = conn.recv(65536)
                    assert chunk, "openssl closed before sending a whole ClientHello"
                    data += chunk
                return data
        finally:
            client.kill()
            client.wait()


def assert_needs_more_at_every_prefix(data: bytes) -> None:
    """Every prefix asks for more bytes than it has (else waiting for them would spin) and
    no more than the whole hello (else a client that sent it all would wait in vain)."""
    for end in range(len(data)):
        parsed = parse_client_hello(data[:end])
        assert isinstance(parsed, Incomplete), f"prefix of {end} bytes"
        assert end < parsed.needed <= len(data), f"prefix of {end} bytes: {parsed}"


def test_sni_and_alpn_from_python_client() -> None:
    hello = python_hello("www.example.com", ["h2", "http/1.1"])
    assert parse_client_hello(hello) == ClientHello("www.example.com", ("h2", "http/1.1"))


def test_no_sni_no_alpn() -> None:
    assert parse_client_hello(python_hello(None)) == ClientHello(None, ())


def test_every_truncation_needs_more_bytes() -> None:
    hello = python_hello("a.test", ["http/1.1"])
    assert_needs_more_at_every_prefix(hello)
    assert parse_client_hello(hello) == ClientHello("a.test", ("http/1.1",))


def test_bytes_after_the_hello_are_ignored() -> None:
    hello = python_hello("a.test")
    assert parse_client_hello(hello + b"\x17\x03\x03\x00\x05hello") == ClientHello("a.test", ())
    assert parse_client_hello(hello + b"garbage") == ClientHello("a.test", ())


@pytest.mark.parametrize("fragment_size", [1, 2, 3, 4, 5, 64, 255])
def test_hello_split_across_records(fragment_size: int) -> None:
    data = split_records(python_hello("split.test", ["h2"]), fragment_size)
    assert parse_client_hello(data) == ClientHello("split.test", ("h2",))


def test_split_hello_needs_more_at_every_prefix() -> None:
    data = split_records(python_hello("split.test", ["h2"]), 37)
    assert_needs_more_at_every_prefix(data)
    assert parse_client_hello(data) == ClientHello("split.test", ("h2",))


def test_openssl_client_hello_with_mixed_case_sni() -> None:
    hello = openssl_hello("-servername", "Example.COM", "-alpn", "h2,http/1.1")
    assert_needs_more_at_every_prefix(hello)
    assert parse_client_hello(hello) == ClientHello("example.com", ("h2", "http/1.1"))


def test_openssl_tls12_hello_without_sni() -> None:
    hello = openssl_hello("-tls1_2", "-noservername")
    assert parse_client_hello(hello) == ClientHello(None, ())


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-framed hello
        b"\x16\x02",  # not TLS record version 3.x
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert record
        b"\x16\x03\x01\x00\x00",  # empty handshake record
        b"\x16\x03\x01\x40\x01",  # record longer than 2^14
        b"\x16\x03\x01\x00\x04\x02",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x04\x01\x00\x80\x01",  # ClientHello body of 2^15 + 1 bytes
    ],
)
def test_not_a_client_hello_is_an_error(data: bytes) -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)


@pytest.mark.parametrize(
    "data", [b"GET / HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n"]
)
def test_http_request_line_is_told_apart(data: bytes) -> None:
    with pytest.raises(PlainHTTPRequest):
        parse_client_hello(data)


@pytest.mark.parametrize("data", [b"G", b"\x80\x2e\x01\x03\x01", b"\x00\x01 x", b"\x16\x02 x"])
def test_other_bytes_are_not_taken_for_http(data: bytes) -> None:
    with pytest.raises(ClientHelloError) as raised:
        parse_client_hello(data)
    assert not isinstance(raised.value, PlainHTTPRequest)


def test_extensions_length_short_is_an_error() -> None:
    with pytest.raises(ClientHelloError, match="trailing bytes"):
        parse_client_hello(with_short_extensions(python_hello("a.test", ["h2"]), 4))


def test_inconsistent_inner_lengths_are_an_error() -> None:
    hello = bytearray(python_hello("a.test", ["h2"]))
    # Shrink the handshake message by 3 bytes, keeping the record consistent with it:
    # the extensions vector now claims more bytes than the message holds.
    record_length = int.from_bytes(hello[3:5], "big") - 3
    hello[3:5] = record_length.to_bytes(2, "big")
    hello[6:9] = (record_length - 4).to_bytes(3, "big")
    with pytest.raises(ClientHelloError):
        parse_client_hello(bytes(hello[: 5 + record_length]))


def test_large_hello_within_limits_parses() -> None:
    hello = big_hello(60)  # about 12 KiB
    parsed = parse_client_hello(split_records(hello, 1000))
    assert isinstance(parsed, ClientHello) and len(parsed.alpn) == 60


def test_hello_over_16k_in_two_records_parses() -> None:
    hello = big_hello(80)  # about 16.5 KiB: OpenSSL puts it in two records
    assert len(hello) > 2**14
    assert_needs_more_at_every_prefix(hello)
    parsed = parse_client_hello(hello)
    assert isinstance(parsed, ClientHello) and len(parsed.alpn) == 80


def test_hello_over_the_limit_is_refused() -> None:
    hello = big_hello(170)  # about 34 KiB
    assert len(hello) > MAX_HELLO_LENGTH
    with pytest.raises(ClientHelloError, match="too large"):
        parse_client_hello(hello[:10])


def test_fragmentation_beyond_the_peek_limit_is_refused() -> None:
    data = split_records(big_hello(120), 10)  # 5 header bytes per 10 payload bytes
    with pytest.raises(ClientHelloError, match="too many bytes"):
        parse_client_hello(data)
    assert isinstance(parse_client_hello(data[: MAX_CLIENT_HELLO_BYTES - 100]), Incomplete)
