"""Configuration reload: SIGHUP and `port443 reload` apply a valid config without dropping
open requests, and refuse an invalid one while the old config keeps serving."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, sites_toml, write_config
from tests.support.run import port443


def _rewrite(proxy: ProxyProcess, tmp_path: Path, body: str) -> Path:
    return write_config(tmp_path, body, http_port=proxy.http_port, https_port=proxy.https_port)


@pytest.mark.slow
async def test_reload_adds_a_site_while_a_long_request_completes(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    long_request: list[Reply] = []

    async def slow() -> None:
        long_request.append(await curl("--http1.1", *proxy.curl_args("/sleep/2"), check=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.sleep(0.5)
        config = _rewrite(
            proxy,
            tmp_path,
            sites_toml((["localhost"], [backend.url]), (["new.test"], [backend.url])),
        )
        result = port443("reload", "-c", str(config))
        assert result.returncode == 0, result.stderr
        await proxy.wait_log("site new.test added", timeout=10)
        added = await curl("--http1.1", *proxy.curl_args("/echo", "new.test"))
        assert json.loads(added.body)["headers"]["host"] == f"new.test:{proxy.https_port}"
    assert long_request[0].returncode == 0, long_request[0].stderr
    assert json.loads(long_request[0].body)["target"] == "/sleep/2"


@pytest.mark.slow
async def test_invalid_reload_keeps_the_running_config(
    proxy: ProxyProcess, backend: Backend, tmp_path: Path
) -> None:
    config = _rewrite(proxy, tmp_path, sites_toml((["localhost"], [backend.url])) + "bogus = 1\n")
    refused = port443("reload", "-c", str(config))
    assert refused.returncode == 1
    assert "bogus: unknown key" in refused.stderr
    proxy.process.send_signal(signal.SIGHUP)  # bypassing the CLI's own check
    await proxy.wait_log("reload refused, keeping the running configuration", timeout=10)
    assert "bogus: unknown key" in proxy.log()
    still = await curl("--http1.1", *proxy.curl_args("/echo"))
    assert json.loads(still.body)["target"] == "/echo"


async def test_reload_without_a_running_proxy_fails_clearly(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, sites_toml((["a.test"], ["http://127.0.0.1:1"])), http_port=0, https_port=1
    )
    result = port443("reload", "-c", str(config))
    assert result.returncode == 1
    assert "no running proxy" in result.stderr
