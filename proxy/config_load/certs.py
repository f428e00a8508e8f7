"""The certificate tables: [certs], [acme] with [acme.dns], and [storage]."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

from proxy.config import (
    RFC2136,
    AcmeConfig,
    CertsConfig,
    ChallengeType,
    DnsConfig,
    Issuer,
    KeyType,
    ListenConfig,
    SiteConfig,
    StorageBackend,
    StorageConfig,
    TsigAlgorithm,
)
from proxy.config_load import convert
from proxy.config_load.convert import Invalid
from proxy.config_load.reader import Reader, Table
from proxy.toml_lines import KeyPath

_CERTS_KEYS = ("dir", "issuer")
_ACME_KEYS = tuple(f.name for f in dataclasses.fields(AcmeConfig))
_DNS_KEYS = (
    "provider",
    "server",
    "tsig_key_name",
    "tsig_secret",
    "tsig_secret_file",
    "tsig_algorithm",
    "propagation_timeout",
    "propagation_servers",
    "options",
    "credentials_file",
)
_RFC2136_KEYS = ("server", "tsig_key_name", "tsig_secret", "tsig_secret_file", "tsig_algorithm")
_LEXICON_KEYS = ("options", "credentials_file")
_STORAGE_KEYS = tuple(f.name for f in dataclasses.fields(StorageConfig))


class CertSections(Reader):
    """Reads where certificates come from and where they are kept."""

    def _certs(self, root: Table) -> CertsConfig:
        key: KeyPath = ("certs",)
        table = self._section(root, "certs", _CERTS_KEYS)
        default = CertsConfig()
        directory = self._value(table, key, "dir", default.dir.absolute(), convert.path)
        issuers: tuple[Issuer, ...] = get_args(Issuer)
        issuer = self._value(table, key, "issuer", default.issuer, convert.choice(issuers))
        return CertsConfig(directory, issuer)

    def _acme(self, root: Table, listen: ListenConfig, sites: list[SiteConfig]) -> AcmeConfig:
        key: KeyPath = ("acme",)
        table = self._section(root, "acme", _ACME_KEYS)
        default = AcmeConfig()
        challenges: tuple[ChallengeType, ...] = get_args(ChallengeType)
        key_types: tuple[KeyType, ...] = get_args(KeyType)
        acme = AcmeConfig(
            directory=self._value(table, key, "directory", default.directory, convert.https_url),
            email=self._value(table, key, "email", None, convert.email),
            ca_bundle=self._value(table, key, "ca_bundle", None, convert.path),
            challenges=self._value(
                table, key, "challenges", default.challenges, convert.choices(challenges)
            ),
            eab_kid=self._value(table, key, "eab_kid", None, convert.text),
            eab_hmac_key=self._value(table, key, "eab_hmac_key", None, convert.base64url),
            fallback_directory=self._value(
                table, key, "fallback_directory", None, convert.https_url
            ),
            key_type=self._value(
                table, key, "key_type", default.key_type, convert.choice(key_types)
            ),
            profile=self._value(table, key, "profile", None, convert.text),
            dns=self._dns(table),
            on_demand_rate=self._value(
                table, key, "on_demand_rate", default.on_demand_rate, convert.integer(1)
            ),
            on_demand_max_names=self._value(
                table, key, "on_demand_max_names", default.on_demand_max_names, convert.integer(1)
            ),
            on_demand_refusal_ttl=self._value(
                table,
                key,
                "on_demand_refusal_ttl",
                default.on_demand_refusal_ttl,
                convert.positive_number,
            ),
        )
        needs_dns = any("dns-01" in acme.challenges_for(site) for site in sites)
        if needs_dns and "dns" not in table:
            self._problem(key, "dns-01 needs an [acme.dns] table: how to publish the records")
        if acme.ca_bundle is not None:
            self._check_ca_bundle((*key, "ca_bundle"), acme.ca_bundle)
        for name, other in (("eab_kid", "eab_hmac_key"), ("eab_hmac_key", "eab_kid")):
            if name in table and other not in table:
                self._problem((*key, name), f"needs acme.{other} as well")
        if acme.fallback_directory == acme.directory:
            self._problem((*key, "fallback_directory"), "must differ from acme.directory")
        if sites and not listen.http and acme.challenges == ("http-01",):
            self._problem(
                (*key, "challenges"),
                'http-01 needs the HTTP listener, but listen.http = 0: add "tls-alpn-01"',
            )
        return acme

    def _dns(self, acme: Table) -> DnsConfig | None:
        """[acme.dns]: where DNS-01 records are published; None when absent."""
        key: KeyPath = ("acme", "dns")
        table = self._table(acme.get("dns", {}), key, _DNS_KEYS)
        if table is None or "dns" not in acme:
            return None
        provider = self._value(table, key, "provider", RFC2136, self._dns_provider)
        common = DnsConfig(
            provider=provider,
            propagation_timeout=self._value(
                table,
                key,
                "propagation_timeout",
                DnsConfig.propagation_timeout,
                convert.positive_number,
            ),
            propagation_servers=self._value(
                table, key, "propagation_servers", (), convert.dns_servers
            ),
        )
        others = _LEXICON_KEYS if provider == RFC2136 else _RFC2136_KEYS
        for name in others:
            if name in table:
                self._problem((*key, name), f"is not used by provider {provider!r}")
        if provider == RFC2136:
            return self._rfc2136(table, key, common)
        return dataclasses.replace(
            common,
            options=tuple(
                self._value(table, key, "options", dict[str, str](), convert.string_table).items()
            ),
            credentials_file=self._value(table, key, "credentials_file", None, convert.path),
        )

    def _rfc2136(self, table: Table, key: KeyPath, common: DnsConfig) -> DnsConfig:
        """The RFC 2136 keys of [acme.dns]: the primary server and its TSIG key."""
        algorithms: tuple[TsigAlgorithm, ...] = get_args(TsigAlgorithm)
        for name in ("server", "tsig_key_name"):
            if name not in table:
                self._problem((*key, name), "is required")
        secret = self._value(table, key, "tsig_secret", None, convert.base64_secret)
        secret_file = self._value(table, key, "tsig_secret_file", None, convert.path)
        if ("tsig_secret" in table) == ("tsig_secret_file" in table):
            self._problem((*key, "tsig_secret"), "give either tsig_secret or tsig_secret_file")
        elif secret_file is not None:
            secret = self._secret_file((*key, "tsig_secret_file"), secret_file)
        return dataclasses.replace(
            common,
            server=self._value(table, key, "server", common.server, convert.dns_server),
            tsig_key_name=self._value(table, key, "tsig_key_name", ".", convert.text),
            tsig_secret=secret or "",
            tsig_algorithm=self._value(
                table, key, "tsig_algorithm", common.tsig_algorithm, convert.choice(algorithms)
            ),
        )

    @staticmethod
    def _dns_provider(value: object) -> str:
        """The provider: "rfc2136", or the name of one the installed dns-lexicon offers."""
        name = convert.text(value)
        if name == RFC2136:
            return name
        # imported here: dns-lexicon and the DNS client cost ~0.3 s, for these configs only
        from proxy.certs.dns01_lexicon import lexicon_providers

        if name not in lexicon_providers():
            raise convert.Invalid(
                f'must be "rfc2136" or a dns-lexicon provider name (cloudflare, route53, ...),'
                f" got {convert.show(value)}"
            )
        return name

    def _secret_file(self, key: KeyPath, path: Path) -> str | None:
        """The base64 TSIG secret kept alone in `path` (surrounding whitespace ignored)."""
        try:
            return convert.base64_secret(path.read_text(encoding="ascii").strip())
        except OSError as exc:
            self._problem(key, f"cannot read {path}: {exc.strerror or exc}")
        except (UnicodeDecodeError, Invalid):
            self._problem(key, f"{path} must hold only the base64 secret")
        return None

    def _storage(self, root: Table) -> StorageConfig:
        key: KeyPath = ("storage",)
        table = self._section(root, "storage", _STORAGE_KEYS)
        default = StorageConfig()
        backends: tuple[StorageBackend, ...] = get_args(StorageBackend)
        storage = StorageConfig(
            backend=self._value(table, key, "backend", default.backend, convert.choice(backends)),
            url=self._value(table, key, "url", None, convert.redis_url),
            sentinels=self._value(table, key, "sentinels", (), convert.sentinels),
            service_name=self._value(table, key, "service_name", None, convert.text),
            prefix=self._value(table, key, "prefix", default.prefix, convert.text),
            password=self._value(table, key, "password", None, convert.text),
            encryption_key=self._value(table, key, "encryption_key", None, convert.encryption_key),
            encryption_key_file=self._value(table, key, "encryption_key_file", None, convert.path),
            lock_ttl=self._value(table, key, "lock_ttl", default.lock_ttl, convert.lock_ttl),
        )
        if storage.backend != "redis":
            return storage
        if (storage.url is None) == (not storage.sentinels):
            self._problem((*key, "url"), 'backend = "redis" needs exactly one of url, sentinels')
        if bool(storage.sentinels) != (storage.service_name is not None):
            self._problem((*key, "service_name"), "sentinels and service_name go together")
        keys = [k for k in ("encryption_key", "encryption_key_file") if k in table]
        if len(keys) != 1:
            self._problem(
                (*key, "encryption_key"),
                'backend = "redis" needs exactly one of encryption_key, encryption_key_file',
            )
        return storage
