"""Ambiguous and malformed HTTP/1.1 requests, driven by a corpus (tests/corpus/requests.toml):
refused with 400 before any byte goes upstream, or, when the body's framing breaks after the
head went up, answered 400 with the upstream request aborted; never left waiting."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.backend import Backend
from tests.support.proxy import ProxyProcess
from tests.support.tls import tls_stream

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "corpus" / "requests.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CORPUS.read_text())["case"]
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
FINAL_HEAD = re.compile(rb"HTTP/1\.[01] [2-5]\d\d .*?\r\n\r\n", re.DOTALL)
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


def complete(received: bytes) -> bool:
    """Whether a final response with its whole Content-Length body has arrived."""
    for match in FINAL_HEAD.finditer(received):
        length = CONTENT_LENGTH.search(match[0])
        if length is not None and len(received) - match.end() >= int(length[1]):
            return True
    return False


async def exchange(proxy: ProxyProcess, raw: bytes) -> bytes:
    """What the proxy sends back, up to a complete final response or the connection's end
    (not waiting out the proxy's lingering close)."""
    received = b""
    with trio.fail_after(8):  # a refused client is answered at once, never left to time out
        stream = await tls_stream(proxy)
        await stream.send_all(raw)
        try:
            while not complete(received) and (chunk := await stream.receive_some(65536)):
                received += chunk
        except trio.BrokenResourceError:
            pass  # a reset after the answer
    await stream.aclose()
    return received


def final_status(received: bytes) -> int:
    statuses = [int(m[1]) for m in STATUS_LINE.finditer(received)]
    final = [status for status in statuses if status >= 200]
    return final[0] if final else 0


async def test_request_corpus(proxy: ProxyProcess, backend: Backend) -> None:
    wrong: list[str] = []
    for case in CASES:
        requests, hangups = len(backend.requests), len(backend.hangups)
        raw = case["request"].replace("{host}", "localhost").encode("latin-1")
        received = await exchange(proxy, raw)
        status = final_status(received)
        if status != case["expect"]:
            wrong.append(f"{case['name']}: got {status} ({received[:60]!r}), want {case['expect']}")
        seen = "nothing" if len(backend.requests) == requests else "answered"
        if case["backend"] == "aborted":
            with trio.move_on_after(5):
                while len(backend.hangups) == hangups:
                    await trio.sleep(0.02)
            seen = "aborted" if len(backend.hangups) > hangups else seen
        if seen != case["backend"]:
            wrong.append(f"{case['name']}: backend saw {seen}, want {case['backend']}")
    assert not wrong, "\n".join(wrong)
    assert "Traceback" not in proxy.log()
