"""On-demand TLS in the running proxy against a real Pebble: a name nobody configured gets its
certificate during its first handshake (curl), a refused name gets an alert and is asked
for once within the cache time, and the order rate limit holds (counted at Pebble).

Pebble's DNS (pebble-challtestsrv) resolves every name to 127.0.0.1, so any customer name
validates by HTTP-01 through the proxy's own listener.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from proxy.certs.store import CertStore
from tests.support.ask import AskEndpoint, serve_ask
from tests.support.backend import Backend
from tests.support.certs import acme_toml, pebble_root, served, wait_served
from tests.support.curl import curl
from tests.support.openssl import Handshake, s_client
from tests.support.pebble import Pebble
from tests.support.proxy import ProxyProcess, start_proxy
from tests.support.workers import start_workers
from tests.test_observability import parse_metrics, sample

pytestmark = pytest.mark.slow

NEW_ORDER = re.compile(r"Added order \"")  # Pebble logs each order it creates (not retries)


@pytest.fixture
async def ask(nursery: trio.Nursery) -> AskEndpoint:
    started: AskEndpoint = await nursery.start(serve_ask, AskEndpoint())
    return started


def on_demand_toml(
    pebble: Pebble, ask: AskEndpoint, backend: Backend, limits: str = "", challenge: str = "http-01"
) -> str:
    """One site taking any name on demand, approved by `ask`; `limits` go in [acme]."""
    body = acme_toml(pebble, challenge) + limits
    return body + (
        f'[[sites]]\non_demand = true\nask = "{ask.url}"\nupstreams = ["{backend.url}"]\n'
    )


async def start_on_demand_proxy(
    tmp_path: Path,
    pebble: Pebble,
    ask: AskEndpoint,
    backend: Backend,
    ports: tuple[int, int],
    limits: str = "",
    challenge: str = "http-01",
) -> ProxyProcess:
    body = on_demand_toml(pebble, ask, backend, limits, challenge)
    return await start_proxy(tmp_path, body, issuer="acme", ports=ports, admin=True)


async def handshake(proxy: ProxyProcess, name: str, root: Path) -> Handshake:
    """One `openssl s_client` handshake for `name`, verifying against `root`."""
    return await s_client(
        proxy.https_port, "-servername", name, "-CAfile", str(root), "-verify_return_error"
    )


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
async def test_an_approved_name_gets_a_certificate_during_its_first_handshake(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
    challenge: str,
) -> None:
    """Also by TLS-ALPN-01: the validator's handshake for the name that is waiting for its
    certificate is answered, not held behind the order it belongs to."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    ask.approved.add("shop.customer.test")
    proxy = await start_on_demand_proxy(
        tmp_path, pebble, ask, backend, proxy_ports, challenge=challenge
    )
    try:
        await proxy.wait_ready()  # an on-demand site has no certificate of its own to wait for
        root = pebble_root(pebble, tmp_path)
        args = proxy.curl_args("/echo", "shop.customer.test", cafile=root)
        async with trio.open_nursery() as nursery:  # two first handshakes at once
            replies = []

            async def get() -> None:
                replies.append(await curl(*args))

            nursery.start_soon(get)
            nursery.start_soon(get)
        assert [json.loads(reply.body)["target"] for reply in replies] == ["/echo"] * 2
        assert (await curl(*args)).status == 200
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert ask.asked == ["shop.customer.test"]
    assert len(NEW_ORDER.findall(pebble_log(tmp_path))) == 1
    stored = CertStore(proxy.certs_dir).load("shop.customer.test")
    assert stored is not None and stored.names == ("shop.customer.test",)
    assert stored.meta["directory"] == pebble.directory
    assert f"from {pebble.directory}, {challenge}" in proxy.log()
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 1
    assert "Traceback" not in proxy.log()


async def test_a_refused_name_gets_an_alert_and_is_asked_for_once(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    proxy = await start_on_demand_proxy(tmp_path, pebble, ask, backend, proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        for _ in range(3):
            refused = await handshake(proxy, "refused.customer.test", root)
            assert "unrecognized name" in refused.output, refused
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert ask.asked == ["refused.customer.test"]
    assert not NEW_ORDER.search(pebble_log(tmp_path))
    assert sample(metrics, "port443_on_demand_total", outcome="refused") == 1


async def test_the_order_rate_limit_holds(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """on_demand_rate = 2: of five approved names asked for at once, two are ordered; the
    others get an alert and are not ordered again within the cache time."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    names = [f"shop{i}.customer.test" for i in range(5)]
    ask.approved.update(names)
    limits = "on_demand_rate = 2\n"
    proxy = await start_on_demand_proxy(tmp_path, pebble, ask, backend, proxy_ports, limits)
    try:
        root = pebble_root(pebble, tmp_path)
        handshakes: dict[str, Handshake] = {}

        async def first(name: str) -> None:
            handshakes[name] = await handshake(proxy, name, root)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(first, name)
        served = [name for name in names if handshakes[name].certificate() is not None]
        refused = [name for name in names if "unrecognized name" in handshakes[name].output]
        assert len(served) == 2 and sorted(served + refused) == names, handshakes
        for name in refused:  # remembered: no new order
            assert "unrecognized name" in (await handshake(proxy, name, root)).output
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert len(NEW_ORDER.findall(pebble_log(tmp_path))) == 2
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 2
    assert sample(metrics, "port443_on_demand_total", outcome="rate_limited") == 3
    assert sorted(ask.asked) == names


async def test_an_on_demand_certificate_is_renewed_without_the_rate_limit(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """A 20 s certificate is renewed at half its lifetime by the sites' renewal loop: not
    asked for again, and not held back by on_demand_rate = 1, spent on the first order."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1], validity_seconds=20)
    ask.approved.add("short.customer.test")
    limits = "on_demand_rate = 1\n"
    proxy = await start_on_demand_proxy(tmp_path, pebble, ask, backend, proxy_ports, limits)
    try:
        root = pebble_root(pebble, tmp_path)
        first = await served(proxy, "short.customer.test", root)
        assert first is not None
        await wait_served(
            proxy,
            "short.customer.test",
            lambda: root,
            until=lambda cert: cert.serial_number != first.serial_number,
        )
        metrics = parse_metrics((await proxy.admin("/metrics")).text)
    finally:
        await proxy.terminate()
    assert ask.asked == ["short.customer.test"]
    assert sample(metrics, "port443_on_demand_total", outcome="ordered") == 1
    assert sample(metrics, "port443_on_demand_total", outcome="rate_limited") == 0
    assert len(NEW_ORDER.findall(pebble_log(tmp_path))) >= 2


async def test_workers_share_an_on_demand_certificate_through_the_store(
    start_pebble: Callable[..., Pebble],
    ask: AskEndpoint,
    backend: Backend,
    proxy_ports: tuple[int, int],
    tmp_path: Path,
) -> None:
    """The worker that met the name first orders; the other asks once and loads it from the
    store: one order, one certificate, whichever worker a client reaches."""
    pebble = start_pebble(http_port=proxy_ports[0], tls_port=proxy_ports[1])
    ask.approved.add("shared.customer.test")
    body = on_demand_toml(pebble, ask, backend)
    proxy = await start_workers(tmp_path, body, issuer="acme", ports=proxy_ports)
    try:
        root = pebble_root(pebble, tmp_path)
        serials = set()
        for _ in range(40):  # until both workers have been asked (the kernel spreads clients)
            cert = await served(proxy, "shared.customer.test", root)
            assert cert is not None
            serials.add(cert.serial_number)
            if len(ask.asked) == 2:
                break
    finally:
        await proxy.terminate()
    assert ask.asked == ["shared.customer.test"] * 2 and len(serials) == 1
    assert len(NEW_ORDER.findall(pebble_log(tmp_path))) == 1


def pebble_log(tmp_path: Path) -> str:
    return (tmp_path / "pebble-0" / "pebble.log").read_text()
