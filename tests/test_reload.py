"""Configuration reload: SIGHUP and `port443 reload` apply a valid config without dropping
open requests, and refuse an invalid one while the old config keeps serving."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.backend import Backend
from tests.proxyproc import ROOT, ProxyProcess, curl_args, run, sites_toml, write_config


def _rewrite(proxy: ProxyProcess, tmp_path: Path, body: str) -> Path:
    return write_config(tmp_path, body, http_port=proxy.http_port, https_port=proxy.https_port)


def _port443(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


async def _wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while text not in proxy.log():
            await trio.sleep(0.05)


async def test_reload_adds_a_site_while_a_long_request_completes(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    long_request: list[subprocess.CompletedProcess[bytes]] = []

    async def slow() -> None:
        long_request.append(await run(*curl_args(proxy, "/sleep/2", "localhost", "--http1.1")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.sleep(0.5)
        config = _rewrite(
            proxy,
            tmp_path,
            sites_toml((["localhost"], [backend.url]), (["new.test"], [backend.url])),
        )
        result = _port443("reload", "-c", str(config))
        assert result.returncode == 0, result.stderr
        await _wait_for_log(proxy, "site new.test added")
        added = await run(*curl_args(proxy, "/echo", "new.test", "--http1.1"), check=True)
        assert json.loads(added.stdout)["headers"]["host"] == f"new.test:{proxy.https_port}"
    assert long_request[0].returncode == 0, long_request[0].stderr
    assert json.loads(long_request[0].stdout)["target"] == "/sleep/2"


async def test_invalid_reload_keeps_the_running_config(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    config = _rewrite(proxy, tmp_path, sites_toml((["localhost"], [backend.url])) + "bogus = 1\n")
    refused = _port443("reload", "-c", str(config))
    assert refused.returncode == 1
    assert "bogus: unknown key" in refused.stderr
    proxy.process.send_signal(signal.SIGHUP)  # bypassing the CLI's own check
    await _wait_for_log(proxy, "reload refused, keeping the running configuration")
    assert "bogus: unknown key" in proxy.log()
    still = await run(*curl_args(proxy, "/echo", "localhost", "--http1.1"), check=True)
    assert json.loads(still.stdout)["target"] == "/echo"


async def test_reload_without_a_running_proxy_fails_clearly(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, sites_toml((["a.test"], ["http://127.0.0.1:1"])), http_port=0, https_port=1
    )
    result = _port443("reload", "-c", str(config))
    assert result.returncode == 1
    assert "no running proxy" in result.stderr
