"""The HTTP/1.1 pull parser over llhttp (proxy/http/h1_parser.py), in-process: message
boundaries, interim and bodiless responses, upgrades, and what it refuses."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest

from proxy.http.h1_parser import (
    CLOSED,
    NEED_DATA,
    Event,
    H1Parser,
    MessageEnd,
    MessageHead,
    ParseError,
)


def events(parser: H1Parser, *chunks: bytes) -> list[Event]:
    """Every event the chunks yield, fed one at a time; b"" is the end of the stream."""
    seen: list[Event] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        while (event := parser.next_event()) is not NEED_DATA:
            seen.append(event)
            if event is CLOSED:
                break
    return seen


def request_parser(pending: bytes = b"") -> H1Parser:
    return H1Parser(request=True, max_head_bytes=1024, pending=pending)


def response_parser() -> H1Parser:
    return H1Parser(request=False, max_head_bytes=1024)


def test_a_request_head_split_anywhere_is_parsed_with_its_raw_bytes() -> None:
    raw = b"POST /p?q HTTP/1.1\r\nHost: a\r\nX-A:  b \t\r\nContent-Length: 5\r\n\r\n"
    parser = request_parser()
    seen = events(parser, raw[:3], raw[3:20], raw[20:-1], raw[-1:] + b"hel", b"loGET")
    head = seen[0]
    assert isinstance(head, MessageHead)
    assert (head.method, head.target, head.http_version) == (b"POST", b"/p?q", b"1.1")
    assert head.headers == [(b"host", b"a"), (b"x-a", b"b"), (b"content-length", b"5")]
    assert head.raw == raw
    assert b"".join(e for e in seen if isinstance(e, bytes)) == b"hello"
    assert isinstance(seen[-1], MessageEnd) and parser.complete
    assert parser.trailing_data == b"GET"  # the next request's, never fed to this parser


def test_pipelined_requests_stay_apart_and_empty_lines_before_one_are_ignored() -> None:
    parser = request_parser()
    seen = events(parser, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /2 HTTP/1.1\r\n")
    assert [type(e) for e in seen] == [MessageHead, MessageEnd]
    following = request_parser(parser.trailing_data)
    head = events(following, b"Host: a\r\n\r\n")[0]
    assert isinstance(head, MessageHead) and head.target == b"/2"
    assert head.raw == b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"


def test_chunked_body_with_trailers_and_bytes_after_it() -> None:
    parser = request_parser()
    seen = events(
        parser,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
        b"lo\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n",
    )
    assert b"".join(e for e in seen if isinstance(e, bytes)) == b"hello"
    assert seen[-1] == MessageEnd([(b"x-t", b"1")])
    assert parser.overrun  # what followed the body in the same read is not kept apart


POST = b"POST / HTTP/1.1\r\nHost: a\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
        (POST + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (POST + b"Content-Length: +1\r\n\r\n", 400),
        (CHUNKED + b"0x5\r\n", 400),
        (CHUNKED + b"5\nhello\r\n", 400),
        (CHUNKED + b"f" * 17 + b"\r\n", 400),
        (POST + b"Connection: upgrade\r\nUpgrade: x\r\nContent-Length: 1\r\n\r\nx", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 2000, 431),  # incomplete, and too long
    ],
)  # fmt: skip
def test_malformed_requests_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(ParseError) as refused:
        events(request_parser(), raw)
    assert refused.value.status == status


def test_an_upgrade_request_stops_at_its_head() -> None:
    parser = request_parser()
    seen = events(
        parser, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nDATA"
    )
    assert [type(e) for e in seen] == [MessageHead, MessageEnd]
    assert parser.upgraded and parser.trailing_data == b"DATA"


def test_interim_responses_come_before_the_final_one() -> None:
    parser = response_parser()
    seen = events(
        parser, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokXX"
    )
    statuses = [e.status for e in seen if isinstance(e, MessageHead)]
    assert statuses == [100, 200]
    assert seen[-2:] == [b"ok", MessageEnd(None)]
    assert parser.trailing_data == b"XX"  # more than its Content-Length: never pooled


def test_a_response_to_head_has_no_body_whatever_its_length_says() -> None:
    parser = response_parser()
    parser.bodiless_response = True
    seen = events(parser, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert [type(e) for e in seen] == [MessageHead, MessageEnd] and parser.complete


def test_a_response_without_length_ends_with_the_connection() -> None:
    parser = response_parser()
    seen = events(parser, b"HTTP/1.0 200 OK\r\n\r\nabc", b"")
    assert seen[1:] == [b"abc", MessageEnd(None)]


def test_a_response_cut_short_is_reported_as_closed() -> None:
    parser = response_parser()
    seen = events(parser, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", b"")
    assert seen[-1] is CLOSED and not parser.complete


def test_a_101_hands_over_what_follows_it() -> None:
    parser = response_parser()
    seen = events(parser, b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nWS")
    assert [e.status for e in seen if isinstance(e, MessageHead)] == [101]
    assert parser.upgraded and parser.trailing_data == b"WS"


@pytest.mark.parametrize(
    ("parser", "raw"),
    [
        (request_parser, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"),
        (
            request_parser,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (response_parser, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil close"),
    ],
)
def test_a_parsed_message_leaves_no_reference_cycle(
    parser: Callable[[], H1Parser], raw: bytes
) -> None:
    """llhttp holds its callbacks' object: were that the parser itself, every message
    would leave a cycle for the garbage collector (it was ~30 objects per request)."""
    gc.collect()
    seen = events(parser(), raw, b"")
    assert isinstance(seen[-1], MessageEnd)
    del seen
    assert gc.collect() == 0
