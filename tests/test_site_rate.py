"""A site's own request rate per client (`requests_per_second_per_ip` in `[[sites]]`),
overriding `[limits]`'s: the loader, the buckets, and 429 with Retry-After from a real proxy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from proxy import client_limits
from proxy.client_limits import ClientLimits
from proxy.config import LimitsConfig, RequestRate, StorageConfig
from proxy.config_load import ConfigError, parse_config
from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.redisproc import run_redis
from tests.test_cluster_limits import KEY

SITES = """
[[sites]]
hosts = ["a.test"]
upstreams = ["http://127.0.0.1:8000"]
{a}
[[sites]]
hosts = ["b.test"]
upstreams = ["http://127.0.0.1:8000"]
"""


def test_the_loader_reads_a_sites_rate_and_burst() -> None:
    text = "[limits]\nrequests_per_second_per_ip = 5\n" + SITES.format(
        a="requests_per_second_per_ip = 0.5\nrequest_burst_per_ip = 2"
    )
    a, b = parse_config(text, Path("port443.toml")).sites
    assert a.request_rate == RequestRate(per_second=0.5, burst=2)
    assert b.request_rate is None  # [limits]' rate
    only_rate = parse_config(SITES.format(a="requests_per_second_per_ip = 0"), Path("x.toml"))
    assert only_rate.sites[0].request_rate == RequestRate(per_second=0.0, burst=None)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("request_burst_per_ip = 3", "needs the site's requests_per_second_per_ip"),
        ("requests_per_second_per_ip = -1", "must be a number >= 0, got -1"),
        ("requests_per_second_per_ip = 1\nrequest_burst_per_ip = 0", "integer >= 1, got 0"),
    ],
)
def test_the_loader_refuses_bad_site_rates(keys: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SITES.format(a=keys), Path("port443.toml"))
    assert len(info.value.problems) == 1 and message in info.value.problems[0], info.value


def test_a_sites_rate_overrides_the_global_one_in_a_bucket_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(client_limits.time, "monotonic", lambda: now[0])
    config = parse_config(
        "[limits]\nrequests_per_second_per_ip = 100\nrequest_burst_per_ip = 3\n"
        + SITES.format(a="requests_per_second_per_ip = 1\nrequest_burst_per_ip = 2"),
        Path("port443.toml"),
    )
    strict, loose = config.sites
    limits = ClientLimits(config.limits)
    client = "192.0.2.1"
    assert [limits.retry_after(client, strict) for _ in range(3)] == [None, None, 1]
    assert limits.retry_after(client, loose) is None  # the global bucket is untouched
    assert [limits.retry_after(client) for _ in range(2)] == [None, None]  # no site: global
    assert limits.retry_after(client, loose) == 1  # the global burst of 3 is spent
    now[0] += 1.0  # one token back at the site's 1/s
    assert limits.retry_after(client, strict) is None
    free = parse_config(SITES.format(a="requests_per_second_per_ip = 0"), Path("x.toml")).sites
    capped = ClientLimits(LimitsConfig(requests_per_second_per_ip=1, request_burst_per_ip=1))
    assert [capped.retry_after(client, free[0]) for _ in range(5)] == [None] * 5  # 0: no limit
    assert capped.retry_after(client, free[1]) is None
    assert capped.retry_after(client, free[1]) == 1
    assert limits.refused_requests == 2 and capped.refused_requests == 1


async def statuses(proxy: ProxyProcess, count: int, *extra: str, host: str) -> list[str]:
    """The HTTP status of each of `count` requests riding one connection to `host`."""
    args = proxy.curl_args("/echo", host=host)[:-1]  # the URL comes per request below
    for _ in range(count):
        args += ["-o", "/dev/null", proxy.url("/echo", host=host)]
    reply = await curl("-w", "%{http_code}\n", *extra, *args, check=False)
    return reply.body.decode().split()


@pytest.mark.slow
async def test_a_site_over_its_own_rate_gets_429_with_retry_after(
    tmp_path: Path, backend: Backend
) -> None:
    proxy = await start_proxy(
        tmp_path,
        sites_toml((["other.localhost"], [backend.url]), (["localhost"], [backend.url]))
        + "requests_per_second_per_ip = 0.25\nrequest_burst_per_ip = 2\n",
    )
    try:
        # The site's burst allows two requests, then its bucket stays empty (a token every
        # 4 s) for the second protocol's requests.
        assert await statuses(proxy, 3, "--http1.1", host="localhost") == ["200", "200", "429"]
        assert await statuses(proxy, 2, "--http2", host="localhost") == ["429", "429"]
        refused = await curl("--http2", *proxy.curl_args("/echo"), check=False)
        assert refused.status == 429 and refused.header("retry-after") == "4", refused
        # No global rate: the other site answers every request.
        assert await statuses(proxy, 6, "--http2", host="other.localhost") == ["200"] * 6
        assert "client 127.0.0.1 on site localhost: more than 0.25 requests per" in proxy.log()
    finally:
        await proxy.terminate()


async def test_a_shared_site_rate_counts_in_redis_apart_from_the_global_one(
    tmp_path: Path,
) -> None:
    config = parse_config(
        "[limits]\nrequests_per_second_per_ip = 0.1\nrequest_burst_per_ip = 3\n"
        + SITES.format(a="requests_per_second_per_ip = 0.5\nrequest_burst_per_ip = 1"),
        Path("port443.toml"),
    )
    strict, loose = config.sites
    with run_redis(tmp_path / "redis") as server:
        storage = StorageConfig(backend="redis", url=server.url, encryption_key=KEY)
        shared = dataclasses.replace(config.limits, shared_request_rate=True)
        first, second = ClientLimits(shared, storage), ClientLimits(shared, storage)
        client = "192.0.2.1"
        assert await first.check_request(client, strict) is None
        assert await second.check_request(client, strict) == 2  # one token per 2 s, shared
        assert [await second.check_request(client, loose) for _ in range(3)] == [None] * 3
        assert await first.check_request(client, loose) == 10
        assert first.unshared_requests == second.unshared_requests == 0
