"""Large bodies stream through the proxy in both directions without being buffered."""

from __future__ import annotations

import json
from pathlib import Path

from tests.proxyproc import RSS_GROWTH_LIMIT_KIB, ProxyProcess, curl_args, transfer_with_rss

SIZE = 200 * 1024 * 1024


async def test_200mb_response_streams_with_bounded_memory(proxy: ProxyProcess) -> None:
    args = curl_args(
        proxy,
        f"/bytes/{SIZE}",
        "localhost",
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    )
    stdout, growth = await transfer_with_rss(proxy, *args)
    assert int(stdout) == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"


async def test_200mb_upload_streams_with_bounded_memory(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    with payload.open("wb") as f:
        f.truncate(SIZE)  # sparse: zeros without touching the disk
    args = curl_args(proxy, "/upload", "localhost", "--http1.1", "-T", str(payload))
    stdout, growth = await transfer_with_rss(proxy, *args)
    assert json.loads(stdout)["length"] == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"
