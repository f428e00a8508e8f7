"""DNS-01 pieces on their own: the record for a key authorization, the [acme.dns] table,
wildcard names in the site and certificate lookups, and RFC 2136 updates against a real
Knot DNS on loopback (bad key, propagation timeout, removal of our values only)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import dns.name
import pytest

from proxy.certs.dns01 import DnsError, challenge_record, dns01_records, name_servers
from proxy.certs.manager import CertManager
from proxy.config import Config, DnsConfig, SiteConfig, wildcard_of
from proxy.config_load import load_config
from tests.support.knot import KEY_NAME, Knot, run_knot
from tests.support.net import free_dns_port
from tests.test_cert_manager import (
    ALPN,
    assert_refused,
    make_config,
    peer_certificate,
    root_pem,
    running,
    site_config,
)
from tests.test_config import problems, write

UPSTREAM = 'upstreams = ["http://127.0.0.1:8000"]\n'
DNS_TABLE = (
    '[acme.dns]\nserver = "127.0.0.1:5353"\ntsig_key_name = "k."\ntsig_secret = "c2VjcmV0"\n'
)
WILDCARD_SITE = f'[[sites]]\nhosts = ["*.example.test", "example.test"]\n{UPSTREAM}'


# -- the record --------------------------------------------------------------------------


def test_challenge_record_is_the_key_authorizations_digest_at_acme_challenge() -> None:
    digest = hashlib.sha256(b"token.thumbprint").digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    for identifier in ("example.test", "*.example.test", "Example.Test."):
        record = challenge_record(identifier, "token.thumbprint")
        assert record.name == dns.name.from_text("_acme-challenge.example.test.")
        assert record.value == expected


# -- configuration -----------------------------------------------------------------------


def test_acme_dns_table_is_read(tmp_path: Path) -> None:
    secret_file = tmp_path / "tsig.secret"
    secret_file.write_text("c2VjcmV0\n")
    text = (
        '[certs]\nissuer = "acme"\n[acme.dns]\nprovider = "rfc2136"\nserver = "[::1]:5300"\n'
        f'tsig_key_name = "port443-key."\ntsig_secret_file = "{secret_file}"\n'
        'tsig_algorithm = "hmac-sha512"\npropagation_timeout = 30\n'
        'propagation_servers = ["192.0.2.1", "192.0.2.2:5353"]\n'
        f'{WILDCARD_SITE}challenge = "dns-01"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.acme.dns == DnsConfig(
        server=("::1", 5300),
        tsig_key_name="port443-key.",
        tsig_secret="c2VjcmV0",
        tsig_algorithm="hmac-sha512",
        propagation_timeout=30.0,
        propagation_servers=(("192.0.2.1", 53), ("192.0.2.2", 5353)),
    )
    assert "c2VjcmV0" not in repr(config)  # the secret never shows in a repr or a log line
    (wildcard_site,) = config.sites
    assert config.acme.challenges_for(wildcard_site) == ("dns-01",)


def test_a_lexicon_provider_table_is_read(tmp_path: Path) -> None:
    text = (
        '[certs]\nissuer = "acme"\n[acme.dns]\nprovider = "cloudflare"\n'
        'credentials_file = "/etc/port443/lexicon_cloudflare.yml"\n'
        'propagation_servers = ["192.0.2.1"]\n'
        '[acme.dns.options]\nzone_id = "abc123"\nauth_token = "token-in-the-toml"\n'
        f'{WILDCARD_SITE}challenge = "dns-01"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.acme.dns == DnsConfig(
        provider="cloudflare",
        options=(("zone_id", "abc123"), ("auth_token", "token-in-the-toml")),
        credentials_file=Path("/etc/port443/lexicon_cloudflare.yml"),
        propagation_servers=(("192.0.2.1", 53),),
    )
    assert "token-in-the-toml" not in repr(config)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            f'[certs]\nissuer = "acme"\n{WILDCARD_SITE}',
            '4: sites[0].hosts[0]: wildcard "*.example.test" needs challenge = "dns-01"',
        ),
        (
            f'[certs]\nissuer = "acme"\n{WILDCARD_SITE}challenge = "dns-01"\n',
            " acme: dns-01 needs an [acme.dns] table: how to publish the records",
        ),
        (
            f'{WILDCARD_SITE}challenge = "dns-01"\n',
            '4: sites[0].challenge: is only used with issuer "acme", not "local"',
        ),
        (
            DNS_TABLE + 'tsig_secret_file = "/nonexistent"\n',
            "4: acme.dns.tsig_secret: give either tsig_secret or tsig_secret_file",
        ),
        (
            DNS_TABLE.replace("c2VjcmV0", "not base64!"),
            "4: acme.dns.tsig_secret: must be base64 text, as tsig-keygen or keymgr print it",
        ),
        (
            DNS_TABLE.replace("127.0.0.1:5353", "ns.example.test"),
            '2: acme.dns.server: must be an IP address with an optional port, "127.0.0.1:53",'
            ' got "ns.example.test"',
        ),
        (
            DNS_TABLE + 'provider = "nosuchdns"\n',
            '5: acme.dns.provider: must be "rfc2136" or a dns-lexicon provider name'
            ' (cloudflare, route53, ...), got "nosuchdns"',
        ),
        (
            '[acme.dns]\nprovider = "cloudflare"\nserver = "127.0.0.1"\n',
            "3: acme.dns.server: is not used by provider 'cloudflare'",
        ),
        (
            '[acme.dns]\noptions = { auth_token = "x" }\nserver = "127.0.0.1"\n'
            'tsig_key_name = "k."\ntsig_secret = "c2VjcmV0"\n',
            "2: acme.dns.options: is not used by provider 'rfc2136'",
        ),
        (
            '[acme.dns]\nprovider = "powerdns"\noptions = { pdns_server_port = 8081 }\n',
            "3: acme.dns.options: pdns_server_port must be a string, got 8081",
        ),
        (
            '[acme.dns]\ntsig_key_name = "k."\ntsig_secret = "c2VjcmV0"\n',
            "1: acme.dns.server: is required",
        ),
    ],
)
def test_dns01_configuration_problems(tmp_path: Path, toml: str, message: str) -> None:
    text = toml if "[[sites]]" in toml else toml + f'[[sites]]\nhosts = ["a.test"]\n{UPSTREAM}'
    assert problems(tmp_path, text) == [message]


# -- wildcard names ----------------------------------------------------------------------


def test_a_wildcard_stands_for_exactly_one_label(tmp_path: Path) -> None:
    assert wildcard_of("a.example.test") == "*.example.test"
    assert wildcard_of("localhost") is None
    star = SiteConfig(hosts=("*.example.test",), upstreams=())
    apex = SiteConfig(hosts=("example.test", "a.example.test"), upstreams=())
    config = Config(path=tmp_path / "x.toml", sites=(star, apex))
    assert config.site_for_host("b.example.test") is star
    assert config.site_for_host("a.example.test") is apex  # a listed name beats the wildcard
    assert config.site_for_host("example.test") is apex
    assert config.site_for_host("a.b.example.test") is None


async def test_wildcard_certificate_answers_one_label_subdomains(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, site_config("*.example.test", "example.test"), site_config("a.example.test")
    )
    manager = CertManager(config, ALPN)
    async with running(manager) as port:
        one = await peer_certificate(port, "one.example.test", root_pem(config))
        two = await peer_certificate(port, "Two.Example.Test", root_pem(config))
        listed = await peer_certificate(port, "a.example.test", root_pem(config))
        await assert_refused(port, "x.one.example.test", root_pem(config))
    assert one.serial_number == two.serial_number != listed.serial_number


# -- RFC 2136 against Knot ---------------------------------------------------------------


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    with run_knot(tmp_path_factory.mktemp("knot")) as server:
        yield server


def dns_config(knot: Knot, **changes: object) -> DnsConfig:
    options: dict[str, object] = {
        "server": ("127.0.0.1", knot.port),
        "tsig_key_name": KEY_NAME,
        "tsig_secret": knot.tsig_secret,
        "propagation_servers": (("127.0.0.1", knot.port),),
        **changes,
    }
    return DnsConfig(**options)  # type: ignore[arg-type]


async def test_removal_deletes_our_values_only(knot: Knot) -> None:
    """Two orders for one name at once (two processes, or apex and wildcard): each
    removes its own value and leaves the other's."""
    ours, theirs = challenge_record("example.test", "a.b"), challenge_record("example.test", "c.d")
    updater = dns01_records(dns_config(knot))
    await updater.publish([theirs])
    await updater.publish([ours])
    assert knot.txt(str(ours.name)) == {ours.value, theirs.value}
    await updater.remove([ours])
    assert knot.txt(str(ours.name)) == {theirs.value}
    await updater.remove([theirs])
    assert knot.txt(str(ours.name)) == set()


async def test_a_wrong_tsig_secret_is_refused_and_never_shown(knot: Knot) -> None:
    wrong = base64.b64encode(b"wrong secret of 32 bytes length.").decode()
    updater = dns01_records(dns_config(knot, tsig_secret=wrong))
    record = challenge_record("example.test", "e.f")
    with pytest.raises(DnsError) as failure:
        await updater.publish([record])
    assert f"127.0.0.1:{knot.port}" in str(failure.value)
    assert wrong not in str(failure.value) and knot.tsig_secret not in str(failure.value)
    assert knot.txt(str(record.name)) == set()


async def test_propagation_wait_is_bounded(knot: Knot) -> None:
    """A server that never answers: publish gives up after propagation_timeout."""
    silent = ("127.0.0.1", free_dns_port())
    updater = dns01_records(
        dns_config(knot, propagation_servers=(silent,), propagation_timeout=0.5)
    )
    record = challenge_record("example.test", "g.h")
    try:
        with pytest.raises(DnsError, match=r"not visible .* within 0.5 s"):
            await updater.publish([record])
    finally:
        await updater.remove([record])
    assert knot.txt(str(record.name)) == set()


async def test_without_propagation_servers_the_zones_ns_hosts_are_asked(knot: Knot) -> None:
    """The zone's NS host is in the zone: its address comes from the primary's glue."""
    primary = ("127.0.0.1", knot.port)
    assert await name_servers(dns.name.from_text("example.test"), primary) == [("127.0.0.1", 53)]


async def test_a_name_outside_the_servers_zones_is_reported(knot: Knot) -> None:
    updater = dns01_records(dns_config(knot))
    with pytest.raises(DnsError, match=r"not authoritative for _acme-challenge\.other\.test"):
        await updater.publish([challenge_record("other.test", "i.j")])
