"""A real browser loads the status page: headless Chromium renders it against a running
port443 with two sites, one upstream down and one certificate failing to be ordered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.proxy import ProxyProcess
from tests.support.run import run
from tests.support.status_scenario import start_scenario

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/apt-packages)"),
]


async def _chromium(tmp_path: Path, url: str, *args: str) -> tuple[str, list[str]]:
    """The rendered DOM and the console messages Chromium logged for `url`."""
    assert CHROMIUM is not None
    result = await run(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium'}",
        *args, url, timeout=60, check=True,
    )  # fmt: skip
    console = [line for line in result.stderr.decode().splitlines() if ":CONSOLE" in line]
    return result.stdout.decode(), console


async def test_console_messages_are_seen(tmp_path: Path) -> None:
    """The check below could not fail if Chromium's console went elsewhere."""
    page = tmp_path / "noisy.html"
    page.write_text("<p>x</p><script>console.error('noisy page')</script>")
    _, console = await _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert any("noisy page" in line for line in console)


async def test_status_page_in_chromium(tmp_path: Path, backend: Backend) -> None:
    proxy: ProxyProcess = await start_scenario(tmp_path, backend)
    try:
        url = f"http://127.0.0.1:{proxy.admin_port}/"
        dom, console = await _chromium(tmp_path, url, "--dump-dom")
        assert console == []
        for text in (
            "port443",
            "not ready: no certificate for site acme.test",
            "single process",
            "localhost",
            "acme.test",
            "down",  # the upstream of localhost
            "none yet",
            "Connection refused",  # the failed order's error
            "502",  # in the recent errors
            "<svg",
        ):
            assert text in dom, text
        screenshot = tmp_path / "status-page.png"
        _, console = await _chromium(
            tmp_path, url, f"--screenshot={screenshot}", "--window-size=1280,1600"
        )
        assert console == []
        assert screenshot.stat().st_size > 10_000  # kept as the test's artifact
    finally:
        assert await proxy.terminate() == 0
