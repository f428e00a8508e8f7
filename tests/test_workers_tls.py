"""Session resumption across workers: shared, rotated session-ticket keys.

In-process, through memory BIOs: a ticket from one context resumes at another, survives one
rotation and not two. End to end: 20 `openssl s_client -sess_in` reconnects to an instance
of 2 workers (SO_REUSEPORT spreads them over both) all resume.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.certs.local_ca import LocalCA
from proxy.tls import policy
from tests.support.backend import Backend
from tests.support.openssl import s_client
from tests.support.proxy import ProxyProcess, sites_toml
from tests.support.workers import start_workers

RECONNECTS = 20
REQUEST = b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture
def restore_ticket_keys() -> Iterator[None]:
    yield
    policy._ticket_keys.clear()  # back to OpenSSL's own keys for the other tests


def _contexts(tmp_path: Path, count: int) -> tuple[list[ssl.SSLContext], ssl.SSLContext]:
    ca = LocalCA(tmp_path)
    chain, key = ca.issue(["localhost"])
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    servers = [
        policy.server_context(tmp_path / "chain.pem", tmp_path / "key.pem", ["http/1.1"])
        for _ in range(count)
    ]
    return servers, ssl.create_default_context(cafile=ca.root_cert_path)


def _connect(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> ssl.SSLObject:
    """A handshake and one byte each way (TLS 1.3 tickets follow the handshake)."""
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client->server, server->client
    client = client_ctx.wrap_bio(bios[1], bios[0], server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    steps = [client.do_handshake, server.do_handshake]
    for _ in range(10):
        for step in list(steps):
            try:
                step()
                steps.remove(step)
            except ssl.SSLWantReadError:
                pass
        if not steps:
            break
    server.write(b"x")
    assert client.read(1) == b"x"
    return client


def test_a_ticket_resumes_at_another_context_and_survives_one_rotation(
    tmp_path: Path, restore_ticket_keys: None
) -> None:
    first = policy.new_ticket_key()
    policy.set_ticket_keys([first])
    (one, other), client_ctx = _contexts(tmp_path, 2)
    session = _connect(one, client_ctx, None).session
    resumed = _connect(other, client_ctx, session)
    assert resumed.session_reused
    policy.set_ticket_keys([policy.new_ticket_key(), first])  # rotated: the old one decrypts
    after_rotation = _connect(one, client_ctx, resumed.session)
    assert after_rotation.session_reused
    policy.set_ticket_keys([policy.new_ticket_key()])  # the ticket's key is gone
    assert not _connect(other, client_ctx, resumed.session).session_reused


def test_ticket_keys_have_openssls_length(restore_ticket_keys: None) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        policy.set_ticket_keys([b"short"])


async def _s_client(proxy: ProxyProcess, *options: str) -> str:
    """ "New" or "Reused": one connection with one request, whose answer comes after the
    TLS 1.3 tickets, so that -sess_out has one to save."""
    handshake = await s_client(
        proxy.https_port, "-servername", "localhost", "-CAfile", str(proxy.root_ca),
        "-verify_return_error", "-ign_eof", *options, stdin=REQUEST, timeout=15,
    )  # fmt: skip
    assert handshake.session, handshake
    return handshake.session


@pytest.mark.slow
async def test_resumption_across_two_workers(tmp_path: Path, backend: Backend) -> None:
    proxy = await start_workers(tmp_path, sites_toml((["localhost"], [backend.url])))
    try:
        for version in ("-tls1_3", "-tls1_2"):
            session = str(tmp_path / f"session{version}")
            assert await _s_client(proxy, version, "-sess_out", session) == "New"
            outcomes = [
                await _s_client(proxy, version, "-sess_in", session, "-sess_out", session)
                for _ in range(RECONNECTS)
            ]
            assert outcomes == ["Reused"] * RECONNECTS, version
    finally:
        assert await proxy.terminate() == 0
