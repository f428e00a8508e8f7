"""The certificate manager behind real TLS handshakes: per-name certificates, renewal."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509

from proxy.certs.acme import AcmeError, RenewalInfo
from proxy.certs.acme_challenges import ACME_TLS_ALPN, write_tls_alpn01
from proxy.certs.issuers import Issued, IssueRequest, LocalIssuer
from proxy.certs.local_ca import LocalCA
from proxy.certs.manager import CertManager
from proxy.certs.status import load_status
from proxy.certs.store import CertStore, StoredCert
from proxy.config import CertsConfig, Config, SiteConfig, TLSConfig
from proxy.config import Issuer as IssuerName
from proxy.tls.clienthello import MAX_CLIENT_HELLO_BYTES, ClientHello, parse_client_hello

ALPN = ("http/1.1",)


def site_config(*hosts: str, files: tuple[Path, Path] | None = None) -> SiteConfig:
    cert, key = files or (None, None)
    return SiteConfig(hosts=hosts, upstreams=(), cert=cert, key=key)


def make_config(
    tmp_path: Path,
    *sites: SiteConfig,
    default_site: str | None = None,
    issuer: IssuerName = "local",
) -> Config:
    return Config(
        path=tmp_path / "port443.toml",
        certs=CertsConfig(dir=tmp_path / "certs", issuer=issuer),
        tls=TLSConfig(default_site=default_site),
        sites=sites,
    )


async def serve_handshakes(manager: CertManager, stream: trio.SocketStream) -> None:
    """What the server does: peek the ClientHello, ask the manager, hand over to TLS.

    The handshake runs on a blocking stdlib socket in a thread, so that a refusal puts
    its alert on the wire the way the server's own TLS stream does.
    """
    data = await stream.socket.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
    while not isinstance(hello := parse_client_hello(data), ClientHello):
        await trio.sleep(0.01)
        data = await stream.socket.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
    context = await manager.handshake_context(hello)
    sock = socket.socket(fileno=stream.socket.detach())

    def handshake() -> None:
        sock.settimeout(10)
        refused = contextlib.suppress(OSError)
        with sock, refused, context.wrap_socket(sock, server_side=True) as tls:
            tls.recv(1)  # until the client closes

    await trio.to_thread.run_sync(handshake)


@contextlib.asynccontextmanager
async def running(manager: CertManager) -> AsyncIterator[int]:
    """Run the manager and a TLS listener that uses it; yields the listener's port."""
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        handler = functools.partial(serve_handshakes, manager)
        serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def peer_certificate(
    port: int, server_name: str | None, cafile: Path, *, check_hostname: bool = True
) -> x509.Certificate:
    """Handshake as a verifying client sending `server_name` as SNI; the server's leaf."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = check_hostname
    tls = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=server_name
    )
    with trio.fail_after(10):
        await tls.do_handshake()
    der = tls.getpeercert(binary_form=True)
    await tls.aclose()
    return x509.load_der_x509_certificate(der)


def root_pem(config: Config) -> Path:
    return config.certs.dir / "local" / "root.pem"


async def assert_refused(port: int, server_name: str | None, cafile: Path) -> None:
    with pytest.raises(trio.BrokenResourceError) as info:
        await peer_certificate(port, server_name, cafile, check_hostname=False)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert "UNRECOGNIZED_NAME" in str(info.value.__cause__)


async def test_each_name_gets_its_site_certificate(tmp_path: Path) -> None:
    config = make_config(tmp_path, site_config("a.test", "www.a.test"), site_config("b.test"))
    manager = CertManager(config, ALPN)
    async with running(manager) as port:
        a = await peer_certificate(port, "a.test", root_pem(config))
        www = await peer_certificate(port, "WWW.A.test", root_pem(config))
        b = await peer_certificate(port, "b.test", root_pem(config))
        await assert_refused(port, "c.test", root_pem(config))
        await assert_refused(port, None, root_pem(config))
    assert a.serial_number == www.serial_number != b.serial_number
    served = {cert.name: cert.serial for cert in manager.certificates()}
    assert served == {"a.test": a.serial_number, "b.test": b.serial_number}


async def test_context_for_hello_prefers_a_pending_tls_alpn01_challenge(tmp_path: Path) -> None:
    config = make_config(tmp_path, site_config("a.test"), default_site="a.test")
    manager = CertManager(config, ALPN)
    async with running(manager):
        served = manager.context_for("a.test")
        acme = ClientHello("a.test", (ACME_TLS_ALPN,))
        assert manager.context_for_hello(acme) is served  # no challenge pending
        write_tls_alpn01(config.certs.dir, "a.test", "token.thumbprint")
        challenge = manager.context_for_hello(acme)
        assert challenge is not served and manager.context_for_hello(acme) is challenge
        assert manager.context_for_hello(ClientHello("a.test", ("h2",))) is served
        assert manager.context_for_hello(ClientHello("other.test", ())) is served  # default
        # a hello the parser refused never gets a certificate, not even the default site's
        assert manager.context_for_hello(None) not in (served, challenge)


async def test_default_site_answers_unknown_and_missing_sni(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, site_config("a.test"), site_config("b.test"), default_site="b.test"
    )
    async with running(CertManager(config, ALPN)) as port:
        b = await peer_certificate(port, "b.test", root_pem(config))
        unknown = await peer_certificate(port, "c.test", root_pem(config), check_hostname=False)
        no_sni = await peer_certificate(port, None, root_pem(config), check_hostname=False)
    assert unknown.serial_number == no_sni.serial_number == b.serial_number


async def test_restart_reuses_stored_certificates(tmp_path: Path) -> None:
    config = make_config(tmp_path, site_config("a.test"))
    async with running(CertManager(config, ALPN)) as port:
        first = await peer_certificate(port, "a.test", root_pem(config))
    async with running(CertManager(config, ALPN)) as port:
        second = await peer_certificate(port, "a.test", root_pem(config))
    assert second.serial_number == first.serial_number


async def test_new_host_on_a_site_gets_a_new_certificate(tmp_path: Path) -> None:
    async with running(CertManager(make_config(tmp_path, site_config("a.test")), ALPN)):
        pass
    config = make_config(tmp_path, site_config("a.test", "new.a.test"))
    async with running(CertManager(config, ALPN)) as port:
        cert = await peer_certificate(port, "new.a.test", root_pem(config))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "new.a.test"]


class CountingIssuer(LocalIssuer):
    calls = 0

    async def issue(self, request: IssueRequest) -> Issued:
        self.calls += 1
        return await super().issue(request)


async def test_renewal_swaps_certificate_without_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, site_config("a.test"))
    ca = LocalCA(config.certs.dir, leaf_lifetime=timedelta(seconds=6), backdate=timedelta(0))
    issuer = CountingIssuer(ca)
    manager = CertManager(config, ALPN, issuer=issuer)
    async with running(manager) as port:
        first = await peer_certificate(port, "a.test", root_pem(config))
        with trio.fail_after(20):  # renewal is due after two thirds of 6 s
            while (
                renewed := await peer_certificate(port, "a.test", root_pem(config))
            ).serial_number == first.serial_number:
                await trio.sleep(0.2)
        assert issuer.calls == 2
        assert manager.context_for("A.TEST") is manager.context_for("a.test")
    assert renewed.not_valid_before_utc < first.not_valid_after_utc  # renewed ahead of expiry
    stored = CertStore(config.certs.dir).load("a.test")
    assert stored is not None and stored.serial == renewed.serial_number
    assert [cert.serial for cert in manager.certificates()] == [renewed.serial_number]


class FailingIssuer:
    """Every order fails; any stored certificate counts as its own."""

    instant = True
    has_fallback = False

    async def issue(self, request: IssueRequest) -> Issued:
        raise RuntimeError("CA unreachable")

    def issued(self, cert: StoredCert) -> bool:
        return True

    async def renewal_info(self, cert: StoredCert) -> RenewalInfo | None:
        return None


async def test_failed_issuance_leaves_other_sites_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retried at once, once more (another challenge type), then after a minute."""
    config = make_config(tmp_path, site_config("a.test"), site_config("b.test"))
    ca = LocalCA(config.certs.dir)
    CertStore(config.certs.dir).write("a.test", *ca.issue(["a.test"]), {})
    manager = CertManager(config, ALPN, issuer=FailingIssuer())
    with caplog.at_level(logging.ERROR):
        async with running(manager) as port:
            await peer_certificate(port, "a.test", root_pem(config))
            await assert_refused(port, "b.test", root_pem(config))
            with trio.fail_after(5):
                while manager.renewal_failures.get("b.test", 0) < 3:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
    assert manager.renewal_failures == {"b.test": 3}
    failures = [
        r.getMessage() for r in caplog.records if "b.test: certificate request" in r.message
    ]
    assert [m.split(" failed: ")[0] for m in failures] == [
        f"site b.test: certificate request {n}" for n in (1, 2, 3)
    ]
    assert all("CA unreachable; its names fall through" in m for m in failures)
    assert "retrying in 0:00:00" in failures[0]
    assert "retrying with another challenge type in 0:00:00" in failures[1]
    assert "retrying in 0:01:00" in failures[2]
    status = load_status(CertStore(config.certs.dir), "b.test")
    assert (status.failures, status.last_error) == (3, "CA unreachable")


async def test_a_restart_continues_the_backoff(tmp_path: Path) -> None:
    """Restarting must not hammer a CA that keeps failing: the recorded retry time holds."""
    config = make_config(tmp_path, site_config("a.test"))
    async with running(manager := CertManager(config, ALPN, issuer=FailingIssuer())):
        with trio.fail_after(5):
            while manager.renewal_failures.get("a.test", 0) < 3:
                await trio.sleep(0.01)
    issuer = CountingIssuer(LocalCA(config.certs.dir))
    issuer.ca.root_certificate()  # created on first use
    async with running(CertManager(config, ALPN, issuer=issuer)) as port:
        await assert_refused(port, "a.test", root_pem(config))
    assert issuer.calls == 0
    other_names = make_config(tmp_path, site_config("a.test", "www.a.test"))
    async with running(CertManager(other_names, ALPN, issuer=issuer)) as port:
        await peer_certificate(port, "www.a.test", root_pem(config))
    assert issuer.calls == 1


async def test_files_issuer_with_a_broken_site(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = LocalCA(tmp_path / "ca")
    files: dict[str, tuple[Path, Path]] = {}
    for name in ("a.test", "b.test"):
        chain, key = ca.issue([name])
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        files[name][0].write_bytes(chain)
        files[name][1].write_bytes(key)
    mismatched = (files["b.test"][0], files["a.test"][1])  # the key of another certificate
    config = make_config(
        tmp_path,
        site_config("a.test", files=files["a.test"]),
        site_config("b.test", files=mismatched),
        issuer="files",
    )
    with caplog.at_level(logging.ERROR):
        async with running(CertManager(config, ALPN)) as port:
            cert = await peer_certificate(port, "a.test", ca.root_cert_path)
            await assert_refused(port, "b.test", ca.root_cert_path)
    assert (
        cert.serial_number
        == x509.load_pem_x509_certificate(files["a.test"][0].read_bytes()).serial_number
    )
    assert "site b.test: refusing the certificate in" in caplog.text
    assert "does not belong to the certificate" in caplog.text
    assert not (config.certs.dir / "local").exists()  # no CA involved


async def test_reload_swaps_a_valid_pair_at_once_and_refuses_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What SIGHUP does for "files" sites: no waiting for the next look at the mtimes."""
    ca = LocalCA(tmp_path / "ca")
    chain, key = tmp_path / "a.pem", tmp_path / "a.key"

    def write(pair: tuple[bytes, bytes]) -> int:
        chain.write_bytes(pair[0])
        key.write_bytes(pair[1])
        return x509.load_pem_x509_certificate(pair[0]).serial_number

    write(ca.issue(["a.test"]))
    config = make_config(tmp_path, site_config("a.test", files=(chain, key)), issuer="files")
    manager = CertManager(config, ALPN)
    async with running(manager) as port:
        serial = write(ca.issue(["a.test"]))
        await manager.reload()
        assert (await peer_certificate(port, "a.test", ca.root_cert_path)).serial_number == serial
        chain.write_bytes(ca.issue(["a.test"])[0])  # not the key's certificate
        with caplog.at_level(logging.ERROR):
            await manager.reload()
        assert (await peer_certificate(port, "a.test", ca.root_cert_path)).serial_number == serial
    assert f"site a.test: refusing the certificate in {chain} and {key}" in caplog.text
    assert "keeping the one in service" in caplog.text


class RateLimitedIssuer(FailingIssuer):
    async def issue(self, request: IssueRequest) -> Issued:
        raise AcmeError("urn:ietf:params:acme:error:rateLimited", timedelta(hours=2))


async def test_the_cas_retry_after_postpones_even_the_quick_retry(tmp_path: Path) -> None:
    config = make_config(tmp_path, site_config("a.test"))
    async with running(CertManager(config, ALPN, issuer=RateLimitedIssuer())):
        pass
    status = load_status(CertStore(config.certs.dir), "a.test")
    assert status.failures == 1 and status.next_attempt is not None
    wait = status.next_attempt - datetime.now(UTC)
    assert timedelta(hours=1, minutes=59) < wait <= timedelta(hours=2)
