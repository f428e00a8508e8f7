"""One instance, one view with `workers = 2`: /metrics counts every worker's requests,
/readyz is 503 while a worker is down, and long access-log lines from both workers reach a
shared pipe whole."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess, sites_toml
from tests.support.run import run
from tests.support.workers import start_workers, worker_pids

pytestmark = pytest.mark.slow

REQUESTS = 12
LONG_PATH = "/echo/" + "a" * 20000  # far above PIPE_BUF (4096) in every log line
LONG_REQUESTS = 200


async def _requests_total(proxy: ProxyProcess) -> float:
    metrics = await proxy.admin("/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics.text)
        if family.name == "port443_requests"
        for sample in family.samples
        if sample.name == "port443_requests_total"
    )


async def test_metrics_and_readiness_cover_every_worker(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        for _ in range(REQUESTS):  # a new connection each: both workers answer some
            await curl("--http1.1", *proxy.curl_args("/echo"))
        assert await _requests_total(proxy) == REQUESTS
        ready = await proxy.admin("/readyz")
        assert (ready.status, ready.text) == (200, "ready")
        subprocess.run(["kill", "-KILL", str(worker_pids(proxy)[2])], check=True)
        unready = await proxy.admin("/readyz")
        assert (unready.status, unready.text) == (
            503,
            "not ready: worker 2 is not running or not answering",
        )
        await proxy.wait_ready()
    finally:
        assert await proxy.terminate() == 0


async def test_long_access_log_lines_from_two_workers_never_interleave(
    tmp_path: Path, backend: Backend
) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # first: the workers' opens block
    received = bytearray()
    try:
        body = f'[access_log]\npath = "{fifo}"\n' + sites_toml((["localhost"], [backend.url]))
        proxy = await start_workers(tmp_path, body)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, reader, received)
                result = await run(
                    "h2load", "-n", str(LONG_REQUESTS), "-c", "20", "-m", "1",
                    f"https://localhost:{proxy.https_port}{LONG_PATH}", timeout=120,
                )  # fmt: skip
                assert f"{LONG_REQUESTS} succeeded".encode() in result.stdout, result.stdout
                with trio.fail_after(20):
                    while received.count(b"\n") < LONG_REQUESTS:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        finally:
            assert await proxy.terminate() == 0
    finally:
        os.close(reader)
    lines = bytes(received).splitlines()
    assert len(lines) == LONG_REQUESTS
    for line in lines:
        entry = json.loads(line)  # a torn or interleaved line is not JSON
        assert entry["path"] == LONG_PATH and entry["status"] == 200


async def _drain(fd: int, into: bytearray) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            into += os.read(fd, 8192)
        except BlockingIOError:
            continue
        await trio.sleep(0.001)  # a slow reader: the pipe fills, long writes get split
