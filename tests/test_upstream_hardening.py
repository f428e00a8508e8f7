"""Hostile and broken HTTP/1.1 upstreams, driven by a corpus of raw responses
(tests/corpus/upstream_responses.toml), through the real proxy to real curl clients.

What must hold for every case: the client gets what the corpus says (502 for the upstream's
mistakes, never a 400), a request that follows gets its own response and never bytes an
upstream left on a pooled connection, the log names what was wrong, and nothing is logged
as a traceback.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.rawbackend import Answer, RawBackend, clean_response

pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "corpus" / "upstream_responses.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CORPUS.read_text())["case"]
PROTOCOLS = {"h1": "--http1.1", "h2": "--http2"}


def raw_response(case: dict[str, Any]) -> bytes:
    data = case["response"].encode("latin-1")
    padding = case.get("header_padding", 0)
    if padding:
        status_line, _, rest = data.partition(b"\r\n")
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        data = status_line + b"\r\n" + line * (padding // len(line) + 1) + rest
    return data


def corpus_script(path: bytes, nth: int) -> Answer:
    name = path.removeprefix(b"/case/").decode()
    case = next(c for c in CASES if c["name"] == name)
    return raw_response(case), bool(case.get("close", False))


async def fetch(proxy: ProxyProcess, protocol: str, path: str) -> Reply:
    return await curl(PROTOCOLS[protocol], *proxy.curl_args(path), check=False)


@pytest.fixture
async def raw_proxy(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ProxyProcess]:
    backend: RawBackend = await nursery.start(RawBackend(corpus_script).serve)
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), http=False)
    yield proxy
    await proxy.terminate()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_corpus_of_broken_upstream_responses(raw_proxy: ProxyProcess, protocol: str) -> None:
    for case in CASES:
        reply = await fetch(raw_proxy, protocol, f"/case/{case['name']}")
        where = f"{protocol} {case['name']}: {reply}"
        if case["expect"] == "truncated" and protocol == "h1":
            assert reply.returncode == 18 and reply.status == 200, where  # partial body
        elif case["expect"] == "truncated":
            assert b"INTERNAL_ERROR" in reply.stderr, where  # RST_STREAM
        else:
            assert reply.returncode == 0 and reply.status == case["expect"], where
            if "body" in case:
                assert reply.body == case["body"].encode(), where
        after = await fetch(raw_proxy, protocol, "/clean")
        assert after.status == 200 and after.body.startswith(b"clean /clean #"), (where, after)
        assert case["log"] in raw_proxy.log(), where
    log = raw_proxy.log()
    assert "Traceback" not in log and "SMUGGLED" not in log


def race_script(path: bytes, nth: int) -> Answer:
    """Answer the first request of a connection; close on the second without a word, as an
    upstream whose keep-alive timeout fires just as the proxy reuses the connection."""
    return (clean_response(path, nth), False) if nth == 1 else (b"", True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_idle_close_racing_a_reused_connection_is_resent(
    tmp_path: Path, nursery: trio.Nursery, protocol: str
) -> None:
    backend: RawBackend = await nursery.start(RawBackend(race_script).serve)
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [backend.url])), http=False)
    try:
        for _ in range(3):
            reply = await fetch(proxy, protocol, "/race")
            assert (reply.returncode, reply.status) == (0, 200), reply
            assert reply.body == b"clean /race #1"
        # Each request after the first went out twice: on the pooled connection, then anew.
        assert backend.requests == [b"/race"] * 5
        assert backend.connections == 3
    finally:
        await proxy.terminate()
