"""The certificate manager behind real TLS handshakes: per-name certificates, renewal."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509

from proxy.certs.local_ca import LocalCA
from proxy.certs.manager import CertManager, Issuer, LocalIssuer
from proxy.certs.store import CertStore
from proxy.config import CertsConfig, Config, SiteConfig, TLSConfig
from proxy.config import Issuer as IssuerName
from proxy.tls.clienthello import MAX_CLIENT_HELLO_BYTES, parse_client_hello

ALPN = ("http/1.1",)


def site(*hosts: str, files: tuple[Path, Path] | None = None) -> SiteConfig:
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
    while (hello := parse_client_hello(data)) is None:
        await trio.sleep(0.01)
        data = await stream.socket.recv(MAX_CLIENT_HELLO_BYTES, socket.MSG_PEEK)
    context = manager.context_for(hello.server_name)
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
    config = make_config(tmp_path, site("a.test", "www.a.test"), site("b.test"))
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


async def test_default_site_answers_unknown_and_missing_sni(tmp_path: Path) -> None:
    config = make_config(tmp_path, site("a.test"), site("b.test"), default_site="b.test")
    async with running(CertManager(config, ALPN)) as port:
        b = await peer_certificate(port, "b.test", root_pem(config))
        unknown = await peer_certificate(port, "c.test", root_pem(config), check_hostname=False)
        no_sni = await peer_certificate(port, None, root_pem(config), check_hostname=False)
    assert unknown.serial_number == no_sni.serial_number == b.serial_number


async def test_restart_reuses_stored_certificates(tmp_path: Path) -> None:
    config = make_config(tmp_path, site("a.test"))
    async with running(CertManager(config, ALPN)) as port:
        first = await peer_certificate(port, "a.test", root_pem(config))
    async with running(CertManager(config, ALPN)) as port:
        second = await peer_certificate(port, "a.test", root_pem(config))
    assert second.serial_number == first.serial_number


async def test_new_host_on_a_site_gets_a_new_certificate(tmp_path: Path) -> None:
    async with running(CertManager(make_config(tmp_path, site("a.test")), ALPN)):
        pass
    config = make_config(tmp_path, site("a.test", "new.a.test"))
    async with running(CertManager(config, ALPN)) as port:
        cert = await peer_certificate(port, "new.a.test", root_pem(config))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.test", "new.a.test"]


class CountingIssuer:
    def __init__(self, inner: Issuer) -> None:
        self.inner = inner
        self.calls = 0

    async def issue(self, site: SiteConfig) -> tuple[bytes, bytes]:
        self.calls += 1
        return await self.inner.issue(site)


async def test_renewal_swaps_certificate_without_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, site("a.test"))
    ca = LocalCA(config.certs.dir, leaf_lifetime=timedelta(seconds=6), backdate=timedelta(0))
    issuer = CountingIssuer(LocalIssuer(ca))
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
    async def issue(self, site: SiteConfig) -> tuple[bytes, bytes]:
        raise RuntimeError("CA unreachable")


async def test_failed_issuance_leaves_other_sites_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, site("a.test"), site("b.test"))
    ca = LocalCA(config.certs.dir)
    CertStore(config.certs.dir).write("a.test", *ca.issue(["a.test"]), {})
    issuer: Issuer = FailingIssuer()
    with caplog.at_level(logging.ERROR):
        async with running(CertManager(config, ALPN, issuer=issuer)) as port:
            await peer_certificate(port, "a.test", root_pem(config))
            await assert_refused(port, "b.test", root_pem(config))
    assert "certificate for site b.test (b.test) failed: CA unreachable" in caplog.text
    assert "retrying in 0:01:00" in caplog.text


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
        site("a.test", files=files["a.test"]),
        site("b.test", files=mismatched),
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
    assert "certificate for site b.test (b.test) cannot be loaded" in caplog.text
    assert not (config.certs.dir / "local").exists()  # no CA involved


def test_acme_needs_an_issuer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs an issuer"):
        CertManager(make_config(tmp_path, site("a.test"), issuer="acme"), ALPN)
