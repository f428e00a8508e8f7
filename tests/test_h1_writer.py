"""HTTP/1.1 response framing (proxy/http/h1_writer.py), checked against h11 as the parser."""

from __future__ import annotations

import h11
import pytest

from proxy.http.h1_writer import FramingError, ResponseWriter, informational

TYPE = (b"content-type", b"text/plain")


def parse(raw: bytes, method: bytes = b"GET") -> list[h11.Event]:
    """What a real client (h11) makes of the bytes, up to the end of the response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")  # a close-delimited body ends at EOF
    events: list[h11.Event] = []
    while not events or not isinstance(events[-1], h11.EndOfMessage | h11.ConnectionClosed):
        event = conn.next_event()
        assert event is not h11.NEED_DATA, events
        events.append(event)  # type: ignore[arg-type]
    return events


def body(events: list[h11.Event]) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


def write(
    writer: ResponseWriter,
    status: int,
    fields: list[tuple[bytes, bytes]],
    *chunks: bytes,
    **how: bool,
) -> bytes:
    options = {"head_request": False, "http11": True, "keep_alive": True, **how}
    out = writer.head(status, fields, **options)
    out += b"".join(writer.data(chunk) for chunk in chunks)
    return out + writer.end()


def test_content_length_is_kept_to_exactly() -> None:
    writer = ResponseWriter()
    raw = write(writer, 200, [TYPE, (b"content-length", b"5")], b"he", b"llo")
    assert body(parse(raw)) == b"hello" and writer.keep_alive and writer.complete
    with pytest.raises(FramingError):
        write(ResponseWriter(), 200, [(b"content-length", b"2")], b"abc")
    with pytest.raises(FramingError):
        write(ResponseWriter(), 200, [(b"content-length", b"9")], b"abc")


def test_unknown_length_is_chunked_with_trailers() -> None:
    writer = ResponseWriter()
    raw = writer.head(200, [TYPE], head_request=False, http11=True, keep_alive=True)
    raw += writer.data(b"ab") + writer.data(b"") + writer.data(b"c" * 300)
    raw += writer.end([(b"x-checksum", b"1")])
    events = parse(raw)
    assert body(events) == b"ab" + b"c" * 300
    assert isinstance(events[-1], h11.EndOfMessage)
    assert list(events[-1].headers) == [(b"x-checksum", b"1")]


def test_http10_client_without_length_gets_a_close_delimited_body() -> None:
    writer = ResponseWriter()
    raw = write(writer, 200, [TYPE], b"abc", http11=False)
    assert not writer.keep_alive and b"connection: close\r\n" in raw
    assert body(parse(raw)) == b"abc"


@pytest.mark.parametrize(("status", "method"), [(204, b"GET"), (304, b"GET"), (200, b"HEAD")])
def test_bodiless_responses_drop_any_body(status: int, method: bytes) -> None:
    raw = write(
        ResponseWriter(),
        status,
        [(b"content-length", b"3")],
        b"abc",
        head_request=method == b"HEAD",
    )
    assert raw.endswith(b"content-length: 3\r\n\r\n")
    assert body(parse(raw, method)) == b""


def test_close_is_said_once_and_remembered() -> None:
    asked = ResponseWriter()
    raw = write(asked, 200, [(b"content-length", b"0")], keep_alive=False)
    own = ResponseWriter()
    raw_own = write(own, 400, [(b"content-length", b"0"), (b"connection", b"close")])
    assert raw.count(b"connection: close") == raw_own.count(b"connection: close") == 1
    assert not asked.keep_alive and not own.keep_alive


def test_informational() -> None:
    assert informational(103, [(b"link", b"</a>")]) == (
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    )
