"""Upstream group policies and active health through the real proxy, with real backends:
least connections prefers the idle backend, consistent hashing keeps a client on one backend,
and an active health check brings a backend back once it answers again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend, serve_backend
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.slow


async def status_of(proxy: ProxyProcess, path: str, *extra: str) -> int:
    return (await curl("-o", "/dev/null", *extra, *proxy.curl_args(path))).status


def group_site(backends: list[Backend], options: str) -> str:
    urls = ", ".join(f'"{b.url}"' for b in backends)
    return f'[[sites]]\nhosts = ["localhost"]\nupstreams = {{ backends = [{urls}], {options} }}\n'


def served(backends: list[Backend], target: str) -> list[int]:
    return [sum(r["target"] == target for r in b.requests) for b in backends]


async def test_least_conn_prefers_the_idle_backend(tmp_path: Path, nursery: trio.Nursery) -> None:
    backends = [await nursery.start(serve_backend, Backend()) for _ in range(2)]
    proxy = await start_proxy(tmp_path, group_site(backends, 'policy = "least_conn"'), http=False)
    try:
        async with trio.open_nursery() as slow:
            slow.start_soon(status_of, proxy, "/sleep/3")
            with trio.fail_after(10):
                while sum(served(backends, "/sleep/3")) == 0:
                    await trio.sleep(0.02)
            for _ in range(6):
                assert await status_of(proxy, "/echo") == 200
            busy = served(backends, "/sleep/3").index(1)
            # Every quick request went to the backend with nothing in flight.
            assert served(backends, "/echo")[busy] == 0
            assert served(backends, "/echo")[1 - busy] == 6
    finally:
        await proxy.terminate()


async def test_consistent_hashing_keeps_a_client_on_one_backend(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backends = [await nursery.start(serve_backend, Backend()) for _ in range(3)]
    options = 'policy = "consistent_hash", hash_key = "header:x-user"'
    proxy = await start_proxy(tmp_path, group_site(backends, options), http=False)
    try:
        homes: dict[str, set[int]] = {}
        for user in [f"user-{n}" for n in range(12)] * 3:
            before = [len(b.requests) for b in backends]
            assert await status_of(proxy, "/echo", "-H", f"X-User: {user}") == 200
            after = [len(b.requests) for b in backends]
            homes.setdefault(user, set()).add(next(i for i in range(3) if after[i] > before[i]))
    finally:
        await proxy.terminate()
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len({next(iter(home)) for home in homes.values()}) > 1  # users spread over backends


async def test_active_health_check_brings_a_backend_back(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    steady = await nursery.start(serve_backend, Backend())
    flaky = Backend()
    scope = trio.CancelScope()

    async def serve_flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_backend(flaky, task_status=task_status)

    await nursery.start(serve_flaky)
    health = 'health = { path = "/status/200", interval = 0.3, timeout = 1, rise = 1, fall = 1 }'
    proxy = await start_proxy(tmp_path, group_site([steady, flaky], health), http=False)
    try:
        scope.cancel()  # the flaky backend goes away; its port stays reserved in `flaky.port`
        await proxy.wait_log("is down", timeout=10)
        flaky.requests.clear()
        for _ in range(4):
            assert await status_of(proxy, "/echo") == 200
        assert served([steady, flaky], "/echo") == [4, 0]
        scope = trio.CancelScope()
        await nursery.start(serve_flaky)  # back on the same port
        await proxy.wait_log(re.compile(r"is up(?![\s\S]*is down)"), timeout=10)  # after the last
        for _ in range(6):
            assert await status_of(proxy, "/echo") == 200
        assert served([steady, flaky], "/echo")[1] > 0
    finally:
        await proxy.terminate()
