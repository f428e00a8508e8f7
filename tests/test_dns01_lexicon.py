"""DNS-01 through dns-lexicon, offline: lexicon's real `powerdns` provider talks HTTP to a fake
PowerDNS API on loopback (tests/support/fake_powerdns.py) that writes each change into a real
Knot zone by RFC 2136. So the path tested is port443's lexicon store -> lexicon's powerdns
provider -> HTTP with the API key -> real DNS data, which the shared propagation check and,
in the last test, Pebble's VA read from Knot."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from cryptography import x509
from lexicon.interfaces import Provider

from proxy.certs import dns01_lexicon
from proxy.certs.acme import AcmeClient
from proxy.certs.dns01 import DnsError, challenge_record, dns01_records
from proxy.certs.dns01_lexicon import _provider_class, lexicon_providers
from proxy.config import DnsConfig
from tests.support.fake_powerdns import FakePowerDns, run_fake_powerdns
from tests.support.knot import Knot, run_knot
from tests.support.pebble import Pebble

TOKEN = "pdns-api-key-0123456789"


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    with run_knot(tmp_path_factory.mktemp("knot")) as server:
        yield server


@pytest.fixture
def powerdns(knot: Knot) -> Iterator[FakePowerDns]:
    with run_fake_powerdns(knot, TOKEN) as fake:
        yield fake


def lexicon_config(knot: Knot, powerdns: FakePowerDns, **changes: object) -> DnsConfig:
    options: dict[str, object] = {
        "provider": "powerdns",
        "options": (("pdns_server", powerdns.url),),
        "propagation_servers": (("127.0.0.1", knot.port),),
        "propagation_timeout": 10.0,
        **changes,
    }
    return DnsConfig(**options)  # type: ignore[arg-type]


def test_the_private_provider_loader_still_finds_lexicons_providers() -> None:
    """`_provider_class` is the one use of a lexicon-private function: pinned here."""
    assert {"cloudflare", "route53", "powerdns", "ovh", "gandi"} <= lexicon_providers()
    assert issubclass(_provider_class("cloudflare"), Provider)


async def test_records_are_published_and_removed_with_credentials_from_the_environment(
    knot: Knot,
    powerdns: FakePowerDns,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LEXICON_POWERDNS_AUTH_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    records = dns01_records(lexicon_config(knot, powerdns))
    ours, theirs = challenge_record("example.test", "a.b"), challenge_record("example.test", "c.d")
    await records.publish([theirs])
    await records.publish([ours])  # the provider keeps the other value of the same name
    assert knot.txt(str(ours.name)) == {ours.value, theirs.value}
    await records.remove([ours])
    assert knot.txt(str(ours.name)) == {theirs.value}
    await records.remove([theirs])
    assert knot.txt(str(ours.name)) == set()
    assert "PATCH /api/v1/servers/localhost/zones/example.test." in powerdns.requests
    assert "DNS-01: added TXT _acme-challenge.example.test. at the powerdns API" in caplog.text
    assert TOKEN not in caplog.text


async def test_a_refused_credential_is_reported_without_it(
    knot: Knot,
    powerdns: FakePowerDns,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-token-9876543210"
    monkeypatch.setenv("LEXICON_POWERDNS_AUTH_TOKEN", wrong)
    caplog.set_level(logging.DEBUG)
    record = challenge_record("example.test", "e.f")
    with pytest.raises(
        DnsError, match=r"adding TXT .* by the powerdns API .*HTTPError \(HTTP 401\)"
    ):
        await dns01_records(lexicon_config(knot, powerdns)).publish([record])
    assert wrong not in caplog.text
    assert knot.txt(str(record.name)) == set()


async def test_a_credentials_file_is_read_and_the_toml_options_come_first(
    knot: Knot, powerdns: FakePowerDns, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LEXICON_POWERDNS_AUTH_TOKEN", "the-environment-comes-last")
    monkeypatch.setenv("LEXICON_POWERDNS_PDNS_SERVER", "http://127.0.0.1:1")
    credentials = tmp_path / "lexicon_powerdns.yml"
    credentials.write_text(f"auth_token: {TOKEN}\n")
    records = dns01_records(lexicon_config(knot, powerdns, credentials_file=credentials))
    record = challenge_record("example.test", "g.h")
    await records.publish([record])
    assert knot.txt(str(record.name)) == {record.value}
    await records.remove([record])
    assert knot.txt(str(record.name)) == set()


async def test_a_provider_that_never_answers_is_given_up_in_time(
    knot: Knot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lexicon blocks in its thread; the call is abandoned after CALL_TIMEOUT (a listener
    that never accepts: the request is sent, no answer comes)."""
    monkeypatch.setattr(dns01_lexicon, "CALL_TIMEOUT", 0.5)
    monkeypatch.setenv("LEXICON_POWERDNS_AUTH_TOKEN", TOKEN)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        config = DnsConfig(
            provider="powerdns",
            options=(("pdns_server", url),),
            propagation_servers=(("127.0.0.1", knot.port),),
        )
        with trio.fail_after(5), pytest.raises(DnsError, match=r"gave no answer in 0\.5 s"):
            await dns01_records(config).publish([challenge_record("example.test", "k.l")])
    # closing the listener resets the pending connection: the abandoned thread ends


@pytest.mark.slow
async def test_pebble_issues_a_wildcard_certificate_through_the_lexicon_path(
    start_pebble: Callable[..., Pebble],
    knot: Knot,
    powerdns: FakePowerDns,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("LEXICON_POWERDNS_AUTH_TOKEN", TOKEN)
    pebble = start_pebble(http_port=1, tls_port=1, dns_server=knot.server)
    dns = lexicon_config(knot, powerdns)
    client = AcmeClient(tmp_path / "certs", pebble.directory, ca_bundle=pebble.ca_bundle, dns=dns)
    issued = await client.issue(["*.example.test", "example.test"], challenges=("dns-01",))
    leaf = x509.load_pem_x509_certificate(issued.fullchain_pem)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == ["*.example.test", "example.test"]
    assert knot.txt("_acme-challenge.example.test") == set()
    assert sum(request.startswith("PATCH") for request in powerdns.requests) >= 2
