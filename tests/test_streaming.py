"""Large bodies stream through the proxy in both directions without being buffered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.proxy import RSS_GROWTH_LIMIT_KIB, ProxyProcess, curl_with_rss

pytestmark = pytest.mark.slow

SIZE = 200 * 1024 * 1024


async def test_200mb_response_streams_with_bounded_memory(proxy: ProxyProcess) -> None:
    reply, growth = await curl_with_rss(
        proxy, "--http1.1", "-o", "/dev/null", "-w", "%{size_download}",
        *proxy.curl_args(f"/bytes/{SIZE}"),
    )  # fmt: skip
    assert int(reply.body) == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"


async def test_200mb_upload_streams_with_bounded_memory(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    with payload.open("wb") as f:
        f.truncate(SIZE)  # sparse: zeros without touching the disk
    reply, growth = await curl_with_rss(
        proxy, "--http1.1", "-T", str(payload), *proxy.curl_args("/upload")
    )
    assert json.loads(reply.body)["length"] == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"
