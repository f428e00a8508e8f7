"""Routes, upstream groups, health and client identity through the real proxy process, with
curl and real backends."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import trio

from tests.support.backend import Backend, serve_backend
from tests.support.curl import Reply, curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy

pytestmark = pytest.mark.slow


async def get(proxy: ProxyProcess, path: str, host: str = "localhost", *extra: str) -> Reply:
    return await curl(*extra, *proxy.curl_args(path, host))


async def test_two_sites_and_their_routes(tmp_path: Path, nursery: trio.Nursery) -> None:
    api, front, other = Backend(), Backend(), Backend()
    for backend in (api, front, other):
        await nursery.start(serve_backend, backend)
    body = f"""
[[sites]]
hosts = ["localhost"]
[[sites.routes]]
path_prefix = "/api"
strip_prefix = true
upstreams = ["{api.url}"]
request_headers.remove = ["X-Drop"]
request_headers.set = {{ "X-Env" = "test" }}
request_headers.add = {{ "X-Added" = "1" }}
response_headers = {{ set = {{ "Cache-Control" = "no-store" }} }}
[[sites.routes]]
path_prefix = "/old"
redirect = "https://localhost/new{{path}}?{{query}}"
status = 308
[[sites.routes]]
path = "/health"
respond = {{ status = 200, body = "ok" }}
[[sites.routes]]
path_prefix = "/"
upstreams = ["{front.url}"]
[[sites]]
hosts = ["other.localhost"]
upstreams = ["{other.url}"]
"""
    proxy = await start_proxy(tmp_path, body, http=False)
    try:
        reply = await get(proxy, "/api/users?id=1", "localhost", "-H", "X-Drop: 1")
        echo = json.loads(reply.body)
        assert (reply.status, echo["target"]) == (200, "/users?id=1")
        assert echo["headers"]["x-env"] == "test" and echo["headers"]["x-added"] == "1"
        assert "x-drop" not in echo["headers"] and reply.header("cache-control") == "no-store"
        reply = await get(proxy, "/old/page?x=1")
        assert (reply.status, reply.header("location")) == (
            308,
            "https://localhost/new/old/page?x=1",
        )
        reply = await get(proxy, "/health")
        assert (reply.status, reply.body, reply.header("content-type")) == (
            200,
            b"ok",
            "text/plain; charset=utf-8",
        )
        reply = await get(proxy, "/apix")
        assert reply.status == 200 and json.loads(reply.body)["target"] == "/apix"
        reply = await get(proxy, "/anything", "other.localhost")
        assert reply.status == 200 and json.loads(reply.body)["target"] == "/anything"
        assert [len(b.requests) for b in (api, front, other)] == [1, 1, 1]
    finally:
        await proxy.terminate()


async def test_round_robin_failover_and_all_down(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Three backends share the load evenly; one killed under load costs no client an error
    (GETs are retried elsewhere); with all gone the answer is 503 with Retry-After."""
    backends = [Backend() for _ in range(3)]
    scopes = []
    for backend in backends:
        scope = trio.CancelScope()
        scopes.append(scope)

        async def serve(
            backend: Backend = backend,
            scope: trio.CancelScope = scope,
            *,
            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with scope:
                await serve_backend(backend, task_status=task_status)

        await nursery.start(serve)
    urls = ", ".join(f'"{b.url}"' for b in backends)
    group = f"{{ backends = [{urls}], health = {{ cooldown = 30 }} }}"
    body = f'[[sites]]\nhosts = ["localhost"]\nupstreams = {group}\n'
    proxy = await start_proxy(tmp_path, body, http=False)
    try:
        for _ in range(30):
            assert (await get(proxy, "/echo")).status == 200
        assert Counter(len(b.requests) for b in backends) == {10: 1 * 3}
        scopes[0].cancel()  # closes its listener and every connection it had
        await trio.sleep(0.1)
        statuses = Counter([(await get(proxy, "/echo")).status for _ in range(30)])
        assert statuses == {200: 30}
        scopes[1].cancel()
        scopes[2].cancel()
        await trio.sleep(0.1)
        statuses = Counter([(await get(proxy, "/echo")).status for _ in range(6)])
        assert statuses[502] >= 1 and statuses[503] >= 1, statuses
        reply = await get(proxy, "/echo")
        assert reply.status == 503 and int(reply.header("retry-after") or 0) >= 1
        assert "is down (3 failures within 10s)" in proxy.log()
    finally:
        await proxy.terminate()


async def test_forwarded_headers_from_trusted_and_untrusted_peers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Untrusted (no trusted_proxies): the client's values are replaced. Then, reloaded with
    loopback trusted: they are kept and appended to."""
    backend = Backend()
    await nursery.start(serve_backend, backend)
    sent = ("-H", "X-Forwarded-For: 203.0.113.9", "-H", "Forwarded: for=203.0.113.9")
    body = sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body, http=False)
    try:
        for xff, forwarded in (
            ("127.0.0.1", "for=127.0.0.1"),
            ("203.0.113.9, 127.0.0.1", "for=203.0.113.9, for=127.0.0.1"),
        ):
            reply = await get(proxy, "/echo", "localhost", *sent)
            headers = json.loads(reply.body)["headers"]
            assert headers["x-forwarded-for"] == xff
            assert headers["forwarded"].startswith(forwarded + ";proto=https")
            if "203.0.113.9" in xff:
                break
            config = tmp_path / "port443.toml"
            config.write_text('trusted_proxies = ["127.0.0.0/8"]\n' + config.read_text())
            proxy.process.send_signal(signal.SIGHUP)
            await proxy.wait_log("trusted_proxies changed", timeout=10)
    finally:
        await proxy.terminate()
    # The access log names the client: the peer, then (trusted) the first untrusted hop.
    logged = [json.loads(line)["client_ip"] for line in proxy.log().splitlines() if line[:1] == "{"]
    assert logged == ["127.0.0.1", "203.0.113.9"]
