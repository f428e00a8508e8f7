"""Retries through the real proxy: a backend process SIGKILLed under h2load costs no
idempotent request (bodies included); a POST goes elsewhere when its backend cannot be
reached, but not once a backend took it (unless the group allows it); a body is resent
from the replay buffer, and not when it outgrew it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio

from tests.support.backend import Backend, serve_backend
from tests.support.curl import Reply, curl
from tests.support.net import free_port
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.run import ROOT, run, wait_listening

pytestmark = pytest.mark.slow

LOAD_REQUESTS = 2000
KILL_AFTER = 400  # requests logged before the backend is killed: mid-run
_SUMMARY = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def access_lines(proxy: ProxyProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]


@dataclass
class DemoBackend:
    process: subprocess.Popen[bytes]
    url: str


@asynccontextmanager
async def demo_backend() -> AsyncIterator[DemoBackend]:
    """The demo backend (`python -m proxy.demo`) as a process of its own, to be SIGKILLed."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert await wait_listening(process, port), "the demo backend did not start"
        yield DemoBackend(process=process, url=f"http://127.0.0.1:{port}")
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_a_backend_killed_under_load_costs_no_idempotent_request(
    tmp_path: Path, method: str
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"x" * 4096)
    with_body = ["-d", str(body), "-H", f":method: {method}"] if method != "GET" else []
    async with demo_backend() as doomed, demo_backend() as steady:
        urls = [doomed.url, steady.url]
        group = f"{{ backends = {json.dumps(urls)} }}"
        proxy = await start_proxy(
            tmp_path, f'[[sites]]\nhosts = ["localhost"]\nupstreams = {group}\n', http=False
        )
        try:
            async with trio.open_nursery() as nursery:
                results: list[subprocess.CompletedProcess[bytes]] = []

                async def load() -> None:
                    argv = ["h2load", "-n", str(LOAD_REQUESTS), "-c", "4", "-m", "10"]
                    results.append(await run(*argv, *with_body, proxy.url("/"), timeout=180))

                nursery.start_soon(load)
                with trio.fail_after(120):
                    while len(access_lines(proxy)) < KILL_AFTER and not results:
                        await trio.sleep(0.05)
                assert not results, "the load ended before the kill"
                doomed.process.kill()  # SIGKILL: connections reset, then refused
            lines = access_lines(proxy)
        finally:
            await proxy.terminate()
    out = results[0].stdout.decode()
    summary = _SUMMARY.search(out)
    assert summary is not None, out + results[0].stderr.decode()
    total, _, done, succeeded, failed, errored, timeout = map(int, summary.groups())
    assert (total, done, succeeded) == (LOAD_REQUESTS,) * 3, out
    assert (failed, errored, timeout) == (0, 0, 0), out
    assert f"status codes: {LOAD_REQUESTS} 2xx" in out, out
    assert {line["method"] for line in lines} == {method}
    served = Counter(line["upstream"] for line in lines)
    assert served[urls[0]] >= 1 and served[urls[1]] > served[urls[0]], served
    assert "is down" in proxy.log()  # the killed backend, once it refused connections


@dataclass
class Swallower:
    """A backend that reads each request to its end, then closes without a word: an
    upstream that died with the request in hand."""

    port: int = 0
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # method, x-case, bytes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[Swallower]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        method, case, size = "", "", 0
        async with stream:
            while (event := conn.next_event()) is not h11.PAUSED:
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    method = event.method.decode()
                    case = dict(event.headers).get(b"x-case", b"").decode()
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self.seen.append((method, case, size))
                    return


def retry_group(urls: list[str], options: str = "") -> str:
    return f"{{ backends = {json.dumps(urls)}, health = {{ max_fails = 100 }}{options} }}"


async def upload(proxy: ProxyProcess, path: str, method: str, size: int, case: str) -> Reply:
    data = (b"%d" % size) * size
    reply = await curl(
        "-X", method, "--data-binary", data[:size].decode(), "-H", f"X-Case: {case}",
        *proxy.curl_args(path), check=False,
    )  # fmt: skip
    if reply.status == 200:
        echo = json.loads(reply.body)
        assert echo == {"length": size, "sha256": hashlib.sha256(data[:size]).hexdigest()}
    return reply


async def test_bodies_are_resent_only_when_safe_and_kept(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    swallower: Swallower = await nursery.start(Swallower().serve)
    good: Backend = await nursery.start(serve_backend, Backend())
    urls = [swallower.url, good.url]
    site = (
        '[[sites]]\nhosts = ["localhost"]\n'
        f'[[sites.routes]]\npath_prefix = "/tight"\nstrip_prefix = true\n'
        f"upstreams = {retry_group(urls, ', retry_buffer = 1024')}\n"
        f'[[sites.routes]]\npath_prefix = "/lenient"\nstrip_prefix = true\n'
        f"upstreams = {retry_group(urls, ', retry_non_idempotent = true')}\n"
        f'[[sites.routes]]\npath_prefix = "/"\nupstreams = {retry_group(urls)}\n'
    )
    proxy = await start_proxy(tmp_path, site, http=False)
    cases: dict[str, tuple[str, str, int]] = {
        "put": ("/upload", "PUT", 20000),  # idempotent, within 64 KiB: resent
        "post": ("/upload", "POST", 300),  # the backend may have acted on it: 502
        "lenient": ("/lenient/upload", "POST", 20000),  # allowed by the group: resent
        "tight-small": ("/tight/upload", "PUT", 1000),  # within retry_buffer = 1024
        "tight-big": ("/tight/upload", "PUT", 20000),  # outgrew it: 502
    }
    statuses: dict[str, Counter[int]] = {}
    try:
        for case, (path, method, size) in cases.items():
            statuses[case] = Counter(
                [(await upload(proxy, path, method, size, case)).status for _ in range(4)]
            )
    finally:
        await proxy.terminate()
    swallowed = Counter(case for _, case, _ in swallower.seen)
    assert all(swallowed[case] >= 1 for case in cases), swallowed  # each met the dead end
    assert all(size == cases[case][2] for _, case, size in swallower.seen)  # bodies whole
    for case in ("put", "lenient", "tight-small"):
        assert statuses[case] == {200: 4}, (case, statuses)
    for case in ("post", "tight-big"):
        assert statuses[case] == {502: swallowed[case], 200: 4 - swallowed[case]}, statuses


async def test_a_post_goes_elsewhere_when_its_backend_cannot_be_reached(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    good: Backend = await nursery.start(serve_backend, Backend())
    closed = f"http://127.0.0.1:{free_port()}"  # nobody listens: connections are refused
    group = f'{{ backends = ["{closed}", "{good.url}"], health = {{ max_fails = 2 }} }}'
    site = f'[[sites]]\nhosts = ["localhost"]\nupstreams = {group}\n'
    proxy = await start_proxy(tmp_path, site, http=False)
    try:
        replies = [await upload(proxy, "/upload", "POST", 500, "post") for _ in range(4)]
    finally:
        await proxy.terminate()
    assert [reply.status for reply in replies] == [200] * 4
    assert [request["method"] for request in good.requests] == ["POST"] * 4
    assert f"backend {closed} is down" in proxy.log()  # it was tried first, twice
    assert "retrying" not in proxy.log()  # connect failover: no request was sent twice
