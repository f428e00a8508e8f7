"""Key-exchange groups: X25519MLKEM768 first where OpenSSL has it (3.5+), else the classic
three; checked with real handshakes by clients that offer a single group."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls.policy import (
    GROUPS,
    POST_QUANTUM_GROUP,
    groups_for,
    server_context,
    set_groups,
    ssl_ctx_address,
)
from tests.support.tls_server import self_signed, tls_server


@pytest.mark.parametrize(
    ("version", "groups"),
    [
        ((1, 1, 1, 23, 15), "X25519:P-256:P-384"),
        ((3, 0, 0, 13, 0), "X25519:P-256:P-384"),
        ((3, 4, 1, 0, 0), "X25519:P-256:P-384"),
        ((3, 5, 0, 0, 0), "X25519MLKEM768:X25519:P-256:P-384"),
        ((4, 0, 0, 0, 0), "X25519MLKEM768:X25519:P-256:P-384"),
    ],
)
def test_groups_follow_the_openssl_version(version: tuple[int, ...], groups: str) -> None:
    assert groups_for(version) == groups


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    chain, key = self_signed(tmp_path_factory.mktemp("groups"), "ecdsa")
    with tls_server(server_context(chain, key, ["http/1.1"])) as listening:
        yield listening


def handshake(port: int, group: str) -> str:
    """A TLS 1.3 client offering only `group`; the negotiated version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    set_groups(ctx, group)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="policy.test") as tls,
    ):
        return str(tls.version())


@pytest.mark.parametrize("group", GROUPS.split(":"))
def test_each_offered_group_is_accepted(port: int, group: str) -> None:
    assert handshake(port, group) == "TLSv1.3"


def test_other_group_is_refused(port: int) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(port, "X448")


def test_post_quantum_group_exactly_where_openssl_has_it(port: int) -> None:
    """Offered exactly when this OpenSSL knows the group (3.5+); older ones stay as they
    were, and a client on them cannot even ask for it."""
    try:
        set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), POST_QUANTUM_GROUP)
    except ssl.SSLError:
        known = False
    else:
        known = True
    assert (POST_QUANTUM_GROUP in GROUPS) is known, ssl.OPENSSL_VERSION
    assert GROUPS.split(":")[0] == (POST_QUANTUM_GROUP if known else "X25519")
    if known:
        assert handshake(port, POST_QUANTUM_GROUP) == "TLSv1.3"


def test_private_sslcontext_layout_still_holds(tmp_path: Path) -> None:
    """set_groups reaches OpenSSL through CPython's private PySSLContext layout; when a
    Python release changes it, this fails with ssl_ctx_address's message."""
    if hasattr(ssl.SSLContext, "set_groups"):
        pytest.skip("this Python has SSLContext.set_groups: no private layout is used")
    ctx = server_context(*self_signed(tmp_path, "ecdsa"), ["h2"])
    assert ssl_ctx_address(ctx) != ssl_ctx_address(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
