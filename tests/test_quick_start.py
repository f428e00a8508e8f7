"""`port443 proxy --from HOST --to BACKEND`: one site without a config file, built by the same
reader as a file (so the same defaults and checks), problems naming the flag at fault; and the
real command serving through the local CA to real backends."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import trio

from proxy.config_load import ConfigError
from proxy.config_load.flags import QuickStart, is_local_name, quick_start_config, split_origin
from tests.support.backend import Backend, serve_backend
from tests.support.curl import curl
from tests.support.net import free_ports
from tests.support.proxy import launch_proxy
from tests.support.run import port443


def problems(**flags: object) -> list[str]:
    options: dict[str, object] = {"origin": "localhost", "backends": ("127.0.0.1:8000",)}
    with pytest.raises(ConfigError) as error:
        quick_start_config(QuickStart(**(options | flags)))
    return error.value.problems


@pytest.mark.parametrize(
    ("origin", "split"),
    [
        ("example.com", ("example.com", None)),
        ("localhost:8443", ("localhost", 8443)),
        ("https://example.com/", ("example.com", None)),
        ("HTTPS://example.com:8443", ("example.com", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
    ],
)
def test_from_takes_a_host_an_optional_port_and_https(
    origin: str, split: tuple[str, int | None]
) -> None:
    assert split_origin(origin) == split


@pytest.mark.parametrize(
    ("origin", "why"),
    [
        ("http://example.com", "port443 serves HTTPS"),
        ("example.com/app", "nothing more"),
        ("example.com:", "followed by a port"),
        (":8443", "needs a host name"),
        ("example.com:https", "not a number"),
        ("[::1", "an IPv6 address"),
    ],
)
def test_from_refuses_what_it_cannot_serve(origin: str, why: str) -> None:
    with pytest.raises(ConfigError) as error:
        split_origin(origin)
    (problem,) = error.value.problems
    assert problem.startswith(f"--from {origin}: ") and why in problem


def test_the_flags_are_a_config_with_the_file_defaults() -> None:
    config = quick_start_config(
        QuickStart(origin="example.com", backends=("127.0.0.1:8000", "h2c://10.0.0.2:9000"))
    )
    (site,) = config.sites
    assert site.hosts == ("example.com",) and config.issuer_of(site) == "acme"
    assert [u.url for u in site.upstreams] == ["http://127.0.0.1:8000", "h2c://10.0.0.2:9000"]
    assert (config.listen.https, config.listen.http) == (443, 80)
    assert config.listen.addresses == ("0.0.0.0",) and not config.admin.enabled
    assert site.own_group.retries == 2  # a group's defaults, as in a file
    local = quick_start_config(
        QuickStart(origin="localhost:8443", backends=("localhost:8000",), http_port=0)
    )
    assert local.issuer_of(local.sites[0]) == "local"
    assert (local.listen.https, local.listen.http) == (8443, 0)
    forced = quick_start_config(
        QuickStart(origin="example.com", backends=("x:1",), internal_certs=True)
    )
    assert forced.issuer_of(forced.sites[0]) == "local"


def test_local_names_get_the_local_ca() -> None:
    assert all(map(is_local_name, ["localhost", "app.localhost", "nas.local", "127.0.0.1", "::1"]))
    assert not any(map(is_local_name, ["example.com", "localhost.example.com"]))


def test_problems_name_the_flag_they_came_from() -> None:
    assert problems(backends=("127.0.0.1:8000", "ftp://x")) == [
        '--to ftp://x: scheme must be http, h2c or https, got "ftp://x"'
    ]
    assert problems(origin="localhost:8443", https_port=9443) == [
        "--from localhost:8443 and --https-port 9443 name different ports"
    ]
    assert problems(https_port=70000) == [
        "--https-port 70000: must be an integer port 1-65535, got 70000"
    ]
    assert problems(http_port=443) == [
        "--http-port 443: must differ from listen.https (both are 443)"
    ]
    assert problems(origin="bad_name!") == [
        '--from bad_name!: host "bad_name!" is not a valid DNS name or IP address'
    ]


def test_the_command_reports_bad_flags_and_exits_1() -> None:
    result = port443("proxy", "--from", "localhost", "--to", "127.0.0.1:0")
    assert result.returncode == 1
    assert "--to 127.0.0.1:0: port must be 1-65535" in result.stderr


@pytest.mark.slow
async def test_the_command_serves_through_the_local_ca(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two --to backends are one group: requests spread over both, HTTP redirects to HTTPS."""
    backends = [await nursery.start(serve_backend, Backend()) for _ in range(2)]
    http_port, https_port = free_ports(2)
    argv = [
        "-m", "proxy", "proxy", "--from", f"localhost:{https_port}",
        "--to", f"127.0.0.1:{backends[0].port}", "--to", backends[1].url,
        "--http-port", str(http_port), "--address", "127.0.0.1",
        "--certs-dir", str(tmp_path / "certs"),
    ]  # fmt: skip
    proxy = await launch_proxy(tmp_path, argv, http_port=http_port, https_port=https_port)
    try:
        for _ in range(4):
            reply = await curl(*proxy.curl_args("/echo"))
            assert reply.status == 200 and json.loads(reply.body)["target"] == "/echo"
        assert Counter(len(b.requests) for b in backends) == {2: 2}
        redirect = await curl(f"http://127.0.0.1:{http_port}/echo", "-H", "Host: localhost")
        assert redirect.status == 308
        assert redirect.header("location") == f"https://localhost:{https_port}/echo"
    finally:
        assert await proxy.terminate() == 0
