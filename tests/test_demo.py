"""The demo backend `make run` starts: any request gets an answer, and it never goes down."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.proxyproc import ROOT, curl_args, free_port, run, sites_toml, start_proxy


@pytest.fixture
def demo() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    process.stdout.readline()  # "demo backend on ...": it is listening
    yield f"http://127.0.0.1:{port}"
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
            head = await run(*curl_args(proxy, "/", "localhost", "-I"), check=True)
            assert head.stdout.startswith(b"HTTP/2 200")
        upload = await run(*curl_args(proxy, "/up", "localhost", "-d", "x" * 1000), check=True)
        echoed = json.loads(upload.stdout)
    finally:
        await proxy.terminate()
    assert (echoed["method"], echoed["target"], echoed["body_length"]) == ("POST", "/up", 1000)
    assert echoed["headers"]["x-forwarded-proto"] == "https"
