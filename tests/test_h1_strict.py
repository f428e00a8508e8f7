"""The request-head checks the parser does not make (proxy/http/h1_strict.py), in-process."""

from __future__ import annotations

import pytest

from proxy.http.h1_strict import ambiguity

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
        has_transfer_encoding=b"transfer-encoding" in names,
    )


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


TE_CHUNKED = [(b"transfer-encoding", b"chunked")]


def post_with(line: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\n" + line + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "version", "target", "fields", "reason"),
    [
        (b"POST / HTTP/1.0\r\n\r\n", b"1.0", b"/", TE_CHUNKED, "1.0"),
        (post_with(b"Transfer-Encoding: Chunked"), b"1.1", b"/", TE_CHUNKED, "exactly"),
        (post_with(b"Transfer-Encoding:\tchunked"), b"1.1", b"/", TE_CHUNKED, "exactly"),
        (post_with(b"Transfer-Encoding: chunked "), b"1.1", b"/", TE_CHUNKED, "exactly"),
        (b"GET / HTTP/1.1\r\n\r\n", b"1.1", b"https://b.test/", [HOST], "another host"),
    ],
)  # fmt: skip
def test_ambiguous_heads_are_refused(
    head: bytes, version: bytes, target: bytes, fields: list[tuple[bytes, bytes]], reason: str
) -> None:
    refused = check(head, version, target, fields)
    assert refused is not None and reason in refused
