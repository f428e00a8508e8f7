"""The request-head checks h11 does not make (proxy/http/h1_strict.py), in-process."""

from __future__ import annotations

import pytest

from proxy.http.h1_strict import ambiguity, has_bare_lf, head_of

HOST = (b"host", b"a.test")


def check(
    head: bytes, version: bytes, target: bytes, fields: list[tuple[bytes, bytes]]
) -> str | None:
    """`ambiguity` with the facts the front end gathers from these parsed fields."""
    names = {name for name, _ in fields}
    return ambiguity(
        head,
        version,
        target,
        host=dict(fields).get(b"host"),
        has_length=b"content-length" in names,
        has_transfer_encoding=b"transfer-encoding" in names,
    )


def test_head_of_stops_at_the_blank_line() -> None:
    assert (
        head_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\n") == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert head_of(b"GET / HTTP/1.1\nHost: a\n\nrest") == b"GET / HTTP/1.1\nHost: a\n\n"
    assert has_bare_lf(b"5\nhello") and not has_bare_lf(b"x: 1\r\n")


@pytest.mark.parametrize(
    ("head", "version", "target", "fields"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b"1.1", b"/", [HOST]),
        (
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"1.1",
            b"/",
            [(b"transfer-encoding", b"chunked")],
        ),
        (b"GET / HTTP/1.1\r\n\r\n", b"1.1", b"http://A.test/x", [HOST]),
    ],
)
def test_unambiguous_heads_pass(
    head: bytes, version: bytes, target: bytes, fields: list[tuple[bytes, bytes]]
) -> None:
    assert check(head, version, target, fields) is None


@pytest.mark.parametrize(
    ("head", "version", "target", "fields", "reason"),
    [
        (b"GET / HTTP/1.1\nHost: a.test\r\n\r\n", b"1.1", b"/", [HOST], "bare LF"),
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", b"1.1", b"/", [HOST], "obs-fold"),
        (
            b"POST / HTTP/1.1\r\n\r\n",
            b"1.1",
            b"/",
            [(b"content-length", b"1"), (b"transfer-encoding", b"chunked")],
            "both",
        ),
        (b"POST / HTTP/1.0\r\n\r\n", b"1.0", b"/", [(b"transfer-encoding", b"chunked")], "1.0"),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n",
            b"1.1",
            b"/",
            [(b"transfer-encoding", b"chunked")],
            "exactly",
        ),
        (b"GET / HTTP/1.1\r\n\r\n", b"1.1", b"https://b.test/", [HOST], "another host"),
    ],
)
def test_ambiguous_heads_are_refused(
    head: bytes, version: bytes, target: bytes, fields: list[tuple[bytes, bytes]], reason: str
) -> None:
    refused = check(head, version, target, fields)
    assert refused is not None and reason in refused
