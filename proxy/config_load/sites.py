"""`[[sites]]`: hosts, certificate source and challenge, on-demand TLS, client certificates,
routes or upstreams."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, get_args

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from proxy.config import (
    ChallengeType,
    ClientAuth,
    ClientAuthMode,
    ClientCertHeaders,
    Encode,
    Issuer,
    RequestRate,
    SiteConfig,
    UpstreamGroup,
    is_ip_address,
)
from proxy.config_load import convert
from proxy.config_load.convert import dotted, show
from proxy.config_load.groups import UPSTREAM_TLS_KEYS
from proxy.config_load.reader import Table
from proxy.config_load.routes import ENCODE_KEYS, RouteSections
from proxy.toml_lines import KeyPath

_RATE_KEYS = ("requests_per_second_per_ip", "request_burst_per_ip")  # named as in [limits]
_SITE_KEYS = (
    "hosts", "upstreams", "cert", "key", "issuer", "challenge", *UPSTREAM_TLS_KEYS, "routes",
    "client_ca", "client_auth", "client_crl", "client_cert_headers",
    "on_demand", "ask",
    *ENCODE_KEYS, *_RATE_KEYS,
)  # fmt: skip
_CLIENT_CERT_HEADER_KEYS = tuple(f.name for f in dataclasses.fields(ClientCertHeaders))
_CRL_SIGNING_KEYS = (
    rsa.RSAPublicKey, ec.EllipticCurvePublicKey, dsa.DSAPublicKey,
    ed25519.Ed25519PublicKey, ed448.Ed448PublicKey,
)  # fmt: skip
T = TypeVar("T")


class SiteSections(RouteSections):
    """Reads the sites; a host may be served by one site only."""

    def _sites(
        self, root: Table, issuer: Issuer, groups: dict[str, UpstreamGroup]
    ) -> tuple[SiteConfig, ...]:
        key: KeyPath = ("sites",)
        raw = root.get("sites", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[sites]]), got {show(raw)}")
            return ()
        if not raw:
            self._problem(key, "at least one [[sites]] table is required")
        sites: list[SiteConfig] = []
        served_by: dict[str, KeyPath] = {}
        any_name: KeyPath | None = None  # the on-demand site without hosts
        for index, item in enumerate(raw):
            site_key = (*key, index)
            table = self._table(item, site_key, _SITE_KEYS)
            if table is None:
                continue
            on_demand = self._value(table, site_key, "on_demand", False, convert.boolean)
            hosts: dict[KeyPath, str] = {}
            if not on_demand or "hosts" in table:  # an on-demand site without: any name
                hosts = self._each(table, site_key, "hosts", convert.site_host)
            elif any_name is not None:
                self._problem(site_key, f"{dotted(any_name)} already takes any name on demand")
            else:
                any_name = site_key
            for host_key, host in hosts.items():
                if host in served_by:
                    owner = dotted(served_by[host])
                    self._problem(host_key, f"host {show(host)} is already served by {owner}")
                served_by.setdefault(host, site_key)
            encode = self._encode(table, site_key, Encode())
            routes = self._routes(table, site_key, groups, encode)
            group = None
            if "upstreams" in table or not routes:
                group = self._group(table, site_key, "upstreams", groups, table)
            if group is not None and not isinstance(table.get("upstreams"), str):
                group = dataclasses.replace(group, name=next(iter(hosts.values()), "*"))
            site_issuer = self._value(
                table, site_key, "issuer", None, convert.choice(get_args(Issuer))
            )
            challenge = self._challenge(
                table, site_key, site_issuer or issuer, {} if on_demand else hosts
            )
            ask = self._ask(table, site_key, on_demand, site_issuer or issuer, hosts)
            cert, private_key = (
                self._site_file(table, site_key, name, site_issuer or issuer)
                for name in ("cert", "key")
            )
            sites.append(
                SiteConfig(
                    hosts=tuple(hosts.values()),
                    upstreams=group.upstreams if group else (),
                    cert=cert,
                    key=private_key,
                    issuer=site_issuer,
                    group=group,
                    routes=routes,
                    challenge=challenge,
                    client_auth=self._client_auth(table, site_key),
                    client_cert_headers=self._client_cert_headers(table, site_key),
                    on_demand=on_demand,
                    ask=ask,
                    encode=encode,
                    request_rate=self._request_rate(table, site_key),
                )
            )
        return tuple(sites)

    def _request_rate(self, table: Table, site_key: KeyPath) -> RequestRate | None:
        """The site's own rate per client, overriding [limits]' (0: none for this site)."""
        rate = self._value(
            table, site_key, "requests_per_second_per_ip", None, convert.number_at_least_zero
        )
        burst = self._value(table, site_key, "request_burst_per_ip", None, convert.integer(1))
        if rate is None:
            if burst is not None and "requests_per_second_per_ip" not in table:
                self._problem(
                    (*site_key, "request_burst_per_ip"),
                    "needs the site's requests_per_second_per_ip (the rate it bounds)",
                )
            return None
        return RequestRate(per_second=rate, burst=burst)

    def _ask(
        self,
        table: Table,
        site_key: KeyPath,
        on_demand: bool,
        issuer: Issuer,
        hosts: dict[KeyPath, str],
    ) -> str | None:
        """The endpoint approving on-demand names: required with on_demand, used only there.
        An on-demand site's hosts are the names it accepts (a wildcard: any one label)."""
        ask = self._value(table, site_key, "ask", None, convert.ask_url)
        if not on_demand:
            if "ask" in table:
                self._problem((*site_key, "ask"), "is only used with on_demand = true")
            return ask
        if "ask" not in table:
            self._problem(
                (*site_key, "on_demand"),
                "needs ask: the URL approving each name (GET ?domain=<name>, 200 = yes)",
            )
        if issuer != "acme":
            self._problem((*site_key, "on_demand"), f'needs issuer "acme", not "{issuer}"')
        for host_key, host in hosts.items():
            if is_ip_address(host):
                self._problem(host_key, "on-demand sites take DNS names, not IP addresses")
        return ask

    def _challenge(
        self, table: Table, site_key: KeyPath, issuer: Issuer, hosts: dict[KeyPath, str]
    ) -> ChallengeType | None:
        """The site's own challenge type; a wildcard host can only be validated by dns-01."""
        types: tuple[ChallengeType, ...] = get_args(ChallengeType)
        challenge = self._value(table, site_key, "challenge", None, convert.choice(types))
        if challenge is not None and issuer != "acme":
            self._problem(
                (*site_key, "challenge"), f'is only used with issuer "acme", not "{issuer}"'
            )
        if issuer == "acme" and challenge != "dns-01":
            for host_key, host in hosts.items():
                if host.startswith("*."):
                    self._problem(host_key, f'wildcard {show(host)} needs challenge = "dns-01"')
        return challenge

    def _site_file(self, table: Table, site_key: KeyPath, name: str, issuer: Issuer) -> Path | None:
        """A site's cert or key path: required and existing with issuer "files", else absent."""
        key = (*site_key, name)
        path = self._value(table, site_key, name, None, convert.path)
        if issuer != "files" and name in table:
            self._problem(key, f'is only used with issuer "files" (the site\'s is "{issuer}")')
        elif issuer == "files" and name not in table:
            self._problem(key, 'is required with issuer "files"')
        elif path is not None and not path.is_file():
            self._problem(key, f"file not found: {path}")
        return path

    def _client_auth(self, table: Table, site_key: KeyPath) -> ClientAuth | None:
        """The site's client certificates, with the CA bundle and CRL read as OpenSSL will
        need them: a CRL must come from a CA of the bundle and be current, or OpenSSL
        would refuse every certificate."""
        modes: tuple[ClientAuthMode, ...] = get_args(ClientAuthMode)
        mode = self._value(table, site_key, "client_auth", modes[0], convert.choice(modes))
        if "client_ca" not in table:
            for name in ("client_auth", "client_crl"):
                if name in table:
                    self._problem((*site_key, name), "needs client_ca (the CA bundle)")
            return None
        ca_key, crl_key = (*site_key, "client_ca"), (*site_key, "client_crl")
        ca = self._value(table, site_key, "client_ca", None, convert.path)
        crl = self._value(table, site_key, "client_crl", None, convert.path)
        cas = _read_pem(ca, x509.load_pem_x509_certificates) if ca else None
        if isinstance(cas, str):
            self._problem(ca_key, cas)
        revocations = _read_pem(crl, x509.load_pem_x509_crl) if crl else None
        if isinstance(revocations, str):
            self._problem(crl_key, revocations)
        elif revocations is not None and isinstance(cas, list):
            if not any(_signed_by(revocations, authority) for authority in cas):
                self._problem(crl_key, f"not signed by a CA in {ca}")
            elif (next_update := revocations.next_update_utc) and next_update < _now():
                self._problem(crl_key, f"expired at {next_update} (its next update)")
        return ClientAuth(ca=ca, mode=mode, crl=crl) if ca is not None else None

    def _client_cert_headers(self, table: Table, site_key: KeyPath) -> ClientCertHeaders:
        key = (*site_key, "client_cert_headers")
        inner = self._table(table.get("client_cert_headers", {}), key, _CLIENT_CERT_HEADER_KEYS)
        names = {
            name: self._value(inner or {}, key, name, None, convert.field_name)
            for name in _CLIENT_CERT_HEADER_KEYS
        }
        if names["subject"] is not None and names["subject"] == names["fingerprint"]:
            self._problem((*key, "fingerprint"), "must differ from subject")
        return ClientCertHeaders(**names)


def _now() -> datetime:
    return datetime.now(UTC)


def _read_pem(path: Path, load: Callable[[bytes], T]) -> T | str:
    """The PEM file at `path` parsed by `load`, or what is wrong with it."""
    try:
        return load(path.read_bytes())
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return f"no valid PEM in {path}: {exc}"


def _signed_by(crl: x509.CertificateRevocationList, authority: x509.Certificate) -> bool:
    key = authority.public_key()
    return (
        crl.issuer == authority.subject
        and isinstance(key, _CRL_SIGNING_KEYS)
        and crl.is_signature_valid(key)
    )
