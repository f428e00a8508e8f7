"""Process lifecycle: graceful SIGTERM, and refusing to start on a broken configuration."""

from __future__ import annotations

import json
import signal
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.net import free_port
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.run import port443


@pytest.mark.slow
async def test_sigterm_drains_in_flight_request_then_exits_0(proxy: ProxyProcess) -> None:
    results: list[Reply] = []

    async def slow_request() -> None:
        results.append(await curl("--http1.1", *proxy.curl_args("/sleep/1.5"), check=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await trio.sleep(0.5)  # the request is now waiting on the backend
        proxy.process.send_signal(signal.SIGTERM)
        await trio.sleep(0.3)
        refused = await curl("--http1.1", *proxy.curl_args("/echo"), check=False)
        assert refused.returncode == 7, "listener must be closed while draining"
    assert results[0].returncode == 0, results[0].stderr
    assert json.loads(results[0].body)["target"] == "/sleep/1.5"
    assert await proxy.wait(10) == 0
    assert "shutting down: 1 connections open" in proxy.log()


@pytest.mark.slow
async def test_grace_period_bounds_the_drain(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_proxy(
        tmp_path, "[limits]\ngrace_period = 0.5\n" + sites_toml((["localhost"], [backend.url]))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(curl, "--http1.1", *proxy.curl_args("/stall"), check=False))
        await trio.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        assert await proxy.wait(5) == 0
        nursery.cancel_scope.cancel()
    assert "grace period over: closing 1 connections" in proxy.log()


def test_check_accepts_the_default_config() -> None:
    result = port443("check")
    assert result.returncode == 0, result.stderr
    assert "config/port443.toml: OK" in result.stdout


def test_broken_config_is_refused_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[listen]\nhttps = 70000\nhtps = 1\n[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n'
    )
    for command in ("check", "run"):
        result = port443(command, "-c", str(config))
        assert result.returncode == 1
        assert f"{config}:2: listen.https: must be an integer port 1-65535" in result.stderr
        assert f'{config}:3: listen.htps: unknown key (did you mean "https"?)' in result.stderr


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[listen]\nhttps = \n")
    result = port443("check", "-c", str(config))
    assert result.returncode == 1
    assert f"{config}:2: invalid TOML" in result.stderr


@pytest.mark.slow
async def test_shutdown_delay_keeps_serving_before_draining(
    tmp_path: Path, backend: Backend
) -> None:
    body = "[limits]\nshutdown_delay = 1.5\n" + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body)
    proxy.process.send_signal(signal.SIGTERM)
    await trio.sleep(0.5)
    during = await curl("--http1.1", *proxy.curl_args("/echo"))
    assert json.loads(during.body)["target"] == "/echo"
    assert "readiness now reports 503" in proxy.log()
    assert await proxy.wait(10) == 0


@pytest.mark.slow
async def test_two_processes_share_the_ports_for_a_hand_over(
    tmp_path: Path, backend: Backend
) -> None:
    """SO_REUSEPORT: a new process can start on the same ports, then the old one drains."""
    ports = (free_port(), free_port())
    sites = sites_toml((["localhost"], [backend.url]))
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old = await start_proxy(tmp_path / "old", sites, ports=ports)
    new = await start_proxy(tmp_path / "new", sites, ports=ports)
    url = old.url("/echo")
    try:
        for proxy_alive in (True, False):
            if not proxy_alive:
                assert await old.terminate() == 0
            for _ in range(10):  # a fresh connection each time; -k: two local CAs here
                result = await curl("-k", "--resolve", old.resolve(), url)
                assert json.loads(result.body)["target"] == "/echo"
    finally:
        await new.terminate()
