"""On-demand TLS without a CA: the refusal cache, the order limiter, one flight per name, the
ask endpoint over a real socket, the config, and the certificate manager giving a name its
certificate during its first real TLS handshake (local CA standing in for ACME).
Against Pebble: tests/test_on_demand_pebble.py."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.certs.issuers import Issued, Issuer, IssueRequest, LocalIssuer
from proxy.certs.local_ca import LocalCA
from proxy.certs.manager import CertManager
from proxy.certs.on_demand import (
    RATE_WINDOW,
    OnDemand,
    OrderLimiter,
    RateLimited,
    Refusals,
    ask_endpoint,
)
from proxy.certs.report import certificate_reports
from proxy.certs.store import CertStore
from proxy.config import AcmeConfig, Config, SiteConfig
from proxy.config_load import load_config
from tests.support.ask import AskEndpoint
from tests.support.net import free_port
from tests.support.run import port443
from tests.test_cert_manager import (
    ALPN,
    assert_refused,
    make_config,
    peer_certificate,
    root_pem,
    running,
    site_config,
)
from tests.test_config import problems, write

ASK = "http://127.0.0.1:9/check"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def on_demand_site(*hosts: str, ask: str = ASK) -> SiteConfig:
    return SiteConfig(hosts=hosts, upstreams=(), on_demand=True, ask=ask)


def config_with(tmp_path: Path, *sites: SiteConfig, **limits: Any) -> Config:
    """The sites with issuer acme and `limits` as [acme] on_demand_* settings."""
    config = make_config(tmp_path, *sites, issuer="acme")
    return dataclasses.replace(config, acme=AcmeConfig(**limits))


# -- the refusal cache and the order limiter ------------------------------------------------


def test_a_refusal_lasts_its_ttl_and_is_renewed_when_added_again() -> None:
    clock = FakeClock()
    refusals = Refusals(600, clock=clock)
    refusals.add("a.test")
    clock.now += 599
    assert refusals.refused("a.test") and not refusals.refused("b.test")
    refusals.add("b.test")
    clock.now += 1
    assert not refusals.refused("a.test") and refusals.refused("b.test")
    refusals.add("a.test")
    clock.now += 599
    assert refusals.refused("a.test") and not refusals.refused("b.test")


def test_refusals_are_bounded_and_expired_ones_dropped() -> None:
    clock = FakeClock()
    refusals = Refusals(10, limit=3, clock=clock)
    for name in ("a.test", "b.test", "c.test", "d.test"):
        refusals.add(name)
        clock.now += 1
    assert len(refusals) == 3
    assert not refusals.refused("a.test")  # the oldest made room
    assert all(refusals.refused(name) for name in ("b.test", "c.test", "d.test"))
    clock.now += 10
    refusals.add("e.test")  # every other one has expired: dropped
    assert len(refusals) == 1


def test_the_order_limiter_allows_rate_orders_in_any_window() -> None:
    clock = FakeClock()
    limiter = OrderLimiter(2, clock=clock)
    assert limiter.take() and limiter.take() and not limiter.take()
    clock.now += RATE_WINDOW - 1
    assert not limiter.take()  # the window slides, it does not restart
    clock.now += 1
    assert limiter.take() and limiter.take() and not limiter.take()


# -- one flight per name ---------------------------------------------------------------


class Flights:
    """An ask and an obtain that count their calls and take `delay` seconds."""

    def __init__(self, approved: set[str], *, obtained: bool = True, delay: float = 0.1) -> None:
        self.approved = approved
        self.obtained = obtained
        self.delay = delay
        self.asked: list[str] = []
        self.orders: list[tuple[str, ...]] = []

    async def ask(self, url: str, name: str) -> bool:
        assert url == ASK
        self.asked.append(name)
        await trio.sleep(self.delay)
        return name in self.approved

    async def obtain(self, site: SiteConfig) -> bool:
        assert site.on_demand
        self.orders.append(site.hosts)
        await trio.sleep(self.delay)
        return self.obtained


def make_on_demand(
    tmp_path: Path,
    flights: Flights,
    *sites: SiteConfig,
    clock: FakeClock | None = None,
    **limits: Any,
) -> OnDemand:
    config = config_with(tmp_path, *(sites or (on_demand_site(),)), **limits)
    return OnDemand(config, flights.obtain, ask=flights.ask, clock=clock)


async def test_concurrent_handshakes_for_a_name_share_one_ask_and_one_order(
    tmp_path: Path,
) -> None:
    flights = Flights({"shop.example"})
    on_demand = make_on_demand(tmp_path, flights)
    results: list[bool] = []

    async def handshake() -> None:
        results.append(await on_demand.admit("Shop.Example"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(handshake)
    assert results == [True] * 5
    assert flights.asked == ["shop.example"] and flights.orders == [("shop.example",)]
    assert await on_demand.admit("shop.example") and len(flights.asked) == 1


async def test_a_refused_name_is_not_asked_again_within_the_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    flights = Flights(set(), delay=0)
    on_demand = make_on_demand(tmp_path, flights, clock=clock, on_demand_refusal_ttl=60)
    assert not await on_demand.admit("no.example")
    clock.now += 59
    assert not await on_demand.admit("no.example")
    assert flights.asked == ["no.example"] and flights.orders == []
    clock.now += 1
    assert not await on_demand.admit("no.example")
    assert flights.asked == ["no.example"] * 2
    assert on_demand.counts == {"ordered": 0, "refused": 2, "rate_limited": 0}


async def test_a_failed_order_is_not_repeated_within_the_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    flights = Flights({"a.example"}, obtained=False, delay=0)
    on_demand = make_on_demand(tmp_path, flights, clock=clock)
    assert not await on_demand.admit("a.example")
    assert not await on_demand.admit("a.example")
    assert flights.orders == [("a.example",)] and flights.asked == ["a.example"]
    clock.now += AcmeConfig().on_demand_refusal_ttl
    flights.obtained = True
    assert await on_demand.admit("a.example")
    assert len(flights.orders) == 2


async def test_only_names_an_on_demand_site_takes_are_asked_for(tmp_path: Path) -> None:
    flights = Flights({"a.shops.example", "x.y.shops.example"}, delay=0)
    sites = (on_demand_site("*.shops.example"), site_config("static.example"))
    on_demand = make_on_demand(tmp_path, flights, *sites)
    assert await on_demand.admit("static.example")  # another site's: the usual rules
    assert await on_demand.admit("elsewhere.example")  # nobody's: refused by those rules
    assert await on_demand.admit("x.y.shops.example")  # nobody's too: a wildcard is one label
    assert await on_demand.admit("a.shops.example")
    assert flights.asked == ["a.shops.example"]


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "a..example", "-a.example", "a_b.ex"])
async def test_what_is_not_a_dns_name_is_refused_without_asking(tmp_path: Path, name: str) -> None:
    flights = Flights({name}, delay=0)
    on_demand = make_on_demand(tmp_path, flights)
    assert not await on_demand.admit(name)
    assert flights.asked == []


async def test_the_name_cap_refuses_new_names_once_reached(tmp_path: Path) -> None:
    flights = Flights({"a.example", "b.example"}, delay=0)
    on_demand = make_on_demand(tmp_path, flights, on_demand_max_names=1)
    assert await on_demand.admit("a.example")
    assert not await on_demand.admit("b.example")
    assert not await on_demand.admit("b.example")  # remembered, not asked again
    assert flights.orders == [("a.example",)] and flights.asked == ["a.example", "b.example"]
    assert on_demand.counts["rate_limited"] == 1


def test_first_orders_beyond_the_rate_raise(tmp_path: Path) -> None:
    clock = FakeClock()
    on_demand = make_on_demand(tmp_path, Flights(set()), clock=clock, on_demand_rate=2)
    on_demand.count_order()
    on_demand.count_order()
    with pytest.raises(RateLimited, match="limited to 2 per minute"):
        on_demand.count_order()
    clock.now += RATE_WINDOW
    on_demand.count_order()
    assert on_demand.counts == {"ordered": 3, "refused": 0, "rate_limited": 1}


# -- the ask endpoint over HTTP ------------------------------------------------------------


async def test_ask_endpoint_approves_on_200_only(ask: AskEndpoint) -> None:
    ask.approved.add("yes.example")
    assert await ask_endpoint(ask.url, "yes.example")
    assert not await ask_endpoint(ask.url, "no.example")
    assert not await ask_endpoint(ask.url + "?key=v", "no.example")
    assert ask.asked == ["yes.example", "no.example", "no.example"]


async def test_an_unreachable_ask_endpoint_refuses(caplog: pytest.LogCaptureFixture) -> None:
    assert not await ask_endpoint(f"http://127.0.0.1:{free_port()}/check", "a.example")
    assert "on-demand: refusing a.example: ask http://127.0.0.1:" in caplog.text


# -- config ----------------------------------------------------------------------------

ACME_SITE = '[certs]\nissuer = "acme"\n[[sites]]\nupstreams = ["http://127.0.0.1:1"]\n'


def test_on_demand_config(tmp_path: Path) -> None:
    text = (
        '[certs]\nissuer = "acme"\n[acme]\non_demand_rate = 3\non_demand_max_names = 7\n'
        "on_demand_refusal_ttl = 30\n"
        f'[[sites]]\nhosts = ["static.example"]\nupstreams = ["http://127.0.0.1:1"]\n'
        f'[[sites]]\non_demand = true\nask = "{ASK}?k=v"\nupstreams = ["http://127.0.0.1:2"]\n'
        f'[[sites]]\nhosts = ["*.shops.example"]\non_demand = true\nask = "{ASK}"\n'
        'upstreams = ["http://127.0.0.1:3"]\n'
    )
    config = load_config(write(tmp_path, text))
    static, any_name, shops = config.sites
    assert (config.acme.on_demand_rate, config.acme.on_demand_max_names) == (3, 7)
    assert config.acme.on_demand_refusal_ttl == 30.0
    assert any_name.on_demand and any_name.hosts == () and any_name.name == "*"
    assert any_name.ask == ASK + "?k=v" and not static.on_demand and static.ask is None
    assert config.site_for_host("static.example") is static
    assert config.site_for_host("a.shops.example") is shops
    assert config.site_for_host("customer.example") is any_name


def test_on_demand_config_problems(tmp_path: Path) -> None:
    assert problems(tmp_path, ACME_SITE + "on_demand = true\n") == [
        "5: sites[0].on_demand: needs ask: the URL approving each name "
        "(GET ?domain=<name>, 200 = yes)"
    ]
    assert problems(tmp_path, ACME_SITE + f'hosts = ["a.example"]\nask = "{ASK}"\n') == [
        "6: sites[0].ask: is only used with on_demand = true"
    ]
    local = ACME_SITE + f'on_demand = true\nask = "{ASK}"\nissuer = "local"\n'
    assert problems(tmp_path, local) == ['5: sites[0].on_demand: needs issuer "acme", not "local"']
    two = ACME_SITE + f'on_demand = true\nask = "{ASK}"\n'
    two += two.partition("\n")[2].partition("\n")[2]
    assert problems(tmp_path, two) == ["7: sites[1]: sites[0] already takes any name on demand"]
    ip = ACME_SITE + f'on_demand = true\nask = "{ASK}"\nhosts = ["192.0.2.1"]\n'
    assert problems(tmp_path, ip) == [
        "7: sites[0].hosts[0]: on-demand sites take DNS names, not IP addresses"
    ]
    bad = ACME_SITE + 'on_demand = true\nask = "ftp://x/"\n'
    assert problems(tmp_path, bad) == [
        '6: sites[0].ask: must be an http:// or https:// URL without "#", got "ftp://x/"'
    ]


def test_an_on_demand_site_is_reported_by_the_names_it_obtained(tmp_path: Path) -> None:
    config = config_with(tmp_path, on_demand_site("*.shops.example"), site_config("a.example"))
    assert [report.site for report in certificate_reports(config)] == ["a.example"]
    store = CertStore(config.certs.dir)
    ca = LocalCA(tmp_path / "ca")
    for name in ("b.shops.example", "a.example", "elsewhere.example"):  # the last: no site
        store.write(name, *ca.issue([name]), {"issuer": "acme"})
    reports = certificate_reports(config)
    assert [(report.site, report.names) for report in reports] == [
        ("a.example", ("a.example",)),
        ("b.shops.example", ("b.shops.example",)),
    ]
    assert all(report.not_after is not None for report in reports)


def test_check_refuses_on_demand_without_ask(tmp_path: Path) -> None:
    path = write(tmp_path, ACME_SITE + 'hosts = ["*.shops.example"]\non_demand = true\n')
    result = port443("check", "-c", str(path))
    assert result.returncode == 1
    assert f"{path}:6: sites[0].on_demand: needs ask" in result.stderr


# -- the manager: a certificate during the first handshake --------------------------------


class CountingIssuer(LocalIssuer):
    """The local CA, counting its orders by name; an order waits for `gate` to open."""

    def __init__(self, ca: LocalCA) -> None:
        super().__init__(ca)
        self.gate = trio.Event()
        self.gate.set()
        self.orders: list[str] = []

    async def issue(self, request: IssueRequest) -> Issued:
        self.orders.extend(request.site.hosts)
        await self.gate.wait()
        return await super().issue(request)


@pytest.fixture
async def on_demand_manager(
    tmp_path: Path, ask: AskEndpoint
) -> AsyncIterator[tuple[CertManager, CountingIssuer, int]]:
    config = config_with(
        tmp_path,
        on_demand_site("*.shops.example", ask=ask.url),
        site_config("static.example"),
        on_demand_rate=2,
    )
    config = dataclasses.replace(
        config, tls=dataclasses.replace(config.tls, default_site="static.example")
    )
    issuer = CountingIssuer(LocalCA(config.certs.dir))
    ask.approved |= {"a.shops.example", "b.shops.example", "c.shops.example"}
    manager = CertManager(config, ALPN, issuer=issuer)
    async with running(manager) as port:
        issuer.orders.clear()  # the static site's
        yield manager, issuer, port


async def test_an_approved_name_gets_its_certificate_during_its_first_handshake(
    tmp_path: Path, ask: AskEndpoint, on_demand_manager: tuple[CertManager, Issuer, int]
) -> None:
    manager, issuer, port = on_demand_manager
    assert isinstance(issuer, CountingIssuer)
    root = root_pem(manager._config)
    leaves = []

    async def handshake() -> None:
        leaves.append(await peer_certificate(port, "a.shops.example", root))

    issuer.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(handshake)
        with trio.fail_after(10):
            while not issuer.orders:
                await trio.sleep(0.01)
        await peer_certificate(port, "static.example", root)  # served while the order waits
        assert leaves == []
        issuer.gate.set()
    assert len({leaf.serial_number for leaf in leaves}) == 1 and len(leaves) == 3
    assert issuer.orders == ["a.shops.example"] and ask.asked == ["a.shops.example"]
    stored = CertStore(manager._config.certs.dir).load("a.shops.example")
    assert stored is not None and stored.serial == leaves[0].serial_number
    assert stored.names == ("a.shops.example",)


async def test_refused_and_rate_limited_names_get_an_alert_even_with_a_default_site(
    tmp_path: Path, ask: AskEndpoint, on_demand_manager: tuple[CertManager, Issuer, int]
) -> None:
    manager, issuer, port = on_demand_manager
    assert isinstance(issuer, CountingIssuer)
    root = root_pem(manager._config)
    await assert_refused(port, "refused.shops.example", root)
    await assert_refused(port, "refused.shops.example", root)
    assert ask.asked == ["refused.shops.example"]
    for name in ("a.shops.example", "b.shops.example"):  # on_demand_rate = 2
        await peer_certificate(port, name, root)
    await assert_refused(port, "c.shops.example", root)
    await assert_refused(port, "c.shops.example", root)
    assert issuer.orders == ["a.shops.example", "b.shops.example"]
    assert manager.on_demand is not None
    assert manager.on_demand.counts == {"ordered": 2, "refused": 1, "rate_limited": 1}
    assert manager.renewal_failures == {"c.shops.example": 1}
