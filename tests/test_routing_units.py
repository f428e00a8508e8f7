"""Route matching, balancing policies, the health state machine and the client-identity
chain: pure logic, in-process."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

from proxy.config import HealthConfig, Redirect, Respond, Route
from proxy.config_load import parse_config
from proxy.http.model import Request
from proxy.routing.identity import client_address
from proxy.routing.routes import match_route, redirect_location, rewritten_target, shadowing
from proxy.upstream.balance import Balancer, request_key
from proxy.upstream.health import BackendHealth

OK = Respond()


def request(target: bytes, method: bytes = b"GET", *headers: tuple[bytes, bytes]) -> Request:
    return Request(method, target, b"a.test", list(headers), b"1.1", False, "192.0.2.1")


def test_first_matching_route_wins_at_segment_boundaries() -> None:
    routes = [
        Route(action=OK, path="/health"),
        Route(action=OK, path_prefix="/api", methods=frozenset({b"POST"})),
        Route(action=OK, path_prefix="/api", header=(b"x-canary", b"1")),
        Route(action=OK, path_prefix="/api"),
        Route(action=OK, path_prefix="/"),
    ]
    chosen = {
        (b"/health?x", b"GET"): 0,
        (b"/health/x", b"GET"): 4,
        (b"/api/x", b"POST"): 1,
        (b"/api", b"GET"): 3,
        (b"/apix", b"GET"): 4,
    }
    for (target, method), index in chosen.items():
        assert match_route(routes, request(target, method)) is routes[index], target
    canary = request(b"/api/v", b"GET", (b"x-canary", b"1"))
    assert match_route(routes, canary) is routes[2]
    assert match_route(routes[:1], request(b"/other")) is None


def test_prefix_stripping_rewrite_and_redirect_placeholders() -> None:
    strip = Route(action=OK, path_prefix="/api", strip_prefix=True)
    assert rewritten_target(strip, b"/api/users?id=1") == b"/users?id=1"
    assert rewritten_target(strip, b"/api") == b"/"
    rewrite = Route(action=OK, path_prefix="/old/", rewrite="/v2/")
    assert rewritten_target(rewrite, b"/old/a/b") == b"/v2/a/b"
    redirect = Redirect(target="https://b.test/new{path}?{query}", status=308)
    route = Route(action=redirect, path_prefix="/old")
    assert redirect_location(route, redirect, b"/old/x?q=1") == b"https://b.test/new/old/x?q=1"


def test_shadowed_routes_are_found() -> None:
    routes = [
        Route(action=OK, path_prefix="/api"),
        Route(action=OK, path="/api/users"),  # under /api: shadowed
        Route(action=OK, path_prefix="/", methods=frozenset({b"GET"})),
        Route(action=OK, path_prefix="/static", methods=frozenset({b"GET"})),  # shadowed
        Route(action=OK, path_prefix="/static"),  # POST still reaches it
    ]
    assert shadowing(routes) == [(1, 0), (3, 2)]


def test_check_warns_with_file_and_line(tmp_path: Path) -> None:
    text = (
        '[[sites]]\nhosts = ["a.test"]\n'
        '[[sites.routes]]\npath_prefix = "/"\nrespond = { body = "x" }\n'
        '[[sites.routes]]\npath = "/late"\nredirect = "/x"\n'
    )
    config = parse_config(text, tmp_path / "c.toml")
    assert config.warnings == (
        f"{tmp_path / 'c.toml'}:6: sites[0].routes[1]: never matches: "
        "sites[0].routes[0] above it matches every request it would",
    )


def picks(balancer: Balancer, count: int, busy: list[int] | None = None) -> Counter[int]:
    load = busy or [0, 0, 0]
    return Counter(balancer.pick([0, 1, 2], load, None) for _ in range(count))


def test_round_robin_is_even_and_weighted() -> None:
    assert picks(Balancer("round_robin", "abc", []), 300) == {0: 100, 1: 100, 2: 100}
    assert picks(Balancer("round_robin", "abc", [3, 1, 1]), 500) == {0: 300, 1: 100, 2: 100}


def test_least_conn_and_two_choices_prefer_the_idle_backend() -> None:
    assert picks(Balancer("least_conn", "abc", []), 50, [4, 0, 2]) == {1: 50}
    two = picks(Balancer("random_two", "abc", []), 300, [9, 0, 9])
    assert two[1] > 150 and sum(two.values()) == 300  # chosen whenever it is drawn


def test_consistent_hashing_sticks_and_moves_only_the_lost_keys() -> None:
    balancer = Balancer("consistent_hash", ["http://a", "http://b", "http://c"], [])
    keys = [f"client-{i}".encode() for i in range(300)]
    before = {key: balancer.pick([0, 1, 2], [0, 0, 0], key) for key in keys}
    assert all(balancer.pick([0, 1, 2], [5, 0, 0], key) == before[key] for key in keys)
    assert min(Counter(before.values()).values()) > 50  # spread
    after = {key: balancer.pick([0, 2], [0, 0, 0], key) for key in keys}
    moved = [key for key in keys if after[key] != before[key]]
    assert moved and all(before[key] == 1 for key in moved)


def test_hash_keys_from_header_cookie_and_client() -> None:
    req = request(b"/", b"GET", (b"x-user", b"u1"), (b"cookie", b"a=1; sid=s9"))
    assert request_key("header:X-User", req, "192.0.2.1") == b"u1"
    assert request_key("cookie:sid", req, "192.0.2.1") == b"s9"
    assert request_key("client_ip", req, "192.0.2.1") == b"192.0.2.1"


def test_passive_failures_take_a_backend_out_for_a_cool_down() -> None:
    changes: list[tuple[bool, str]] = []
    health = BackendHealth(
        HealthConfig(max_fails=3, fail_window=10, cooldown=30), lambda *c: changes.append(c)
    )
    health.failed(0.0)
    health.failed(5.0)
    health.failed(11.0)  # the first one left the window
    assert health.available(11.0)
    health.failed(12.0)
    assert not health.available(12.0) and changes[-1][0] is False
    assert health.retry_after(20.0) == 22.0
    assert health.available(42.0) and changes[-1] == (True, "cool-down over")


def test_active_checks_need_fall_failures_and_rise_passes() -> None:
    changes: list[tuple[bool, str]] = []
    health = BackendHealth(HealthConfig(path="/h", rise=2, fall=2), lambda *c: changes.append(c))
    health.checked(False, 1.0, "503")
    health.checked(True, 2.0, "200")
    health.checked(False, 3.0, "503")
    assert health.available(3.0)
    health.checked(False, 4.0, "503")
    assert not health.available(4.0)
    health.checked(True, 5.0, "200")
    assert not health.available(5.0)
    health.checked(True, 6.0, "200")
    assert health.available(6.0) and [up for up, _ in changes] == [False, True]


def test_client_is_the_first_untrusted_hop() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    xff = [(b"x-forwarded-for", b"198.51.100.7, 10.0.0.5")]
    assert client_address("10.0.0.1", xff, trusted) == "198.51.100.7"
    assert client_address("203.0.113.1", xff, trusted) == "203.0.113.1"  # untrusted peer
    forwarded = [(b"forwarded", b'for="[2001:db8::1]:443";proto=https, for=10.1.1.1')]
    assert client_address("10.0.0.1", forwarded, trusted) == "2001:db8::1"
    assert client_address("10.0.0.1", [(b"x-forwarded-for", b"junk")], trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", [], ()) == "10.0.0.1"
