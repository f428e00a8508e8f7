"""The ACME client alone against a real Pebble that validates through real listeners.

A minimal pair of listeners lives here: HTTP answering from `http01_key_authorization`
and TLS answering from `TlsAlpn01Contexts`, both reading what the client published under
`certs/`. tests/test_acme_proxy.py does the same through the proxy's own listeners.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from proxy.certs.acme import AcmeClient, AcmeError, ExternalAccountBinding, IssuedCertificate
from proxy.certs.acme_challenges import (
    ACME_TLS_ALPN,
    HTTP01_PATH_PREFIX,
    TlsAlpn01Contexts,
    http01_key_authorization,
    write_http01,
    write_tls_alpn01,
)
from tests.support.net import free_port
from tests.support.pebble import Pebble
from tests.support.tiny_http import Reply, serve_http

EAB_KID, EAB_HMAC = "kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


@dataclass
class Responder:
    """Answers Pebble's validation requests from the files the ACME client publishes."""

    certs_dir: Path
    http_port: int = 0
    tls_port: int = 0
    wrong_key_authorization: bool = False
    http_requests: int = 0
    tls_handshakes: int = 0
    served: list[str] = field(default_factory=list)

    async def answer_http(self, request: h11.Request, body: bytes) -> Reply:
        self.http_requests += 1
        target = request.target.decode()
        key_authorization = None
        if target.startswith(HTTP01_PATH_PREFIX):
            token = target[len(HTTP01_PATH_PREFIX) :]
            key_authorization = http01_key_authorization(self.certs_dir, token)
        if key_authorization is None:
            return 404, [("Content-Type", "text/plain")], b""
        if self.wrong_key_authorization:
            key_authorization = key_authorization.split(b".")[0] + b".not-the-account-thumbprint"
        return 200, [("Content-Type", "text/plain")], key_authorization

    async def serve_tls(self, stream: trio.SocketStream) -> None:
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.set_alpn_protocols([ACME_TLS_ALPN])
        base.sni_callback = self._pick_context
        tls = trio.SSLStream(stream, base, server_side=True)
        try:
            await tls.do_handshake()
            self.tls_handshakes += 1
            await tls.aclose()
        except trio.BrokenResourceError:
            await stream.aclose()

    def _pick_context(self, sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
        context = TlsAlpn01Contexts(self.certs_dir).context_for(name or "")
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sock.context = context
        self.served.append(name or "")
        return None


@pytest.fixture
async def responder(nursery: trio.Nursery, tmp_path: Path) -> Responder:
    responder = Responder(tmp_path / "certs")
    responder.http_port = await nursery.start(serve_http, responder.answer_http)
    tls = await trio.open_tcp_listeners(0, host="127.0.0.1")
    responder.tls_port = _port(tls)
    nursery.start_soon(trio.serve_listeners, responder.serve_tls, tls)
    return responder


@pytest.fixture
def pebble(start_pebble: Callable[..., Pebble], responder: Responder) -> Pebble:
    return start_pebble(http_port=responder.http_port, tls_port=responder.tls_port)


def _port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])


def _client(responder: Responder, pebble: Pebble, **options: Any) -> AcmeClient:
    return AcmeClient(
        responder.certs_dir,
        pebble.directory,
        email="admin@example.com",
        ca_bundle=pebble.ca_bundle,
        **options,
    )


async def _handshake_as(
    issued: IssuedCertificate, root_pem: bytes, name: str, tmp_path: Path
) -> dict[str, object]:
    """Serve `issued` over real TLS and connect trusting only `root_pem`; the peer cert."""
    chain, key = tmp_path / "served-chain.pem", tmp_path / "served-key.pem"
    chain.write_bytes(issued.fullchain_pem)
    key.write_bytes(issued.key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(chain, key)
    client_ctx = ssl.create_default_context(cadata=root_pem.decode())

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls.do_handshake()
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        tcp = await trio.open_tcp_stream("127.0.0.1", _port(listeners))
        tls = trio.SSLStream(tcp, client_ctx, server_hostname=name)
        await tls.do_handshake()  # raises unless the chain verifies for `name`
        peer = tls.getpeercert()
        await tls.aclose()
        nursery.cancel_scope.cancel()
    assert peer is not None
    return dict(peer)


def _published(responder: Responder) -> list[Path]:
    return [p for p in (responder.certs_dir / ".challenges").rglob("*") if p.is_file()]


@pytest.mark.slow
async def test_issue_via_http01(responder: Responder, pebble: Pebble, tmp_path: Path) -> None:
    names = ["http.example.com", "www.http.example.com"]
    client = _client(responder, pebble, challenges=("http-01",))
    issued = await client.issue(names)
    for name in names:
        await _handshake_as(issued, pebble.root_pem, name, tmp_path)
    assert isinstance(load_pem_private_key(issued.key_pem, None), ec.EllipticCurvePrivateKey)
    assert responder.http_requests >= 2 and responder.tls_handshakes == 0
    assert _published(responder) == []


@pytest.mark.slow
async def test_issue_via_tls_alpn01(responder: Responder, pebble: Pebble, tmp_path: Path) -> None:
    names = ["alpn.example.com", "www.alpn.example.com"]
    client = _client(responder, pebble, challenges=("tls-alpn-01",))
    issued = await client.issue(names)
    for name in names:
        await _handshake_as(issued, pebble.root_pem, name, tmp_path)
    assert responder.http_requests == 0
    assert set(responder.served) == set(names)
    assert _published(responder) == []


@pytest.mark.slow
async def test_account_is_created_once_and_reused(responder: Responder, pebble: Pebble) -> None:
    first = _client(responder, pebble)
    await first.issue(["one.example.com"])
    account = first.account_path.read_bytes()
    assert os.stat(first.account_path).st_mode & 0o777 == 0o600

    second = _client(responder, pebble)  # as after a restart: a new client, the same certs/
    await second.issue(["two.example.com"])
    assert await second.account_uri() == await first.account_uri()
    assert second.account_path.read_bytes() == account


@pytest.mark.slow
async def test_invalid_authorization_is_reported(responder: Responder, pebble: Pebble) -> None:
    responder.wrong_key_authorization = True
    client = _client(responder, pebble, challenges=("http-01",))
    with pytest.raises(AcmeError) as failure:
        await client.issue(["wrong.example.com"])
    message = str(failure.value)
    assert "wrong.example.com" in message and "http-01" in message
    assert "urn:ietf:params:acme:error:unauthorized" in message
    assert "not-the-account-thumbprint" in message  # Pebble's detail quotes what it got
    assert _published(responder) == []


@pytest.mark.slow
async def test_nonce_rejections_are_survived(
    start_pebble: Callable[..., Pebble], responder: Responder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.certs.acme")
    pebble = start_pebble(
        http_port=responder.http_port,
        tls_port=responder.tls_port,
        env={"PEBBLE_WFE_NONCEREJECT": "35"},
    )
    client = _client(responder, pebble)
    await client.issue(["nonce.example.com"])
    issued = await client.issue(["nonce-rsa.example.com"], key_type="rsa-2048")
    assert isinstance(load_pem_private_key(issued.key_pem, None), rsa.RSAPrivateKey)
    assert any("badNonce" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_external_account_binding(
    start_pebble: Callable[..., Pebble], responder: Responder
) -> None:
    pebble = start_pebble(
        http_port=responder.http_port, tls_port=responder.tls_port, eab_keys={EAB_KID: EAB_HMAC}
    )
    with pytest.raises(AcmeError, match="external account binding"):
        await _client(responder, pebble).issue(["eab.example.com"])
    eab = ExternalAccountBinding(EAB_KID, EAB_HMAC)
    await _client(responder, pebble, eab=eab).issue(["eab.example.com"])


async def test_unreachable_ca_is_retried_then_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = AcmeClient(tmp_path, f"https://127.0.0.1:{free_port()}/dir")
    with pytest.raises(AcmeError, match=r"down\.example\.com: ConnectionError"):
        await client.issue(["down.example.com"])
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_tls_alpn01_certificate_carries_the_key_authorization(tmp_path: Path) -> None:
    path = write_tls_alpn01(tmp_path, "Name.Example.com", "token.thumbprint")
    assert path.name == "name.example.com.pem" and path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    assert ext.critical
    assert ext.value.public_bytes() == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["name.example.com"]


def test_tls_alpn01_answer_for_an_ip_address_is_found_by_its_reverse_name(
    tmp_path: Path,
) -> None:
    """RFC 8738 section 6: the validator sends the reverse-DNS name as SNI; the certificate
    names the address itself."""
    for address, reverse in [
        ("127.0.0.1", "1.0.0.127.in-addr.arpa"),
        ("::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"),
    ]:
        path = write_tls_alpn01(tmp_path, address, "token.thumbprint")
        assert path.name == f"{reverse}.pem"
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [address]
        assert san.get_values_for_type(x509.DNSName) == []
        assert TlsAlpn01Contexts(tmp_path).context_for(reverse.upper()) is not None


def test_tls_alpn01_context_follows_the_file(tmp_path: Path) -> None:
    contexts = TlsAlpn01Contexts(tmp_path)
    path = write_tls_alpn01(tmp_path, "a.example.com", "t.k")
    first = contexts.context_for("A.example.com")
    assert first is not None and contexts.context_for("a.example.com") is first
    write_tls_alpn01(tmp_path, "a.example.com", "t2.k")
    assert contexts.context_for("a.example.com") not in (None, first)
    path.unlink()
    assert contexts.context_for("a.example.com") is None
    for hostile in ("../a.example.com", "a.example.com/x", "", "a..example.com"):
        assert contexts.context_for(hostile) is None


def test_http01_lookup_rejects_foreign_tokens(tmp_path: Path) -> None:
    write_http01(tmp_path, "tok_en-1", "tok_en-1.thumb")
    (tmp_path / ".challenges" / "secret").write_bytes(b"secret")
    assert http01_key_authorization(tmp_path, "tok_en-1") == b"tok_en-1.thumb"
    for token in ("../secret", "..", "tok.en", "", "missing"):
        assert http01_key_authorization(tmp_path, token) is None
