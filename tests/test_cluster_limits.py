"""The per-client request rate shared through a real redis-server: two `ClientLimits`
(two processes) draw on one budget; with Redis down each decides alone (failing open),
counts it, says so once, and shares again when Redis is back. Then the same with two
real proxy processes (slow), and the config rules."""

from __future__ import annotations

import base64
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from proxy import client_limits
from proxy.client_limits import ClientLimits
from proxy.config import LimitsConfig, StorageConfig
from proxy.config_load import ConfigError, load_config
from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.redisproc import RedisServer, run_redis
from tests.test_observability import parse_metrics, sample

KEY = base64.urlsafe_b64encode(bytes(range(32))).decode()
SHARED = LimitsConfig(
    requests_per_second_per_ip=0.1, request_burst_per_ip=3, shared_request_rate=True
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path / "redis") as server:
        yield server


def _storage(server: RedisServer) -> StorageConfig:
    return StorageConfig(backend="redis", url=server.url, encryption_key=KEY)


async def test_two_processes_draw_on_one_budget(server: RedisServer) -> None:
    first, second = ClientLimits(SHARED, _storage(server)), ClientLimits(SHARED, _storage(server))
    client = "192.0.2.7"
    allowed = [await limits.check_request(client) for limits in (first, second, first)]
    assert allowed == [None, None, None]  # the burst of 3, spent across both
    assert await second.check_request(client) == 10  # one request per 10 s: Retry-After 10
    assert await first.check_request("2001:db8::1") is None  # another client, another budget
    assert await first.check_request(client) is not None
    assert first.refused_requests == 1 and second.refused_requests == 1
    assert first.retry_after(client) is None  # the process's own bucket was not drawn on

    first.configure(LimitsConfig(requests_per_second_per_ip=0.1, request_burst_per_ip=3))
    assert await first.check_request(client) is None  # reload: not shared any more


async def test_redis_down_fails_open_then_shares_again(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ClientLimits(SHARED, _storage(server))
    client = "192.0.2.8"
    for _ in range(3):
        assert await limits.check_request(client) is None
    assert await limits.check_request(client) is not None
    server.stop()
    with caplog.at_level(logging.INFO, logger="proxy.client_limits"):
        # the shared budget is spent, but Redis is gone: this process's own bucket decides
        statuses = [await limits.check_request(client) for _ in range(4)]
        assert statuses[:3] == [None, None, None] and statuses[3] is not None
        assert limits.unshared_requests == 4
        server.start()  # empty: a fresh budget
        assert await limits.check_request(client) is not None  # still in the 1 s pause
        await trio.sleep(client_limits.SHARED_RETRY)
        assert await limits.check_request(client) is None  # counted in Redis again
    messages = [record.getMessage() for record in caplog.records]
    assert sum("Redis unreachable" in m for m in messages) == 1, messages
    assert sum("Redis reachable again" in m for m in messages) == 1, messages
    assert not [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "[limits]\nrequests_per_second_per_ip = 5\nshared_request_rate = true\n",
            "needs [storage]",
        ),
        (
            f'[limits]\nshared_request_rate = true\n[storage]\nbackend = "redis"\n'
            f'url = "redis://127.0.0.1/0"\nencryption_key = "{KEY}"\n',
            "needs requests_per_second_per_ip",
        ),
    ],
)
def test_the_shared_rate_needs_redis_and_a_rate(tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "port443.toml"
    path.write_text(body + sites_toml((["a.test"], ["http://127.0.0.1:1"])))
    with pytest.raises(ConfigError, match=re.escape(f"limits.shared_request_rate: {problem}")):
        load_config(path)


async def _statuses(proxies: list[ProxyProcess], count: int) -> list[int]:
    """`count` requests, one per connection, taking turns between the proxies."""
    statuses = []
    for n in range(count):
        reply = await curl(*proxies[n % 2].curl_args("/echo"), check=False)
        statuses.append(reply.status)
    return statuses


@pytest.mark.slow
async def test_two_instances_share_one_limit(
    tmp_path: Path, server: RedisServer, backend: Backend
) -> None:
    body = (
        "[limits]\nrequests_per_second_per_ip = 0.1\nrequest_burst_per_ip = 4\n"
        f'shared_request_rate = true\n[storage]\nbackend = "redis"\nurl = "{server.url}"\n'
        f'encryption_key = "{KEY}"\n' + sites_toml((["localhost"], [backend.url]))
    )
    proxies: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            if proxies:  # one local CA for both: whichever orders, curl trusts it
                shutil.copytree(proxies[0].certs_dir / "local", tmp_path / name / "certs" / "local")
            proxies.append(await start_proxy(tmp_path / name, body, admin=True))
            await proxies[-1].wait_ready()
        assert await _statuses(proxies, 8) == [200] * 4 + [429] * 4  # one budget of 4, not two

        server.stop()
        assert await _statuses(proxies, 2) == [200, 200]  # failing open: each decides alone
        for proxy in proxies:
            await proxy.wait_log("shared request rate: Redis unreachable")
            samples = parse_metrics((await proxy.admin("/metrics")).body.decode())
            assert sample(samples, "port443_client_limit_unshared_requests_total") >= 1
            assert "Traceback" not in proxy.log()
    finally:
        for proxy in proxies:
            await proxy.terminate()
