"""Client certificates in-process: the verification settings of a site's context (through
memory BIOs), what a verified certificate says upstream, the header step, and the loader's
checks of client_ca, client_auth, client_crl, client_cert_headers and client_cert."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy.certs.local_ca import LocalCA
from proxy.config import ClientAuth, ClientCertHeaders
from proxy.config_load import ConfigError, parse_config
from proxy.http.headers import with_client_certificate
from proxy.tls import policy
from proxy.tls.client_cert import ClientCertificate, header_safe
from tests.support.client_pki import ClientCA, ClientCert

ALICE_SUBJECT = "CN=alice,O=Example\\, Inc."


@dataclass
class Pki:
    root: Path  # trusted by the clients: signs the server certificate
    chain: Path
    key: Path
    ca: ClientCA
    alice: ClientCert
    revoked: ClientCert
    stranger: ClientCert


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca = LocalCA(tmp_path)
    chain, key = server_ca.issue(["localhost"])
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    ca = ClientCA(tmp_path, "trusted")
    return Pki(
        root=server_ca.root_cert_path,
        chain=tmp_path / "chain.pem",
        key=tmp_path / "key.pem",
        ca=ca,
        alice=ca.issue("alice", organization="Example, Inc."),
        revoked=ca.issue("revoked"),
        stranger=ClientCA(tmp_path, "other").issue("alice"),
    )


@pytest.fixture
def shared_ticket_keys() -> Iterator[None]:
    """One ticket key for every context, as worker processes have."""
    policy.set_ticket_keys([policy.new_ticket_key()])
    yield
    policy._ticket_keys.clear()


@dataclass
class Handshake:
    server: ssl.SSLObject
    client: ssl.SSLObject
    error: ssl.SSLError | None  # the first error either side saw


def client_context(pki: Pki, client: ClientCert | None, *, tls12: bool = False) -> ssl.SSLContext:
    """A client trusting the server, presenting `client`'s certificate when asked."""
    ctx = ssl.create_default_context(cafile=pki.root)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


def handshake(
    pki: Pki,
    server_ctx: ssl.SSLContext,
    client: ClientCert | ssl.SSLContext | None,
    *,
    tls12: bool = False,
    session: ssl.SSLSession | None = None,
) -> Handshake:
    """A handshake and one byte each way (TLS 1.3 checks the client's certificate and sends
    tickets after the client's Finished), through memory BIOs. `client`: a certificate, or
    a client context (a session resumes only with the context it came from)."""
    client_ctx = (
        client if isinstance(client, ssl.SSLContext) else client_context(pki, client, tls12=tls12)
    )
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client_ctx.wrap_bio(
        to_client, to_server, server_hostname="localhost", session=session
    )
    server_side = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    steps = [
        client_side.do_handshake,
        server_side.do_handshake,
        lambda: server_side.write(b"s"),
        lambda: client_side.read(1),
        lambda: client_side.write(b"c"),
        lambda: server_side.read(1),
    ]
    for _ in range(10):
        for step in list(steps):
            try:
                step()
                steps.remove(step)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return Handshake(server_side, client_side, exc)
        if not steps:
            break
    assert not steps, steps
    return Handshake(server_side, client_side, None)


def context(pki: Pki, mode: str, crl: Path | None = None) -> policy.ServerContext:
    client_auth = ClientAuth(ca=pki.ca.ca, mode=mode, crl=crl)  # type: ignore[arg-type]
    return policy.server_context(pki.chain, pki.key, ["http/1.1"], client_auth)


def test_require_passes_a_verified_certificate(pki: Pki) -> None:
    ctx = context(pki, "require")
    assert ctx.client_auth == ClientAuth(ca=pki.ca.ca, mode="require")
    done = handshake(pki, ctx, pki.alice)
    assert done.error is None and policy.verification_error(done.server) is None
    assert done.server.getpeercert(binary_form=True) == pki.alice.certificate.public_bytes(
        serialization.Encoding.DER
    )


@pytest.mark.parametrize(
    ("client", "tls12", "why"),
    [
        (None, False, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        (None, True, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("stranger", False, "unable to get local issuer certificate"),
        ("revoked", False, "certificate revoked"),
    ],
)
def test_require_fails_the_handshake(pki: Pki, client: str | None, tls12: bool, why: str) -> None:
    ctx = context(pki, "require", crl=pki.ca.crl(pki.revoked))
    done = handshake(pki, ctx, getattr(pki, client) if client else None, tls12=tls12)
    assert done.error is not None and why in str(done.error)


def test_request_completes_and_reports_the_verdict(pki: Pki) -> None:
    ctx = context(pki, "request", crl=pki.ca.crl(pki.revoked))
    verdicts = {}
    for name in ("alice", "stranger", "revoked", None):
        done = handshake(pki, ctx, getattr(pki, name) if name else None)
        assert done.error is None
        sent = done.server.getpeercert(binary_form=True) is not None
        verdicts[name] = (sent, policy.verification_error(done.server))
    assert verdicts == {
        "alice": (True, None),
        "stranger": (True, "unable to verify the first certificate"),
        "revoked": (True, "certificate revoked"),
        None: (False, None),
    }


def test_sessions_resume_only_under_the_same_client_auth(
    pki: Pki, shared_ticket_keys: None
) -> None:
    plain = policy.server_context(pki.chain, pki.key, ["http/1.1"])
    worker_one, worker_two = context(pki, "require"), context(pki, "require")
    other_ca = policy.server_context(
        pki.chain, pki.key, ["http/1.1"], ClientAuth(ca=pki.root, mode="require")
    )
    anonymous, alice = client_context(pki, None), client_context(pki, pki.alice)
    from_plain = handshake(pki, plain, anonymous).client.session
    stolen = handshake(pki, worker_one, anonymous, session=from_plain)
    assert not stolen.client.session_reused
    assert stolen.error is not None and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(stolen.error)
    verified = handshake(pki, worker_one, alice).client.session
    resumed = handshake(pki, worker_two, alice, session=verified)  # same settings elsewhere
    assert resumed.error is None and resumed.client.session_reused
    assert resumed.server.getpeercert(binary_form=True) is not None
    assert policy.verification_error(resumed.server) is None
    elsewhere = handshake(pki, other_ca, alice, session=verified)
    assert not elsewhere.client.session_reused


def test_what_a_certificate_says_upstream(pki: Pki) -> None:
    der = pki.alice.certificate.public_bytes(serialization.Encoding.DER)
    cert = ClientCertificate.from_der(der)
    assert cert.subject == ALICE_SUBJECT
    assert cert.fingerprint == hashlib.sha256(der).hexdigest()


def test_a_subject_becomes_printable_ascii_and_still_names_the_same() -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bücher & Co"),
            x509.NameAttribute(NameOID.COMMON_NAME, "eve\r\nX-Client-Subject: CN=admin"),
        ]
    )
    safe = header_safe(name.rfc4514_string())
    assert safe == "CN=eve\\0d\\0aX-Client-Subject: CN=admin,O=B\\c3\\bccher & Co"
    assert all(" " <= char <= "~" for char in safe)
    assert x509.Name.from_rfc4514_string(safe) == name


def test_the_header_step_removes_copies_and_adds_the_verified_values() -> None:
    names = ClientCertHeaders(subject=b"x-client-subject", fingerprint=b"x-client-sha256")
    incoming = [
        (b"x-client-subject", b"CN=admin"),
        (b"accept", b"*/*"),
        (b"x-client-sha256", b"00"),
        (b"x-client-subject", b"CN=root"),
    ]
    cert = ClientCertificate(subject="CN=alice", fingerprint="ab" * 32)
    assert with_client_certificate(incoming, names, cert) == [
        (b"accept", b"*/*"),
        (b"x-client-subject", b"CN=alice"),
        (b"x-client-sha256", b"ab" * 32),
    ]
    assert with_client_certificate(incoming, names, None) == [(b"accept", b"*/*")]
    subject_only = ClientCertHeaders(subject=b"x-client-subject")
    assert with_client_certificate(incoming, subject_only, cert) == [
        (b"accept", b"*/*"),
        (b"x-client-sha256", b"00"),
        (b"x-client-subject", b"CN=alice"),
    ]


# -- the loader -------------------------------------------------------------------------


def site(*lines: str) -> str:
    return '[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n' + "\n".join(lines)


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("t.toml"))
    return str(info.value)


def test_a_site_with_client_certificates_loads(pki: Pki) -> None:
    config = parse_config(
        site(
            f'client_ca = "{pki.ca.ca}"',
            'client_auth = "request"',
            f'client_crl = "{pki.ca.crl()}"',
            'client_cert_headers = { subject = "X-Client-Subject", fingerprint = "X-FP" }',
            '[[sites.routes]]\npath_prefix = "/admin"\nclient_cert = "required"',
            'respond = { body = "hi" }',
        ),
        Path("t.toml"),
    )
    (loaded,) = config.sites
    assert loaded.client_auth == ClientAuth(ca=pki.ca.ca, mode="request", crl=pki.ca.crl())
    assert loaded.client_cert_headers == ClientCertHeaders(
        subject=b"x-client-subject", fingerprint=b"x-fp"
    )
    assert loaded.routes[0].client_cert_required
    default = parse_config(site(f'client_ca = "{pki.ca.ca}"'), Path("t.toml")).sites[0]
    assert default.client_auth == ClientAuth(ca=pki.ca.ca, mode="require")
    assert parse_config(site(), Path("t.toml")).sites[0].client_auth is None


def test_client_auth_and_crl_need_a_ca_and_a_route_guard_needs_them() -> None:
    found = problems(
        site(
            'client_auth = "request"',
            'client_crl = "x.pem"',
            '[[sites.routes]]\npath = "/"\nclient_cert = "required"\nrespond = {}',
        )
    )
    assert "sites[0].client_auth: needs client_ca" in found
    assert "sites[0].client_crl: needs client_ca" in found
    assert "sites[0].routes[0].client_cert: needs client_ca on the site" in found


def test_bad_values_are_reported(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    found = problems(
        site(
            f'client_ca = "{tmp_path / "junk.pem"}"',
            'client_auth = "optional"',
            'client_cert_headers = { subject = "X Bad", issuer = "X-Issuer" }',
            '[[sites.routes]]\npath = "/"\nclient_cert = "yes"\nrespond = {}',
        )
    )
    assert "sites[0].client_ca: no valid PEM in" in found
    assert 'sites[0].client_auth: must be one of "require", "request"' in found
    assert "sites[0].client_cert_headers.subject: must be a header field name" in found
    assert "sites[0].client_cert_headers.issuer: unknown key" in found
    assert "sites[0].routes[0].client_cert: must be" in found
    missing = problems(site(f'client_ca = "{tmp_path / "none.pem"}"'))
    assert "sites[0].client_ca: cannot read" in missing
    same = problems(site('client_cert_headers = { subject = "X-A", fingerprint = "x-a" }'))
    assert "sites[0].client_cert_headers.fingerprint: must differ from subject" in same


def test_a_crl_must_come_from_the_bundle_and_be_current(pki: Pki, tmp_path: Path) -> None:
    foreign = ClientCA(tmp_path, "foreign").crl()
    found = problems(site(f'client_ca = "{pki.ca.ca}"', f'client_crl = "{foreign}"'))
    assert f"sites[0].client_crl: not signed by a CA in {pki.ca.ca}" in found
    stale = pki.ca.crl(next_update=datetime.now(UTC) - timedelta(hours=1))
    found = problems(site(f'client_ca = "{pki.ca.ca}"', f'client_crl = "{stale}"'))
    assert "sites[0].client_crl: expired at" in found
