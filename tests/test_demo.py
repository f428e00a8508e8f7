"""The demo backend `make run` starts: any request gets an answer, and it never goes down."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.support.curl import curl
from tests.support.net import free_port
from tests.support.proxy import sites_toml, start_proxy
from tests.support.run import ROOT, wait_listening

pytestmark = pytest.mark.slow


@pytest.fixture
async def demo() -> AsyncIterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        assert await wait_listening(process, port, timeout=10), "the demo backend did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


async def test_head_malformed_and_upload_requests_leave_it_serving(
    demo: str, tmp_path: Path
) -> None:
    host, _, port = demo.removeprefix("http://").partition(":")
    async with await trio.open_tcp_stream(host, int(port)) as raw:
        await raw.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        assert (await raw.receive_some(4096)).startswith(b"HTTP/1.1 400 ")
    proxy = await start_proxy(tmp_path, sites_toml((["localhost"], [demo])), http=False)
    try:
        for _ in range(2):
            head = await curl("-I", *proxy.curl_args("/"))
            assert head.head[0].startswith("HTTP/2 200")
        upload = await curl("-d", "x" * 1000, *proxy.curl_args("/up"))
        echoed = json.loads(upload.body)
    finally:
        await proxy.terminate()
    assert (echoed["method"], echoed["target"], echoed["body_length"]) == ("POST", "/up", 1000)
    assert echoed["headers"]["x-forwarded-proto"] == "https"
