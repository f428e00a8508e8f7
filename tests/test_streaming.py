"""Large bodies stream through the proxy in both directions without being buffered."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.proxyproc import ProxyProcess, curl_args, run

SIZE = 200 * 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 64 * 1024  # far below the 200 MiB body: buffering would blow it


async def _transfer_with_rss(proxy: ProxyProcess, *curl: str) -> tuple[bytes, int]:
    """Run curl while sampling the proxy's RSS; returns curl's stdout and the peak growth."""
    baseline = proxy.rss_kib()
    peak = baseline
    done = trio.Event()
    out: list[bytes] = []

    async def transfer() -> None:
        result = await run(*curl, timeout=120, check=True)
        out.append(result.stdout)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfer)
        while not done.is_set():
            peak = max(peak, proxy.rss_kib())
            await trio.sleep(0.05)
    return out[0], peak - baseline


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
    stdout, growth = await _transfer_with_rss(proxy, *args)
    assert int(stdout) == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"


async def test_200mb_upload_streams_with_bounded_memory(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    with payload.open("wb") as f:
        f.truncate(SIZE)  # sparse: zeros without touching the disk
    args = curl_args(proxy, "/upload", "localhost", "--http1.1", "-T", str(payload))
    stdout, growth = await _transfer_with_rss(proxy, *args)
    assert json.loads(stdout)["length"] == SIZE
    assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB"
