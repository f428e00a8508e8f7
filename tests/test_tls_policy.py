"""The TLS policy as seen by a real `openssl s_client` talking to a real server."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.tls.policy import reject_context, server_context, set_groups
from tests.support.openssl import handshake
from tests.support.tls_server import self_signed, tls_server

ALPN = ("h2", "http/1.1")


@pytest.fixture(scope="module")
def policy_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """One server per certificate type: RSA-only suites need an RSA certificate to exist."""
    directory = tmp_path_factory.mktemp("policy")
    with contextlib.ExitStack() as stack:
        yield {
            key_type: stack.enter_context(
                tls_server(server_context(*self_signed(directory, key_type), ALPN))
            )
            for key_type in ("ecdsa", "rsa")
        } | {"reject": stack.enter_context(tls_server(reject_context()))}


@pytest.mark.parametrize(
    ("key_type", "args", "protocol"),
    [
        ("ecdsa", ["-tls1_3"], "TLSv1.3"),
        ("rsa", ["-tls1_3"], "TLSv1.3"),
        ("ecdsa", ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], "TLSv1.2"),
        ("ecdsa", ["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"], "TLSv1.2"),
        ("rsa", ["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"], "TLSv1.2"),
        ("rsa", ["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"], "TLSv1.2"),
    ],
)
def test_accepted(
    policy_servers: dict[str, int], key_type: str, args: list[str], protocol: str
) -> None:
    hs = handshake(policy_servers[key_type], *args)
    assert hs.ok, hs
    assert hs.protocol == protocol
    if "-cipher" in args:
        assert hs.cipher == args[-1]


@pytest.mark.parametrize(
    ("key_type", "args"),
    [
        ("rsa", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        ("ecdsa", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
        ("rsa", ["-tls1_2", "-cipher", "AES128-SHA"]),  # RSA key exchange, CBC
        ("rsa", ["-tls1_2", "-cipher", "AES128-GCM-SHA256"]),  # RSA key exchange
        ("rsa", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"]),  # CBC (Python allows it)
        ("ecdsa", ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384"]),  # CBC
    ],
)
def test_refused_versions_and_ciphers(
    policy_servers: dict[str, int], key_type: str, args: list[str]
) -> None:
    hs = handshake(policy_servers[key_type], *args)
    assert not hs.ok, hs


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("groups", [["-groups", "X448"], ["-curves", "secp521r1"]])
def test_other_groups_refused(
    policy_servers: dict[str, int], version: str, groups: list[str]
) -> None:
    # RSA: a TLS 1.2 client's groups also limit ECDSA certificate curves, which would
    # refuse these handshakes whatever the key-exchange policy.
    hs = handshake(policy_servers["rsa"], version, *groups)
    assert not hs.ok, hs


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_allowed_groups(policy_servers: dict[str, int], group: str) -> None:
    hs = handshake(policy_servers["ecdsa"], "-tls1_3", "-groups", group)
    assert hs.ok, hs


@pytest.mark.parametrize(
    "order",
    [
        ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        ["ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"],
    ],
)
def test_client_cipher_preference_wins(policy_servers: dict[str, int], order: list[str]) -> None:
    hs = handshake(policy_servers["ecdsa"], "-tls1_2", "-cipher", ":".join(order))
    assert hs.cipher == order[0], hs


@pytest.mark.parametrize(
    ("offer", "expected"),
    [
        (["-alpn", "http/1.1"], "ALPN protocol: http/1.1"),
        (["-alpn", "http/1.1,h2"], "ALPN protocol: h2"),  # the server's order decides
        (["-alpn", "spdy/3"], "No ALPN negotiated"),
        ([], "No ALPN negotiated"),
    ],
)
def test_alpn(policy_servers: dict[str, int], offer: list[str], expected: str) -> None:
    hs = handshake(policy_servers["ecdsa"], *offer)
    assert hs.ok, hs
    assert expected in hs.output


@pytest.mark.parametrize("sni", [["-servername", "unknown.test"], ["-noservername"]])
def test_reject_context_sends_unrecognized_name(
    policy_servers: dict[str, int], sni: list[str]
) -> None:
    hs = handshake(policy_servers["reject"], *sni)
    assert not hs.ok
    assert "unrecognized name" in hs.output, hs
    assert "alert number 112" in hs.output, hs


def test_context_options(tmp_path: Path) -> None:
    ctx = server_context(*self_signed(tmp_path, "ecdsa"), ALPN)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    }


def test_unknown_group_is_an_error() -> None:
    with pytest.raises(ssl.SSLError):
        set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "X25519:no-such-group")
