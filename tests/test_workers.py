"""`[server] workers = 2` with real processes: connections reach both workers, a killed
worker comes back, and reload and shutdown reach every worker."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend
from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, sites_toml
from tests.support.run import port443
from tests.support.workers import serving_pid, start_workers, worker_pids

pytestmark = pytest.mark.slow

CONNECTIONS = 20


async def _echo(proxy: ProxyProcess) -> None:
    result = await curl("--http1.1", *proxy.curl_args("/echo"))
    assert json.loads(result.body)["target"] == "/echo"


async def test_connections_spread_over_both_workers(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        pids = set(worker_pids(proxy).values())
        assert len(pids) == 2 and proxy.process.pid not in pids
        clients = [socket.create_connection(("127.0.0.1", proxy.https_port)) for _ in range(20)]
        try:
            owners = [await serving_pid(proxy, client, pids) for client in clients]
        finally:
            for client in clients:
                client.close()
        assert set(owners) == pids, owners  # SO_REUSEPORT hashing: 2**-19 to miss one
        for _ in range(4):
            await _echo(proxy)
    finally:
        assert await proxy.terminate() == 0


async def test_a_killed_worker_is_restarted_and_no_client_is_refused(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        before = worker_pids(proxy)
        subprocess.run(["kill", "-KILL", str(before[1])], check=True)
        for _ in range(10):  # while worker 1 is down, its socket's clients wait, not fail
            await _echo(proxy)
        await proxy.wait_log("worker 1 started", count=2)
        assert f"worker 1 (pid {before[1]}) exited with signal SIGKILL; restarting" in proxy.log()
        after = worker_pids(proxy)
        assert after[1] != before[1] and after[2] == before[2]
        await proxy.wait_ready()
        metrics = await proxy.admin("/metrics")
        assert b"port443_worker_restarts_total 1.0" in metrics.body
    finally:
        assert await proxy.terminate() == 0


async def test_reload_reaches_every_worker(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        config = tmp_path / "port443.toml"
        config.write_text(config.read_text() + sites_toml((["new.test"], [backend.url])))
        reload = port443("reload", "-c", str(config))
        assert reload.returncode == 0, reload.stderr
        assert f"process {proxy.process.pid}" in reload.stdout  # the supervisor's pid file
        for index in (1, 2):
            await proxy.wait_log(f"[worker {index}] proxy.server: reloaded")
        await proxy.wait_ready()  # the follower loads new.test's certificate within 2 s
        for _ in range(4):
            added = await curl("--http1.1", *proxy.curl_args("/echo", "new.test"))
            assert json.loads(added.body)["headers"]["host"] == f"new.test:{proxy.https_port}"
    finally:
        assert await proxy.terminate() == 0


async def test_shutdown_drains_every_worker_and_exits_0(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    slow: list[Reply] = []

    async def slow_request() -> None:
        slow.append(await curl("--http1.1", *proxy.curl_args("/sleep/2"), check=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await trio.sleep(0.7)
        proxy.process.send_signal(signal.SIGTERM)
        await trio.sleep(0.3)
        assert (await proxy.admin("/readyz")).status == 503
        assert await proxy.wait(20) == 0
    assert slow[0].returncode == 0 and json.loads(slow[0].body)["target"] == "/sleep/2"
    log = proxy.log()
    for index in (1, 2):
        assert f"[worker {index}] proxy.server: stopped" in log
        assert f"worker {index} (pid" in log and "exited with 0" in log
    assert "all workers stopped" in log
