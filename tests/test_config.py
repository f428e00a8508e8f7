"""Loading config files: the values that come out, and the messages a broken file produces."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import (
    AcmeConfig,
    CertsConfig,
    Config,
    HSTSConfig,
    Http2Config,
    LimitsConfig,
    ListenConfig,
    Upstream,
)
from proxy.config_load import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

SITE = """\
[[sites]]
hosts = ["localhost"]
upstreams = ["http://127.0.0.1:8000"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "port443.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problems loading `text` reports, each without its `FILE:` prefix."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    assert all(problem.startswith(f"{path}:") for problem in info.value.problems)
    return [problem.removeprefix(f"{path}:") for problem in info.value.problems]


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, SITE)
    config = load_config(path)
    assert config.path == path
    assert config.log_level == "info"
    assert config.listen == ListenConfig()
    assert config.certs == CertsConfig(dir=tmp_path / "certs", issuer="local")
    assert config.hsts == HSTSConfig()
    assert config.limits == LimitsConfig()
    assert config.tls.default_site is None
    [site] = config.sites
    assert site.hosts == ("localhost",)
    assert site.upstreams == (Upstream("http://127.0.0.1:8000", "http", "127.0.0.1", 8000),)
    assert (site.cert, site.key) == (None, None)


def test_every_key_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pem").write_text("cert")
    (tmp_path / "a.key").write_text("key")
    # Distinct non-default limits, whatever fields LimitsConfig grows; the one switch
    # (shared_request_rate, which needs Redis) is tested in tests/test_cluster_limits.py.
    limits: dict[str, Any] = {
        field.name: (index + 2 if isinstance(field.default, int) else index + 0.5)
        for index, field in enumerate(dataclasses.fields(LimitsConfig))
        if not isinstance(field.default, bool)
    }
    limits_toml = "".join(f"{name} = {value}\n" for name, value in limits.items())
    text = f"""\
log_level = "debug"
[listen]
address = ["127.0.0.1", "::1"]
http = 0
https = 8443
[certs]
dir = "store"
issuer = "files"
[hsts]
max_age = 31536000
include_subdomains = true
preload = true
[limits]
{limits_toml}
[tls]
default_site = "B.example.test"
[[sites]]
hosts = ["WWW.Example.Test", "Bücher.example", "[::1]", "10.0.0.1", "fqdn.test."]
upstreams = ["http://127.0.0.1:8000/", "H2C://[::1]", "https://Backend.internal"]
cert = "a.pem"
key = "a.key"
[[sites]]
hosts = ["b.example.test"]
upstreams = ["http://b:9000"]
cert = "{tmp_path / "a.pem"}"
key = "{tmp_path / "a.key"}"
"""
    config = load_config(write(tmp_path, text))
    assert config.log_level == "debug"
    assert config.listen == ListenConfig(addresses=("127.0.0.1", "::1"), http=0, https=8443)
    assert config.certs == CertsConfig(dir=tmp_path / "store", issuer="files")
    assert config.hsts == HSTSConfig(max_age=31536000, include_subdomains=True, preload=True)
    assert config.limits == LimitsConfig(**limits)
    assert config.tls.default_site == "b.example.test"
    first, second = config.sites
    assert first.hosts == (
        "www.example.test",
        "xn--bcher-kva.example",
        "::1",
        "10.0.0.1",
        "fqdn.test",
    )
    assert first.upstreams == (
        Upstream("http://127.0.0.1:8000", "http", "127.0.0.1", 8000),
        Upstream("h2c://[::1]:80", "h2c", "::1", 80),
        Upstream("https://backend.internal:443", "https", "backend.internal", 443),
    )
    assert (first.cert, first.key) == (tmp_path / "a.pem", tmp_path / "a.key")
    assert (second.cert, second.key) == (tmp_path / "a.pem", tmp_path / "a.key")
    assert config.site_for_host("xn--bcher-kva.example") is first
    assert config.site_for_host("b.example.test") is second
    assert config.site_for_host("B.example.test") is None  # callers lower-case the Host
    assert config.site_for_host("other.test") is None


def test_a_single_address_string(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[listen]\naddress = "::"\n' + SITE))
    assert config.listen.addresses == ("::",)


def test_problem_format_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[listen]\nhttps = "443"\n' + SITE)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f'{path}:2: listen.https: must be an integer port 1-65535, got "443"'
    ]


def test_invalid_toml(tmp_path: Path) -> None:
    assert problems(tmp_path, SITE + "[listen]\nhttps 443\n") == [
        "5: invalid TOML: Expected '=' after a key in a key/value pair (at line 5, column 7)"
    ]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read config: No such file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"cannot read config: Is a directory"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'log_level = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: config is not UTF-8"):
        load_config(latin1)


def test_unknown_keys_everywhere(tmp_path: Path) -> None:
    text = f"""\
lisen = 1
[listen]
htps = 443
[hsts]
zzz = 1
[limits]
max_conections = 5
{SITE}host = "x"
[acme]
emial = "a@b.test"
"""
    assert problems(tmp_path, text) == [
        '1: lisen: unknown key (did you mean "listen"?)',
        '3: listen.htps: unknown key (did you mean "https"?)',
        "5: hsts.zzz: unknown key",
        '7: limits.max_conections: unknown key (did you mean "max_connections"?)',
        '11: sites[0].host: unknown key (did you mean "hosts"?)',
        '13: acme.emial: unknown key (did you mean "email"?)',
    ]


def test_unusual_key_names_are_quoted(tmp_path: Path) -> None:
    assert problems(tmp_path, '[listen]\n"my key" = 1\n' + SITE) == [
        '2: listen."my key": unknown key'
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'log_level = "verbose"',
            'log_level: must be one of "debug", "info", "warning", "error", got "verbose"',
        ),
        ("listen = 5", "listen: must be a table, got 5"),
        ("[listen]\nhttps = true", "listen.https: must be an integer port 1-65535, got true"),
        ("[listen]\nhttp = false", "listen.http: must be an integer port 0-65535, got false"),
        ("[listen]\nhttps = 70000", "listen.https: must be an integer port 1-65535, got 70000"),
        ("[listen]\nhttps = 0", "listen.https: must be an integer port 1-65535, got 0"),
        ("[listen]\nhttp = -1", "listen.http: must be an integer port 0-65535, got -1"),
        ("[listen]\nhttps = 443.0", "listen.https: must be an integer port 1-65535, got 443.0"),
        ("[listen]\nhttp = 443", "listen.http: must differ from listen.https (both are 443)"),
        (
            '[listen]\naddress = "localhost"',
            'listen.address: must be an IP address such as "0.0.0.0" or "::", got "localhost"',
        ),
        (
            '[listen]\naddress = ["::", "1.2.3"]',
            'listen.address: must be an IP address such as "0.0.0.0" or "::", got "1.2.3"',
        ),
        ("[listen]\naddress = []", "listen.address: must not be an empty array"),
        (
            '[listen]\naddress = [["::"]]',
            'listen.address: must be an IP address such as "0.0.0.0" or "::", got an array',
        ),
        (
            "[listen]\naddress = [1]",
            'listen.address: must be an IP address such as "0.0.0.0" or "::", got 1',
        ),
        (
            '[certs]\nissuer = "lets"',
            'certs.issuer: must be one of "local", "files", "acme", got "lets"',
        ),
        ('[certs]\ndir = ""', 'certs.dir: must be a non-empty path string, got ""'),
        ("[hsts]\nmax_age = -1", "hsts.max_age: must be an integer >= 0, got -1"),
        ("[hsts]\ninclude_subdomains = 1", "hsts.include_subdomains: must be true or false, got 1"),
        ("[limits]\nmax_connections = 0", "limits.max_connections: must be an integer >= 1, got 0"),
        (
            "[limits]\nmax_connections = 1.5",
            "limits.max_connections: must be an integer >= 1, got 1.5",
        ),
        (
            "[limits]\nmax_connections = true",
            "limits.max_connections: must be an integer >= 1, got true",
        ),
        ("[limits]\nheader_timeout = 0.0", "limits.header_timeout: must be a number > 0, got 0.0"),
        ("[limits]\nheader_timeout = inf", "limits.header_timeout: must be a number > 0, got inf"),
        ("[limits]\nheader_timeout = nan", "limits.header_timeout: must be a number > 0, got nan"),
        (
            '[limits]\nheader_timeout = "1s"',
            'limits.header_timeout: must be a number > 0, got "1s"',
        ),
        (
            "[limits]\nheader_timeout = false",
            "limits.header_timeout: must be a number > 0, got false",
        ),
        ("[tls]\ndefault_site = 7", "tls.default_site: must be a host name string, got 7"),
    ],
)
def test_wrong_values(tmp_path: Path, toml: str, message: str) -> None:
    line = toml.count("\n") + 1
    assert problems(tmp_path, toml + "\n" + SITE) == [f"{line}: {message}"]


def test_limits_accept_integer_timeouts(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[limits]\nheader_timeout = 3\n" + SITE))
    assert config.limits.header_timeout == 3.0
    assert isinstance(config.limits.header_timeout, float)


def test_duplicate_hosts_across_sites_case_insensitively(tmp_path: Path) -> None:
    text = SITE + '[[sites]]\nhosts = ["other.test", "LocalHost."]\nupstreams = ["http://b"]\n'
    text += '[[sites]]\nhosts = ["a.test", "A.TEST"]\nupstreams = ["http://c"]\n'
    assert problems(tmp_path, text) == [
        '5: sites[1].hosts[1]: host "localhost" is already served by sites[0]',
        '8: sites[2].hosts[1]: host "a.test" is already served by sites[2]',
    ]


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("localhost:8443", 'host "localhost:8443" must not include a port'),
        ("[::1]:8443", 'host "[::1]:8443" must not include a port'),
        ("exa mple.test", 'host "exa mple.test" is not a valid DNS name or IP address'),
        ("a.*.example.test", 'host "a.*.example.test" is not a valid DNS name or IP address'),
        ("*.*.example.test", 'host "*.*.example.test" is not a valid DNS name or IP address'),
        ("*.test", 'wildcard "*.test" must stand for a label under a DNS domain'),
        ("under_score.test", 'host "under_score.test" is not a valid DNS name or IP address'),
        ("-lead.test", 'host "-lead.test" is not a valid DNS name or IP address'),
        ("a..b", 'host "a..b" is not a valid DNS name or IP address'),
        ("", 'host "" is not a valid DNS name or IP address'),
        ("256.1.1.1", 'host "256.1.1.1" is not a valid DNS name or IP address'),
        ("a" * 64 + ".test", f'host "{"a" * 64}.test" is not a valid DNS name or IP address'),
    ],
)
def test_bad_hosts(tmp_path: Path, host: str, message: str) -> None:
    text = f'[[sites]]\nhosts = ["ok.test", "{host}"]\nupstreams = ["http://a"]\n'
    assert problems(tmp_path, text) == [f"2: sites[0].hosts[1]: {message}"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8000", 'must be a URL such as "http://127.0.0.1:8000", got "127.0.0.1:8000"'),
        ("ftp://files.test", 'scheme must be http, h2c or https, got "ftp://files.test"'),
        ("http://user:pw@b.test", 'must not contain user info, got "http://user:pw@b.test"'),
        ("http://b.test/api", 'must not have a path, query or fragment, got "http://b.test/api"'),
        ("http://b.test?x=1", 'must not have a path, query or fragment, got "http://b.test?x=1"'),
        ("http://b.test#top", 'must not have a path, query or fragment, got "http://b.test#top"'),
        ("http://:8000", 'must name a host, got "http://:8000"'),
        ("http://b.test:0", 'port must be 1-65535, got "http://b.test:0"'),
        ("http://b.test:70000", 'port must be 1-65535, got "http://b.test:70000"'),
        ("http://b.test:http", 'port must be 1-65535, got "http://b.test:http"'),
    ],
)
def test_bad_upstreams(tmp_path: Path, url: str, message: str) -> None:
    text = f'[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://ok", "{url}"]\n'
    assert problems(tmp_path, text) == [f"3: sites[0].upstreams[1]: {message}"]


def test_site_arrays_are_required_and_non_empty(tmp_path: Path) -> None:
    text = '[[sites]]\nupstreams = []\n[[sites]]\nhosts = "a.test"\nupstreams = ["http://a"]\n'
    assert problems(tmp_path, text) == [
        "1: sites[0].hosts: is required",
        "2: sites[0].upstreams: must be a non-empty array, got an empty array",
        '4: sites[1].hosts: must be a non-empty array, got "a.test"',
    ]


def test_issuer_files_needs_existing_cert_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key.pem").write_text("key")
    text = f"""\
[certs]
issuer = "files"
{SITE}cert = "missing/fullchain.pem"
key = "key.pem"
[[sites]]
hosts = ["b.test"]
upstreams = ["http://b"]
"""
    assert problems(tmp_path, text) == [
        f"6: sites[0].cert: file not found: {tmp_path / 'missing/fullchain.pem'}",
        '8: sites[1].cert: is required with issuer "files"',
        '8: sites[1].key: is required with issuer "files"',
    ]


def test_cert_and_key_only_with_issuer_files(tmp_path: Path) -> None:
    assert problems(tmp_path, SITE + 'cert = "a.pem"\n') == [
        '4: sites[0].cert: is only used with issuer "files" (the site\'s is "local")'
    ]


def test_default_site_must_be_a_configured_host(tmp_path: Path) -> None:
    assert problems(tmp_path, '[tls]\ndefault_site = "Other.test"\n' + SITE) == [
        '2: tls.default_site: "other.test" is not a host of any site'
    ]


def test_hsts_preload_rules(tmp_path: Path) -> None:
    text = "[hsts]\nmax_age = 86400\ninclude_subdomains = false\npreload = true\n" + SITE
    assert problems(tmp_path, text) == [
        "4: hsts.preload: requires include_subdomains = true",
        "4: hsts.preload: requires max_age >= 31536000 (one year), got 86400",
    ]


def test_at_least_one_site(tmp_path: Path) -> None:
    assert problems(tmp_path, 'log_level = "info"\n') == [
        " sites: at least one [[sites]] table is required"
    ]
    assert problems(tmp_path, "sites = []\n") == [
        "1: sites: at least one [[sites]] table is required"
    ]
    assert problems(tmp_path, "[sites]\nhosts = []\n") == [
        "1: sites: must be an array of tables ([[sites]]), got a table"
    ]
    assert problems(tmp_path, 'sites = ["a"]\n') == ['1: sites[0]: must be a table, got "a"']
    assert problems(tmp_path, "[listen]\nhttps = 0\n") == [
        "2: listen.https: must be an integer port 1-65535, got 0",
        " sites: at least one [[sites]] table is required",
    ]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    text = """\
log_level = "loud"
[listen]
https = true
[[sites]]
hosts = ["a.test"]
upstreams = ["ftp://a"]
[[sites]]
hosts = ["A.test"]
upstreams = ["http://b"]
"""
    assert problems(tmp_path, text) == [
        '1: log_level: must be one of "debug", "info", "warning", "error", got "loud"',
        "3: listen.https: must be an integer port 1-65535, got true",
        '6: sites[0].upstreams[0]: scheme must be http, h2c or https, got "ftp://a"',
        '8: sites[1].hosts[0]: host "a.test" is already served by sites[0]',
    ]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda path: path.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_shipped_default_config_is_the_local_demo() -> None:
    config = load_config(CONFIG_DIR / "port443.toml")
    assert config.listen == ListenConfig(addresses=("127.0.0.1",), http=8080, https=8443)
    assert config.certs.issuer == "local"
    [site] = config.sites
    assert site.hosts == ("localhost",)
    assert [upstream.url for upstream in site.upstreams] == ["http://127.0.0.1:8000"]


def test_shipped_configs_exist() -> None:
    names = {path.name for path in CONFIG_DIR.glob("*.toml")}
    assert {"port443.toml", "single-app.toml", "multi-site.toml"} <= names


# -- [acme] and per-site issuers --------------------------------------------------------------


def test_acme_defaults_to_lets_encrypt_production(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[certs]\nissuer = "acme"\n' + SITE))
    assert config.acme == AcmeConfig()
    assert config.acme.directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert config.acme.challenges == ("http-01", "tls-alpn-01")
    assert config.acme.key_type == "ecdsa-p256"
    [site] = config.sites
    assert (site.issuer, config.issuer_of(site)) == (None, "acme")


def test_every_acme_key_and_site_issuers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "a.pem").write_text("cert")
    (tmp_path / "a.key").write_text("key")
    text = f"""\
[certs]
issuer = "acme"
[acme]
directory = "https://acme-staging-v02.api.letsencrypt.org/directory"
email = "admin@example.com"
ca_bundle = "ca.pem"
challenges = ["tls-alpn-01", "http-01"]
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWtleQ"
fallback_directory = "https://acme.zerossl.com/v2/DV90"
key_type = "rsa-2048"
profile = "shortlived"
{SITE}[[sites]]
hosts = ["files.test"]
upstreams = ["http://b"]
issuer = "files"
cert = "a.pem"
key = "a.key"
[[sites]]
hosts = ["local.test"]
upstreams = ["http://c"]
issuer = "local"
"""
    config = load_config(write(tmp_path, text))
    assert config.acme == AcmeConfig(
        directory="https://acme-staging-v02.api.letsencrypt.org/directory",
        email="admin@example.com",
        ca_bundle=tmp_path / "ca.pem",
        challenges=("tls-alpn-01", "http-01"),
        eab_kid="kid-1",
        eab_hmac_key="c2VjcmV0LWtleQ",
        fallback_directory="https://acme.zerossl.com/v2/DV90",
        key_type="rsa-2048",
        profile="shortlived",
    )
    acme, files, local = config.sites
    assert [config.issuer_of(site) for site in config.sites] == ["acme", "files", "local"]
    assert (files.cert, files.key) == (tmp_path / "a.pem", tmp_path / "a.key")
    assert (acme.cert, local.cert) == (None, None)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'directory = "http://acme.test/dir"',
            'acme.directory: must be an https:// URL, got "http://acme.test/dir"',
        ),
        (
            'fallback_directory = "acme.test"',
            'acme.fallback_directory: must be an https:// URL, got "acme.test"',
        ),
        (
            'email = "admin"',
            'acme.email: must be an email address such as "admin@example.com", got "admin"',
        ),
        ("challenges = []", "acme.challenges: must be a non-empty array, got an empty array"),
        (
            'challenges = ["dns-02"]',
            'acme.challenges: must be one of "http-01", "tls-alpn-01", "dns-01", got "dns-02"',
        ),
        (
            'challenges = ["http-01", "http-01"]',
            "acme.challenges: must not repeat a value, got an array",
        ),
        (
            'key_type = "rsa-4096"',
            'acme.key_type: must be one of "ecdsa-p256", "rsa-2048", got "rsa-4096"',
        ),
        ('profile = " "', 'acme.profile: must be a non-empty string, got " "'),
        (
            'eab_kid = "k"\neab_hmac_key = "not base64!"',
            'acme.eab_hmac_key: must be base64url text, as the CA hands it out, got "not base64!"',
        ),
        ('eab_kid = "k"', "acme.eab_kid: needs acme.eab_hmac_key as well"),
        ('eab_hmac_key = "a2V5"', "acme.eab_hmac_key: needs acme.eab_kid as well"),
        (
            'fallback_directory = "https://acme-v02.api.letsencrypt.org/directory"',
            "acme.fallback_directory: must differ from acme.directory",
        ),
        (
            'ca_bundle = "/nonexistent/ca.pem"',
            "acme.ca_bundle: file not found: /nonexistent/ca.pem",
        ),
    ],
)
def test_wrong_acme_values(tmp_path: Path, toml: str, message: str) -> None:
    line = toml.count("\n") + 2
    assert problems(tmp_path, "[acme]\n" + toml + "\n" + SITE) == [f"{line}: {message}"]


def test_http01_alone_needs_the_http_listener(tmp_path: Path) -> None:
    text = '[listen]\nhttp = 0\n[acme]\nchallenges = ["http-01"]\n' + SITE
    assert load_config(write(tmp_path, text)).acme.challenges == ("http-01",)  # no ACME site
    message = 'http-01 needs the HTTP listener, but listen.http = 0: add "tls-alpn-01"'
    assert problems(tmp_path, text + 'issuer = "acme"\n') == [f"4: acme.challenges: {message}"]


def test_site_issuer_is_checked_and_decides_cert_and_key(tmp_path: Path) -> None:
    text = f"""[certs]\nissuer = "files"\n{SITE}issuer = "letsencrypt"\n"""
    assert problems(tmp_path, text) == [
        '3: sites[0].cert: is required with issuer "files"',
        '3: sites[0].key: is required with issuer "files"',
        '6: sites[0].issuer: must be one of "local", "files", "acme", got "letsencrypt"',
    ]
    text = f"""[certs]\nissuer = "files"\n{SITE}issuer = "acme"\n"""
    assert load_config(write(tmp_path, text)).sites[0].issuer == "acme"


def test_upstream_tls_options_go_to_the_https_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = """\
[[sites]]
hosts = ["a.test"]
upstreams = ["https://10.0.0.1:8443", "h2c://grpc.internal:50051"]
upstream_ca = "ca.pem"
upstream_server_name = "Backend.Internal"
"""
    [site] = load_config(write(tmp_path, text)).sites
    https = Upstream("https://10.0.0.1:8443", "https", "10.0.0.1", 8443)
    h2c = Upstream("h2c://grpc.internal:50051", "h2c", "grpc.internal", 50051)
    tls = {"ca": tmp_path / "ca.pem", "server_name": "backend.internal"}
    assert site.upstreams == (dataclasses.replace(https, **tls), h2c)


def test_upstream_tls_option_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    text = """\
[[sites]]
hosts = ["a.test"]
upstreams = ["https://a"]
upstream_ca = "missing.pem"
upstream_server_name = "a:443"
[[sites]]
hosts = ["b.test"]
upstreams = ["https://b"]
upstream_ca = "junk.pem"
[[sites]]
hosts = ["c.test"]
upstreams = ["http://c", "h2c://c"]
upstream_ca = "junk.pem"
upstream_server_name = "c"
"""
    assert problems(tmp_path, text) == [
        f"4: sites[0].upstream_ca: file not found: {tmp_path / 'missing.pem'}",
        '5: sites[0].upstream_server_name: host "a:443" must not include a port',
        f"9: sites[1].upstream_ca: no PEM certificate in {tmp_path / 'junk.pem'}",
        "13: sites[2].upstream_ca: is only used with https:// upstreams",
        "14: sites[2].upstream_server_name: is only used with https:// upstreams",
    ]


def test_http2_defaults_and_every_key(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, SITE)).http2 == Http2Config()
    doubled = {field.name: field.default * 2 for field in dataclasses.fields(Http2Config)}
    toml = "[http2]\n" + "".join(f"{name} = {value}\n" for name, value in doubled.items())
    assert load_config(write(tmp_path, toml + SITE)).http2 == Http2Config(**doubled)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("max_frame_size = 16383", "must be an integer from 16384 to 16777215, got 16383"),
        ("max_frame_size = 16777216", "must be an integer from 16384 to 16777215, got 16777216"),
        ("connection_window_size = 65534", "must be an integer from 65535 to 2147483647, got"),
        ("initial_window_size = 2147483648", "must be an integer from 1 to 2147483647, got"),
        ("max_concurrent_streams = 0", "must be an integer from 1 to 2147483647, got 0"),
        ("max_resets_per_second = 1.5", "must be an integer from 1 to 2147483647, got 1.5"),
        ("max_control_frames_per_second = true", "must be an integer from 1 to 2147483647, got"),
        ("max_streams = 10", 'unknown key (did you mean "max_concurrent_streams"?)'),
    ],
)
def test_wrong_http2_values(tmp_path: Path, toml: str, message: str) -> None:
    [problem] = problems(tmp_path, f"[http2]\n{toml}\n" + SITE)
    assert problem.startswith(f"2: http2.{toml.split()[0]}: {message}")
