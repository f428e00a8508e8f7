"""The private h11 switch proxy/http/h11_internals.py relies on: fails clearly on an h11 upgrade
that removes or changes it."""

from __future__ import annotations

import inspect

import h11

from proxy.http.h11_internals import declared_chunk_size, trusted_request

FIELDS = [(b"host", b"example.test"), (b"content-length", b"2"), (b"x-a", b"1")]


def send_bytes(event: h11.Event) -> bytes:
    return h11.Connection(h11.CLIENT).send(event) or b""


def test_h11_still_has_the_parsed_switch() -> None:
    assert "_parsed" in inspect.signature(h11.Request.__init__).parameters, (
        f"h11 {h11.__version__} dropped Request(_parsed=...): "
        "proxy/http/h11_internals.py must change"
    )


def test_trusted_events_write_what_validated_ones_write() -> None:
    request = trusted_request(b"POST", b"/a?b", FIELDS)
    checked = h11.Request(method=b"POST", target=b"/a?b", headers=FIELDS)
    assert send_bytes(request) == send_bytes(checked)
    # h11 frames the body from the trusted fields as from its own.
    conn = h11.Connection(h11.CLIENT)
    conn.send(request)
    assert conn.send(h11.Data(data=b"ok")) == b"ok"


def test_trusted_events_skip_field_validation() -> None:
    """The point of the switch: h11 would refuse this name (a space) if it validated."""
    odd = [(b"host", b"example.test"), (b"x a", b"1")]
    assert b"x a: 1\r\n" in send_bytes(trusted_request(b"GET", b"/", odd))


def test_declared_chunk_size_is_read_from_h11s_chunk_reader() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\nhello"
    )
    assert isinstance(conn.next_event(), h11.Request)
    data = conn.next_event()
    assert isinstance(data, h11.Data) and data.chunk_start
    assert declared_chunk_size(conn, data) == 0x1000, "h11's ChunkedReader changed"
