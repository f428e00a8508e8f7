"""TLS as the running proxy serves it: SNI picks the site's certificate, the Mozilla
intermediate policy holds (sslyze), old protocols and unknown names are refused."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.backend import Backend
from tests.support.openssl import s_client
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy
from tests.support.run import ROOT, run
from tests.support.tls import client_context

pytestmark = pytest.mark.slow

SSLYZE = ROOT / ".venv-sslyze" / "bin" / "python"


@pytest.fixture
async def two_sites(tmp_path: Path, backend: Backend) -> AsyncIterator[ProxyProcess]:
    body = sites_toml((["a.test", "www.a.test"], [backend.url]), (["b.test"], [backend.url]))
    running = await start_proxy(tmp_path, body, http=False)
    yield running
    await running.terminate()


def _peer_names(proxy: ProxyProcess, server_name: str) -> list[str]:
    with (
        socket.create_connection(("127.0.0.1", proxy.https_port), timeout=10) as raw,
        client_context(proxy).wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        cert = tls.getpeercert()
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


@pytest.mark.parametrize(
    ("server_name", "names"),
    [
        ("a.test", ["a.test", "www.a.test"]),
        ("www.a.test", ["a.test", "www.a.test"]),
        ("b.test", ["b.test"]),
    ],
)
async def test_sni_selects_the_site_certificate(
    two_sites: ProxyProcess, server_name: str, names: list[str]
) -> None:
    assert _peer_names(two_sites, server_name) == names


@pytest.mark.parametrize("sni", [["-servername", "unknown.test"], ["-noservername"]])
async def test_unknown_name_gets_unrecognized_name_alert(
    two_sites: ProxyProcess, sni: list[str]
) -> None:
    hs = await s_client(two_sites.https_port, *sni)
    assert not hs.ok
    assert "unrecognized name" in hs.output, hs


@pytest.mark.parametrize(
    ("args", "accepted"),
    [
        (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], False),
        (["-tls1_2", "-cipher", "AES128-SHA"], False),  # RSA key exchange, CBC
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], True),
        (["-tls1_3"], True),
    ],
)
async def test_protocol_policy_on_the_proxy(
    two_sites: ProxyProcess, args: list[str], accepted: bool
) -> None:
    hs = await s_client(two_sites.https_port, "-servername", "a.test", *args)
    assert hs.ok is accepted, hs


async def test_alpn_http11(two_sites: ProxyProcess) -> None:
    hs = await s_client(two_sites.https_port, "-servername", "a.test", "-alpn", "http/1.1")
    assert "ALPN protocol: http/1.1" in hs.output, hs


async def test_sslyze_mozilla_intermediate_compliance(two_sites: ProxyProcess) -> None:
    assert SSLYZE.exists(), "sslyze venv missing: `make test` creates .venv-sslyze"
    result = await run(
        str(SSLYZE), "-m", "sslyze", "--mozilla_config=intermediate",
        "--certinfo_ca_file", str(two_sites.root_ca),
        f"a.test:{two_sites.https_port}{{127.0.0.1}}", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:].decode(errors="replace")
    assert b"OK - Compliant" in result.stdout
