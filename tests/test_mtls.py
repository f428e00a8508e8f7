"""Client certificates (mTLS) through the real proxy process, with curl and openssl as the
clients and certificates made in the test: a site that requires them, one that requests
them for a guarded route, one without; over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.backend import Backend
from tests.support.client_pki import ClientCA, ClientCert
from tests.support.curl import Reply, curl
from tests.support.h3client import h3_client
from tests.support.openssl import s_client
from tests.support.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.slow

PROTOCOLS = (("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2"))
HEADERS = '{ subject = "X-Client-Subject", fingerprint = "X-Client-Cert-SHA256" }'
FORGED = ("-H", "X-Client-Subject: CN=admin", "-H", "x-client-cert-sha256: 00")


class Clients:
    """The site's client CA with a good and a revoked client, and a CA nobody trusts."""

    def __init__(self, directory: Path) -> None:
        self.ca = ClientCA(directory, "trusted")
        self.alice = self.ca.issue("alice", organization="Example, Inc.")
        self.revoked = self.ca.issue("revoked")
        self.crl = self.ca.crl(self.revoked)
        self.stranger = ClientCA(directory, "other").issue("alice", organization="Example, Inc.")


@pytest.fixture
def clients(tmp_path: Path) -> Clients:
    return Clients(tmp_path / "pki")


@pytest.fixture
async def proxy(tmp_path: Path, backend: Backend, clients: Clients) -> AsyncIterator[ProxyProcess]:
    """Overrides conftest's: three sites in front of `backend`."""
    body = f"""
[[sites]]
hosts = ["secure.localhost"]
upstreams = ["{backend.url}"]
client_ca = "{clients.ca.ca}"
client_crl = "{clients.crl}"
client_cert_headers = {HEADERS}

[[sites]]
hosts = ["partial.localhost"]
upstreams = ["{backend.url}"]
client_ca = "{clients.ca.ca}"
client_auth = "request"
client_cert_headers = {HEADERS}
[[sites.routes]]
path_prefix = "/admin"
client_cert = "required"
upstreams = ["{backend.url}"]

[[sites]]
hosts = ["localhost"]
upstreams = ["{backend.url}"]
client_cert_headers = {HEADERS}
"""
    running = await start_proxy(tmp_path, body, http=False, http3=True)
    yield running
    await running.terminate()


async def get(
    proxy: ProxyProcess, host: str, path: str, *extra: str, client: ClientCert | None = None
) -> Reply:
    cert = client.curl_args() if client else []
    return await curl(*cert, *extra, *proxy.curl_args(path, host), check=False)


def fingerprint(client: ClientCert) -> str:
    return hashlib.sha256(client.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def last_fields(backend: Backend) -> list[tuple[str, str]]:
    fields = backend.requests[-1]["fields"]
    assert isinstance(fields, list)
    return [(name, value) for name, value in fields if name.startswith("x-client")]


async def test_require_passes_a_good_certificate_and_names_it_upstream(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    for option, protocol in PROTOCOLS:
        reply = await get(proxy, "secure.localhost", "/echo", option, *FORGED, client=clients.alice)
        assert reply.status == 200 and reply.head[0].startswith(protocol), reply
        assert reply.header("alt-svc") is None  # HTTP/3 would answer this site 421
        # exactly the proxy's fields: the client's copies never reach the upstream
        assert last_fields(backend) == [
            ("x-client-subject", "CN=alice,O=Example\\, Inc."),
            ("x-client-cert-sha256", fingerprint(clients.alice)),
        ]
        assert json.loads(reply.body)["headers"]["x-client-subject"] == "CN=alice,O=Example\\, Inc."


async def test_require_refuses_the_handshake_with_the_right_alert(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    for option, _ in PROTOCOLS:
        for client in (None, clients.stranger, clients.revoked):
            reply = await get(proxy, "secure.localhost", "/echo", option, client=client)
            assert reply.status == 0 and reply.returncode != 0, reply
    assert backend.requests == []
    cases = [
        ("-tls1_3", None, "alert certificate required"),  # 116
        ("-tls1_2", None, "alert handshake failure"),  # 40
        ("-tls1_3", clients.stranger, "alert unknown ca"),  # 48
        ("-tls1_3", clients.revoked, "alert certificate revoked"),  # 44
    ]
    for version, client, alert in cases:
        cert = ["-cert", str(client.cert), "-key", str(client.key)] if client else []
        handshake = await s_client(
            proxy.https_port, "-servername", "secure.localhost", version, *cert, "-ign_eof",
            stdin=b"GET /echo HTTP/1.1\r\nHost: secure.localhost\r\n\r\n",
        )  # fmt: skip
        assert alert in handshake.output and "HTTP/1.1 200" not in handshake.output, handshake
        # the CertificateRequest names the site's CA, so browsers offer only fitting ones
        acceptable = handshake.stdout.partition("Acceptable client certificate CA names")[2]
        assert acceptable.splitlines()[1] == "CN = trusted client CA", handshake
    assert backend.requests == []


async def test_request_guards_a_route_and_strips_forged_fields(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    for option, protocol in PROTOCOLS:
        for client in (None, clients.stranger):  # none, or one that does not verify
            guarded = await get(proxy, "partial.localhost", "/admin", option, client=client)
            assert (guarded.status, guarded.text) == (
                403,
                "Forbidden: a client certificate is needed",
            ), guarded
            open_route = await get(
                proxy, "partial.localhost", "/echo", option, *FORGED, client=client
            )
            assert open_route.status == 200 and open_route.head[0].startswith(protocol)
            assert last_fields(backend) == []
        reply = await get(
            proxy, "partial.localhost", "/admin/x", option, *FORGED, client=clients.alice
        )
        assert reply.status == 200, reply
        assert backend.requests[-1]["target"] == "/admin/x"
        assert last_fields(backend) == [
            ("x-client-subject", "CN=alice,O=Example\\, Inc."),
            ("x-client-cert-sha256", fingerprint(clients.alice)),
        ]


async def test_a_site_without_mtls_still_strips_the_named_fields(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    for option, _ in PROTOCOLS:
        reply = await get(proxy, "localhost", "/echo", option, *FORGED, client=clients.alice)
        assert reply.status == 200, reply
        assert reply.header("alt-svc") == f'h3=":{proxy.https_port}"; ma=86400'
        assert last_fields(backend) == []


async def test_a_connection_for_other_client_auth_gets_421(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    """Connection reuse across names (HTTP/2 coalescing), as a client would do it: the TLS
    handshake for one name (SNI), the request for another (Host, :authority)."""
    pairs = [
        ("secure.localhost", "localhost"),  # from a verified connection to a plain site
        ("localhost", "secure.localhost"),  # from a plain connection to an mTLS site
        ("partial.localhost", "secure.localhost"),  # request vs require
        ("secure.localhost", "partial.localhost"),
    ]
    for option, protocol in PROTOCOLS:
        for sni, host in pairs:
            reply = await get(
                proxy, sni, "/echo", option, "-H", f"Host: {host}", client=clients.alice
            )
            assert reply.status == 421 and reply.head[0].startswith(protocol), (sni, host, reply)
        same = await get(  # same settings: served as usual
            proxy, "secure.localhost", "/echo", option, "-H", "Host: secure.localhost",
            client=clients.alice,
        )  # fmt: skip
        assert same.status == 200
    assert all(request["target"] == "/echo" for request in backend.requests)
    assert len(backend.requests) == len(PROTOCOLS)


async def test_http3_carries_no_client_certificate_so_mtls_sites_answer_421(
    proxy: ProxyProcess, backend: Backend
) -> None:
    forged = [(b"x-client-subject", b"CN=admin")]
    for host, status in (("secure.localhost", 421), ("partial.localhost", 421), ("localhost", 200)):
        authority = f"{host}:{proxy.https_port}".encode()
        async with h3_client(proxy.https_port, host, proxy.root_ca) as client:
            response = await client.request(b"GET", b"/echo", authority, headers=forged)
        assert response.status == status, host
    assert len(backend.requests) == 1 and last_fields(backend) == []


async def test_a_new_crl_takes_effect_on_reload(
    proxy: ProxyProcess, backend: Backend, clients: Clients
) -> None:
    assert (await get(proxy, "secure.localhost", "/echo", client=clients.alice)).status == 200
    clients.ca.crl(clients.revoked, clients.alice)  # rewrites the site's client_crl
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_log("reloaded")
    refused = await get(proxy, "secure.localhost", "/echo", client=clients.alice)
    assert refused.status == 0 and refused.returncode != 0, refused
    assert len(backend.requests) == 1
