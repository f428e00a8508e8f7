"""The admin listener's status page and /status.json, for one process and for workers; its
token; the traffic history's arithmetic."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy.handlers.status_page import render_status_page
from proxy.http.model import ConnectionInfo, Outcome, Request
from proxy.traffic import SLOT_SECONDS, SLOTS, TrafficHistory, merge_snapshots, quantile, summarize
from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.proxy import sites_toml, start_proxy
from tests.support.run import run
from tests.support.status_scenario import DOWN_REQUESTS, admin_get, start_scenario, status_json
from tests.support.workers import start_workers

# -- the traffic history, in process -------------------------------------------------------


def _outcome(status: int, seconds: float, site: str | None = "a.test") -> Outcome:
    request = Request(
        method=b"GET",
        target=b"/p?key=secret",
        host=b"a.test",
        headers=[],
        http_version=b"1.1",
        has_body=False,
        client_ip="127.0.0.1",
    )
    return Outcome(
        request=request,
        info=ConnectionInfo(client_ip="127.0.0.1", tls_version="TLSv1.3", alpn=None),
        listener="https",
        client_ip="127.0.0.1",
        started=0.0,
        finished=seconds,
        site=site,
        status=status,
    )


def test_quantiles_interpolate_inside_buckets() -> None:
    # 0.005 and 0.01 are the first two bounds: 10 in the first, 10 in the second.
    buckets = [10, 10] + [0] * 12
    assert quantile(buckets, 0.5) == pytest.approx(0.005)
    assert quantile(buckets, 0.75) == pytest.approx(0.0075)
    assert quantile([0] * 14, 0.5) is None
    assert quantile([0] * 13 + [4], 0.99) == 60.0  # the overflow bucket: the highest bound


def test_history_counts_slots_merges_workers_and_forgets_old_slots() -> None:
    now = 1000.0 * SLOT_SECONDS
    clock = [now - SLOTS * SLOT_SECONDS]  # one slot too old for the window
    history = TrafficHistory(clock=lambda: clock[0])
    history.record(_outcome(200, 0.001))
    clock[0] = now
    for status in (200, 200, 502):
        history.record(_outcome(status, 0.02))
    history.record(_outcome(200, 0.02, site=None))
    admin = _outcome(500, 0.02)
    admin.listener = "admin"  # not client traffic
    history.record(admin)
    other = TrafficHistory(clock=lambda: now)
    other.record(_outcome(504, 0.02))
    merged = summarize(merge_snapshots([history.snapshot(), other.snapshot()]), now + 2)
    assert (merged["requests"], merged["errors"]) == (5, 2)
    assert merged["sites"] == {"a.test": {"requests": 4, "errors": 2}}
    assert len(merged["series"]) == SLOTS
    assert merged["series"][-1]["requests_per_second"] == pytest.approx(5 / 2)
    assert merged["series"][0]["p50"] is None
    assert [e["status"] for e in merged["recent_errors"]] == [502, 504]
    assert merged["recent_errors"][0]["path"] == "/p"  # never the query string


def test_page_escapes_what_comes_from_outside() -> None:
    history = TrafficHistory(clock=lambda: 0.0)
    status = {
        "version": "1.0",
        "ready": True,
        "unready_reason": None,
        "uptime_seconds": 90061.0,
        "workers": [],
        "sites": [{"hosts": ["a.test"], "upstreams": [], "requests": 0, "errors": 0}],
        "certificates": [
            {
                "names": ["a.test"],
                "issuer": "acme",
                "not_after": None,
                "days_left": None,
                "missing": "none yet",
                "next_renewal": None,
                "renewal_plan": None,
                "ari_window": None,
                "last_error": "<script>alert(1)</script>",
            },
        ],
        "traffic": summarize(history.snapshot(), 0.0),
        "handshake_failures": {"<b>": 1.0},
    }
    page = render_status_page(status)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "<b>" not in page
    assert "up 1d 1h 1m" in page


# -- a real proxy -------------------------------------------------------------------------


@pytest.mark.slow
async def test_status_json_and_page_of_one_process(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_scenario(tmp_path, backend)
    try:
        status = await status_json(proxy)
        assert status["workers"] == [] and status["version"]
        assert status["unready_reason"] == "no certificate for site acme.test"
        down, acme = status["sites"]
        assert down["hosts"] == ["localhost"] and down["upstreams"][0]["up"] is False
        assert (down["requests"], down["errors"]) == (DOWN_REQUESTS, DOWN_REQUESTS)
        assert acme["upstreams"] == [{"url": backend.url, "up": None}]  # never used
        local, failing = status["certificates"]
        assert local["issuer"] == "local" and local["days_left"] > 1
        assert failing["missing"] == "none yet" and "Connection refused" in failing["last_error"]
        traffic = status["traffic"]
        assert (traffic["requests"], traffic["errors"]) == (DOWN_REQUESTS, DOWN_REQUESTS)
        assert [e["status"] for e in traffic["recent_errors"]] == [502] * DOWN_REQUESTS
        code, page = await admin_get(proxy, "/")
        assert code == 200
        text = page.decode()
        assert "acme.test" in text and "Connection refused" in text and "down" in text
        for raw in (page, await admin_get(proxy, "/status.json")):
            assert b"PRIVATE KEY" not in raw and b"secret-in-query" not in raw
    finally:
        assert await proxy.terminate() == 0
    assert "Traceback" not in proxy.log()


@pytest.mark.slow
async def test_admin_token(tmp_path: Path, backend: Backend) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    body = f'token_file = "{token_file}"\n' + sites_toml((["localhost"], [backend.url]))
    proxy = await start_proxy(tmp_path, body, admin=True)
    try:
        basic = base64.b64encode(b"anyone:s3cret-token").decode()
        wrong = base64.b64encode(b"anyone:guess").decode()
        for path in ("/", "/status.json", "/metrics"):
            code, _ = await admin_get(proxy, path)
            assert code == 401
            for header in (f"Authorization: Basic {wrong}", "Authorization: Bearer guess"):
                assert (await admin_get(proxy, path, "-H", header))[0] == 401
            for header in (f"Authorization: Basic {basic}", "Authorization: Bearer s3cret-token"):
                assert (await admin_get(proxy, path, "-H", header))[0] == 200
        head = await run("curl", "-sS", "-I", f"http://127.0.0.1:{proxy.admin_port}/")
        assert b'www-authenticate: Basic realm="port443 admin"' in head.stdout
        for path in ("/healthz", "/readyz"):  # load balancers probe these without credentials
            assert (await admin_get(proxy, path))[0] == 200
    finally:
        assert await proxy.terminate() == 0


@pytest.mark.slow
@pytest.mark.slow
async def test_status_of_workers(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        requests = 6
        for _ in range(requests):  # a new connection each: both workers answer some
            await curl("--http1.1", *proxy.curl_args("/echo"))
        status = await status_json(proxy)
        assert [w["index"] for w in status["workers"]] == [1, 2]
        assert all(w["ready"] and w["pid"] for w in status["workers"])
        assert status["ready"] and status["traffic"]["requests"] == requests
        assert status["sites"][0]["upstreams"][0]["up"] is True
        code, page = await admin_get(proxy, "/")
        assert code == 200 and b"2/2 workers ready" in page
    finally:
        assert await proxy.terminate() == 0
