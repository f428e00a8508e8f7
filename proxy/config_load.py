"""TOML config file -> `Config`, or one `ConfigError` listing every problem with its line.

All problems are collected before raising, so a user fixes a config in one pass rather than
one error per attempt; each names the file, line and key (`config/x.toml:3: listen.https: ...`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar, cast, get_args, get_type_hints
from urllib.parse import urlsplit

from proxy.config import (
    AccessLogConfig,
    AccessLogFormat,
    AcmeConfig,
    AdminConfig,
    CertsConfig,
    ChallengeType,
    Config,
    DnsConfig,
    DnsProvider,
    GroupTimeouts,
    HeaderOps,
    HealthConfig,
    HSTSConfig,
    Http2Config,
    IPNetwork,
    Issuer,
    KeyType,
    LimitsConfig,
    ListenConfig,
    Policy,
    Redirect,
    RedirectStatus,
    Respond,
    Route,
    ServerConfig,
    SiteConfig,
    StorageBackend,
    StorageConfig,
    TLSConfig,
    TsigAlgorithm,
    Upstream,
    UpstreamGroup,
    UpstreamScheme,
    is_ip_address,
)
from proxy.routing.routes import shadowing
from proxy.toml_lines import KeyLocator, KeyPath

T = TypeVar("T")
Table = dict[str, object]

_TOP_KEYS = (
    "log_level",
    "server",
    "listen",
    "certs",
    "acme",
    "storage",
    "hsts",
    "limits",
    "tls",
    "http2",
    "access_log",
    "admin",
    "sites",
    "upstream_groups",
    "trusted_proxies",
)
_SERVER_KEYS = ("workers",)
_MAX_WORKERS = 1024
_LISTEN_KEYS = ("address", "http", "https", "http3")
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
)
_STORAGE_KEYS = tuple(f.name for f in dataclasses.fields(StorageConfig))
_HSTS_KEYS = tuple(f.name for f in dataclasses.fields(HSTSConfig))
_LIMITS_TYPES = get_type_hints(LimitsConfig)
_TLS_KEYS = ("default_site",)
_MAX_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1; also a sane ceiling for the other counts
_HTTP2_RANGES: dict[str, tuple[int, int]] = {
    "max_concurrent_streams": (1, _MAX_WINDOW),
    "initial_window_size": (1, _MAX_WINDOW),
    "connection_window_size": (65535, _MAX_WINDOW),  # windows start at 65535 and only grow
    "max_frame_size": (16384, 16777215),  # RFC 9113 §6.5.2
    "max_header_list_size": (1, _MAX_WINDOW),
    "max_resets_per_second": (1, _MAX_WINDOW),
    "max_control_frames_per_second": (1, _MAX_WINDOW),
    "stall_timeout": (1, 3600),
}
_ACCESS_LOG_KEYS = tuple(f.name for f in dataclasses.fields(AccessLogConfig))
_ADMIN_KEYS = tuple(f.name for f in dataclasses.fields(AdminConfig))
_UPSTREAM_TLS_KEYS = ("upstream_ca", "upstream_server_name")
_SITE_KEYS = (
    "hosts", "upstreams", "cert", "key", "issuer", "challenge", *_UPSTREAM_TLS_KEYS, "routes",
)  # fmt: skip
_GROUP_KEYS = (
    "backends", "policy", "hash_key", "health", "timeouts", "retries", "retry_deadline",
    *_UPSTREAM_TLS_KEYS,
)  # fmt: skip
_NAMED_GROUP_KEYS = ("name", *_GROUP_KEYS)
_BACKEND_KEYS = ("url", "weight")
_HEALTH_TYPES = get_type_hints(HealthConfig)
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(GroupTimeouts))
_ROUTE_KEYS = (
    "path_prefix", "path", "methods", "header", "strip_prefix", "rewrite",
    "upstreams", "redirect", "status", "respond", "request_headers", "response_headers",
)  # fmt: skip
_ACTIONS = ("upstreams", "redirect", "respond")
_HEADER_MATCH_KEYS = ("name", "value")
_RESPOND_KEYS = tuple(f.name for f in dataclasses.fields(Respond))
_HEADER_OPS_KEYS = ("remove", "set", "add")
_HASH_KEY = re.compile(r"client_ip|(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_PATH = re.compile(r"/[\x21\x22\x24-\x3e\x40-\x7e]*")  # visible ASCII, no ? or #
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_LIMITS_ZERO_ALLOWED = frozenset(
    {"shutdown_delay", "fd_reserve", "max_connections_per_ip", "requests_per_second_per_ip"}
)

_LOG_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_PORTS: dict[UpstreamScheme, int] = {"http": 80, "h2c": 80, "https": 443}
_PRELOAD_MIN_AGE = 31536000  # one year: hstspreload.org's minimum
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_HOST_WITH_PORT = re.compile(r"[^:]+:\d*|\[[^\]]*\]:\d*")
_TOML_ERROR_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+=*")


class ConfigError(Exception):
    """The config file is unusable; `problems` holds one `FILE:LINE: key: message` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Invalid(ValueError):
    """A value failed a check; the message is reported against the value's key."""


def load_config(path: Path) -> Config:
    """Read and validate the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: config is not UTF-8: {exc}"]) from exc
    return parse_config(text, path)


def parse_config(text: str, path: Path) -> Config:
    """Validate TOML `text`; `path` is only used in messages and as `Config.path`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_ERROR_LINE.search(str(exc))
        line = match.group(1) if match else max(1, len(text.splitlines()))
        raise ConfigError([f"{path}:{line}: invalid TOML: {exc}"]) from None
    reader = _Reader(path, KeyLocator(text))
    config = reader.config(data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Reader:
    """Walks the parsed TOML tree into the model, collecting problems instead of raising."""

    def __init__(self, path: Path, locator: KeyLocator) -> None:
        self._path = path
        self._locator = locator
        self._problems: list[tuple[float, str]] = []  # (line, message); no line sorts last
        self.warnings: list[str] = []  # the config works, but probably not as meant

    @property
    def problems(self) -> list[str]:
        """Every problem found, in file order."""
        return [message for _, message in sorted(self._problems, key=lambda found: found[0])]

    def config(self, data: Table) -> Config:
        """The model built from `data`; meaningless if any problem was found."""
        root = self._table(data, (), _TOP_KEYS) or {}
        log_level = self._value(root, (), "log_level", "info", _choice(_LOG_LEVELS))
        certs = self._certs(root)
        groups = self._named_groups(root)
        sites = self._sites(root, certs.issuer, groups)
        listen = self._listen(root)
        acme_sites = [site for site in sites if (site.issuer or certs.issuer) == "acme"]
        return Config(
            path=self._path,
            server=self._server(root),
            listen=listen,
            certs=certs,
            acme=self._acme(root, listen, acme_sites),
            storage=self._storage(root),
            hsts=self._hsts(root),
            limits=self._limits(root),
            tls=self._tls(root, sites),
            http2=self._http2(root),
            access_log=self._access_log(root),
            admin=self._admin(root, listen),
            sites=sites,
            log_level=log_level,
            trusted_proxies=self._value(root, (), "trusted_proxies", (), _networks),
            warnings=tuple(self.warnings),
        )

    def _server(self, root: Table) -> ServerConfig:
        table = self._section(root, "server", _SERVER_KEYS)
        workers = self._value(table, ("server",), "workers", ServerConfig().workers, _workers)
        return ServerConfig(workers=workers)

    def _listen(self, root: Table) -> ListenConfig:
        key: KeyPath = ("listen",)
        table = self._section(root, "listen", _LISTEN_KEYS)
        default = ListenConfig()
        addresses = self._value(table, key, "address", default.addresses, _ip_addresses)
        http = self._value(table, key, "http", default.http, _port(0))
        https = self._value(table, key, "https", default.https, _port(1))
        if http == https:
            self._problem((*key, "http"), f"must differ from listen.https (both are {https})")
        http3 = self._value(table, key, "http3", default.http3, _boolean)
        return ListenConfig(addresses=addresses, http=http, https=https, http3=http3)

    def _certs(self, root: Table) -> CertsConfig:
        key: KeyPath = ("certs",)
        table = self._section(root, "certs", _CERTS_KEYS)
        default = CertsConfig()
        directory = self._value(table, key, "dir", default.dir.absolute(), _path)
        issuers: tuple[Issuer, ...] = get_args(Issuer)
        issuer = self._value(table, key, "issuer", default.issuer, _choice(issuers))
        return CertsConfig(directory, issuer)

    def _acme(self, root: Table, listen: ListenConfig, sites: list[SiteConfig]) -> AcmeConfig:
        key: KeyPath = ("acme",)
        table = self._section(root, "acme", _ACME_KEYS)
        default = AcmeConfig()
        challenges: tuple[ChallengeType, ...] = get_args(ChallengeType)
        key_types: tuple[KeyType, ...] = get_args(KeyType)
        acme = AcmeConfig(
            directory=self._value(table, key, "directory", default.directory, _https_url),
            email=self._value(table, key, "email", None, _email),
            ca_bundle=self._value(table, key, "ca_bundle", None, _path),
            challenges=self._value(
                table, key, "challenges", default.challenges, _choices(challenges)
            ),
            eab_kid=self._value(table, key, "eab_kid", None, _text),
            eab_hmac_key=self._value(table, key, "eab_hmac_key", None, _base64url),
            fallback_directory=self._value(table, key, "fallback_directory", None, _https_url),
            key_type=self._value(table, key, "key_type", default.key_type, _choice(key_types)),
            profile=self._value(table, key, "profile", None, _text),
            dns=self._dns(table),
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
        providers: tuple[DnsProvider, ...] = get_args(DnsProvider)
        algorithms: tuple[TsigAlgorithm, ...] = get_args(TsigAlgorithm)
        for name in ("server", "tsig_key_name"):
            if name not in table:
                self._problem((*key, name), "is required")
        secret = self._value(table, key, "tsig_secret", None, _base64)
        secret_file = self._value(table, key, "tsig_secret_file", None, _path)
        if ("tsig_secret" in table) == ("tsig_secret_file" in table):
            self._problem((*key, "tsig_secret"), "give either tsig_secret or tsig_secret_file")
        elif secret_file is not None:
            secret = self._secret_file((*key, "tsig_secret_file"), secret_file)
        default = DnsConfig(server=("127.0.0.1", 53), tsig_key_name=".", tsig_secret="")
        return DnsConfig(
            provider=self._value(table, key, "provider", default.provider, _choice(providers)),
            server=self._value(table, key, "server", default.server, _dns_server),
            tsig_key_name=self._value(table, key, "tsig_key_name", ".", _text),
            tsig_secret=secret or "",
            tsig_algorithm=self._value(
                table, key, "tsig_algorithm", default.tsig_algorithm, _choice(algorithms)
            ),
            propagation_timeout=self._value(
                table, key, "propagation_timeout", default.propagation_timeout, _positive_number
            ),
            propagation_servers=self._value(table, key, "propagation_servers", (), _dns_servers),
        )

    def _secret_file(self, key: KeyPath, path: Path) -> str | None:
        """The base64 TSIG secret kept alone in `path` (surrounding whitespace ignored)."""
        try:
            return _base64(path.read_text(encoding="ascii").strip())
        except OSError as exc:
            self._problem(key, f"cannot read {path}: {exc.strerror or exc}")
        except (UnicodeDecodeError, _Invalid):
            self._problem(key, f"{path} must hold only the base64 secret")
        return None

    def _storage(self, root: Table) -> StorageConfig:
        key: KeyPath = ("storage",)
        table = self._section(root, "storage", _STORAGE_KEYS)
        default = StorageConfig()
        backends: tuple[StorageBackend, ...] = get_args(StorageBackend)
        storage = StorageConfig(
            backend=self._value(table, key, "backend", default.backend, _choice(backends)),
            url=self._value(table, key, "url", None, _redis_url),
            prefix=self._value(table, key, "prefix", default.prefix, _text),
            password=self._value(table, key, "password", None, _text),
            encryption_key=self._value(table, key, "encryption_key", None, _encryption_key),
            encryption_key_file=self._value(table, key, "encryption_key_file", None, _path),
            lock_ttl=self._value(table, key, "lock_ttl", default.lock_ttl, _lock_ttl),
        )
        if storage.backend != "redis":
            return storage
        if storage.url is None:
            self._problem((*key, "url"), 'is required with backend = "redis"')
        keys = [k for k in ("encryption_key", "encryption_key_file") if k in table]
        if len(keys) != 1:
            self._problem(
                (*key, "encryption_key"),
                'backend = "redis" needs exactly one of encryption_key, encryption_key_file',
            )
        return storage

    def _hsts(self, root: Table) -> HSTSConfig:
        key: KeyPath = ("hsts",)
        table = self._section(root, "hsts", _HSTS_KEYS)
        default = HSTSConfig()
        hsts = HSTSConfig(
            max_age=self._value(table, key, "max_age", default.max_age, _integer(0)),
            include_subdomains=self._value(
                table, key, "include_subdomains", default.include_subdomains, _boolean
            ),
            preload=self._value(table, key, "preload", default.preload, _boolean),
        )
        if hsts.preload and not hsts.include_subdomains:
            self._problem((*key, "preload"), "requires include_subdomains = true")
        if hsts.preload and hsts.max_age < _PRELOAD_MIN_AGE:
            self._problem(
                (*key, "preload"),
                f"requires max_age >= {_PRELOAD_MIN_AGE} (one year), got {hsts.max_age}",
            )
        return hsts

    def _limits(self, root: Table) -> LimitsConfig:
        key: KeyPath = ("limits",)
        table = self._section(root, "limits", _LIMITS_TYPES)
        default = LimitsConfig()
        values: dict[str, Any] = {
            name: self._value(
                table,
                key,
                name,
                getattr(default, name),
                _limit_converter(kind, zero_allowed=name in _LIMITS_ZERO_ALLOWED),
            )
            for name, kind in _LIMITS_TYPES.items()
        }
        return LimitsConfig(**values)

    def _access_log(self, root: Table) -> AccessLogConfig:
        key: KeyPath = ("access_log",)
        table = self._section(root, "access_log", _ACCESS_LOG_KEYS)
        default = AccessLogConfig()
        formats: tuple[AccessLogFormat, ...] = get_args(AccessLogFormat)
        path = self._value(table, key, "path", default.path, _optional_path)
        if path is not None and not path.parent.is_dir():
            self._problem((*key, "path"), f"directory not found: {path.parent}")
        return AccessLogConfig(
            enabled=self._value(table, key, "enabled", default.enabled, _boolean),
            format=self._value(table, key, "format", default.format, _choice(formats)),
            path=path,
        )

    def _admin(self, root: Table, listen: ListenConfig) -> AdminConfig:
        key: KeyPath = ("admin",)
        table = self._section(root, "admin", _ADMIN_KEYS)
        default = AdminConfig()
        token_file = self._value(table, key, "token_file", None, _path)
        admin = AdminConfig(
            enabled=self._value(table, key, "enabled", default.enabled, _boolean),
            address=self._value(table, key, "address", default.address, _ip_address),
            port=self._value(table, key, "port", default.port, _port(1)),
            token=self._value(table, key, "token", None, _text),
            token_file=token_file,
        )
        if token_file is not None:
            if admin.token is not None:
                self._problem((*key, "token_file"), "set admin.token or admin.token_file, not both")
            try:  # surrounding whitespace (a trailing newline) is no part of it
                token = _text(token_file.read_text(encoding="utf-8").strip())
                admin = dataclasses.replace(admin, token=token)
            except (OSError, UnicodeDecodeError, _Invalid) as exc:
                self._problem((*key, "token_file"), f"cannot read a token from it: {exc}")
        if admin.enabled and admin.port in (listen.http, listen.https):
            self._problem((*key, "port"), "must differ from listen.http and listen.https")
        return admin

    def _http2(self, root: Table) -> Http2Config:
        key: KeyPath = ("http2",)
        table = self._section(root, "http2", _HTTP2_RANGES)
        default = Http2Config()
        values = {
            name: self._value(table, key, name, getattr(default, name), _integer_between(*bounds))
            for name, bounds in _HTTP2_RANGES.items()
        }
        return Http2Config(**values)

    def _tls(self, root: Table, sites: tuple[SiteConfig, ...]) -> TLSConfig:
        key: KeyPath = ("tls",)
        table = self._section(root, "tls", _TLS_KEYS)
        default_site = self._value(table, key, "default_site", None, _host)
        hosts = [host for site in sites for host in site.hosts]
        if default_site is not None and hosts and default_site not in hosts:
            self._problem(
                (*key, "default_site"), f"{_show(default_site)} is not a host of any site"
            )
        return TLSConfig(default_site)

    def _sites(
        self, root: Table, issuer: Issuer, groups: dict[str, UpstreamGroup]
    ) -> tuple[SiteConfig, ...]:
        key: KeyPath = ("sites",)
        raw = root.get("sites", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[sites]]), got {_show(raw)}")
            return ()
        if not raw:
            self._problem(key, "at least one [[sites]] table is required")
        sites: list[SiteConfig] = []
        served_by: dict[str, KeyPath] = {}
        for index, item in enumerate(raw):
            site_key = (*key, index)
            table = self._table(item, site_key, _SITE_KEYS)
            if table is None:
                continue
            hosts = self._each(table, site_key, "hosts", _site_host)
            for host_key, host in hosts.items():
                if host in served_by:
                    owner = _dotted(served_by[host])
                    self._problem(host_key, f"host {_show(host)} is already served by {owner}")
                served_by.setdefault(host, site_key)
            routes = self._routes(table, site_key, groups)
            group = None
            if "upstreams" in table or not routes:
                group = self._group(table, site_key, "upstreams", groups, table)
            if group is not None and not isinstance(table.get("upstreams"), str):
                group = dataclasses.replace(group, name=next(iter(hosts.values()), ""))
            site_issuer = self._value(table, site_key, "issuer", None, _choice(get_args(Issuer)))
            challenge = self._challenge(table, site_key, site_issuer or issuer, hosts)
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
                )
            )
        return tuple(sites)

    def _named_groups(self, root: Table) -> dict[str, UpstreamGroup]:
        """`[[upstream_groups]]`: groups that routes and sites name."""
        key: KeyPath = ("upstream_groups",)
        raw = root.get("upstream_groups", [])
        if not isinstance(raw, list):
            self._problem(
                key, f"must be an array of tables ([[upstream_groups]]), got {_show(raw)}"
            )
            return {}
        groups: dict[str, UpstreamGroup] = {}
        for index, item in enumerate(raw):
            group_key = (*key, index)
            table = self._table(item, group_key, _NAMED_GROUP_KEYS)
            if table is None:
                continue
            name = self._value(table, group_key, "name", "", _text)
            if not name:
                self._problem((*group_key, "name"), "is required")
            elif name in groups:
                self._problem((*group_key, "name"), f"group {_show(name)} is defined twice")
            group = self._group_table(table, group_key, name, table)
            if group is not None and name:
                groups[name] = group
        return groups

    def _group(
        self,
        table: Table,
        key: KeyPath,
        name: str,
        groups: dict[str, UpstreamGroup],
        tls: Table,
    ) -> UpstreamGroup | None:
        """`table[name]`: an array of backends, a group table, or a named group's name;
        https backends take upstream_ca / upstream_server_name from `tls`."""
        value = table.get(name)
        group_key = (*key, name)
        if isinstance(value, str):
            if value not in groups:
                self._problem(group_key, f"no [[upstream_groups]] entry is named {_show(value)}")
            return groups.get(value)
        if isinstance(value, dict):
            inner = self._table(value, group_key, _GROUP_KEYS)
            return None if inner is None else self._group_table(inner, group_key, _dotted(key), tls)
        backends = self._backends(table, key, name, tls)
        return UpstreamGroup(name=_dotted(key), upstreams=backends[0], weights=backends[1])

    def _group_table(self, table: Table, key: KeyPath, name: str, tls: Table) -> UpstreamGroup:
        upstreams, weights = self._backends(table, key, "backends", {**tls, **table})
        policies: tuple[Policy, ...] = get_args(Policy)
        default = UpstreamGroup(name=name, upstreams=upstreams)
        policy = self._value(table, key, "policy", default.policy, _choice(policies))
        hash_key = self._value(table, key, "hash_key", default.hash_key, _hash_key)
        if "hash_key" in table and policy != "consistent_hash":
            self._problem((*key, "hash_key"), 'is only used with policy = "consistent_hash"')
        return UpstreamGroup(
            name=name,
            upstreams=upstreams,
            weights=weights,
            policy=policy,
            hash_key=hash_key,
            health=self._health(table, key),
            timeouts=self._timeouts(table, key),
            retries=self._value(table, key, "retries", default.retries, _integer(0)),
            retry_deadline=self._value(
                table, key, "retry_deadline", default.retry_deadline, _positive_number
            ),
        )

    def _backends(
        self, table: Table, key: KeyPath, name: str, tls: Table
    ) -> tuple[tuple[Upstream, ...], tuple[int, ...]]:
        """The backends and their weights (all 1: no weights)."""
        backends = list(self._each(table, key, name, _backend).values())
        upstreams = self._upstream_tls(tls, key, [upstream for upstream, _ in backends])
        weights = tuple(weight for _, weight in backends)
        return upstreams, weights if any(weight != 1 for weight in weights) else ()

    def _health(self, table: Table, key: KeyPath) -> HealthConfig:
        health_key = (*key, "health")
        inner = self._table(table.get("health", {}), health_key, _HEALTH_TYPES) or {}
        default = HealthConfig()
        converters: dict[str, Callable[[object], Any]] = {
            "path": _request_path,
            "status": _integer_between(100, 599),
            "host": _host,
        }
        values: dict[str, Any] = {
            name: self._value(
                inner,
                health_key,
                name,
                getattr(default, name),
                converters.get(name) or (_integer(1) if kind is int else _positive_number),
            )
            for name, kind in _HEALTH_TYPES.items()
        }
        return HealthConfig(**values)

    def _timeouts(self, table: Table, key: KeyPath) -> GroupTimeouts:
        timeouts_key = (*key, "timeouts")
        inner = self._table(table.get("timeouts", {}), timeouts_key, _TIMEOUT_KEYS) or {}
        values = {
            name: self._value(inner, timeouts_key, name, None, _positive_number)
            for name in _TIMEOUT_KEYS
        }
        return GroupTimeouts(**values)

    def _routes(
        self, site: Table, site_key: KeyPath, groups: dict[str, UpstreamGroup]
    ) -> tuple[Route, ...]:
        key = (*site_key, "routes")
        raw = site.get("routes", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[sites.routes]]), got {_show(raw)}")
            return ()
        routes: list[Route] = []
        for index, item in enumerate(raw):
            table = self._table(item, (*key, index), _ROUTE_KEYS)
            if table is not None:
                route = self._route(table, (*key, index), groups, site)
                if route is not None:
                    routes.append(route)
        for shadowed, by in shadowing(routes):
            line = self._locator.line((*key, shadowed))
            where = f"{self._path}:{line}" if line else str(self._path)
            self.warnings.append(
                f"{where}: {_dotted((*key, shadowed))}: never matches: "
                f"{_dotted((*key, by))} above it matches every request it would"
            )
        return tuple(routes)

    def _route(
        self, table: Table, key: KeyPath, groups: dict[str, UpstreamGroup], site: Table
    ) -> Route | None:
        actions = [name for name in _ACTIONS if name in table]
        if len(actions) != 1:
            found = ", ".join(actions) or "none"
            self._problem(
                key, f"needs exactly one action of upstreams, redirect, respond ({found})"
            )
            return None
        if "path" in table and "path_prefix" in table:
            self._problem((*key, "path"), "use path or path_prefix, not both")
        if "status" in table and "redirect" not in table:
            self._problem((*key, "status"), "is only used with redirect")
        action: UpstreamGroup | Redirect | Respond | None
        if "redirect" in table:
            statuses: tuple[RedirectStatus, ...] = get_args(RedirectStatus)
            action = Redirect(
                target=self._value(table, key, "redirect", "/", _text),
                status=self._value(table, key, "status", 302, _choice(statuses)),
            )
        elif "respond" in table:
            action = self._respond(table, key)
        else:
            action = self._group(table, key, "upstreams", groups, site)
        prefix = self._value(table, key, "path_prefix", None, _request_path)
        path = self._value(table, key, "path", None, _request_path)
        strip = self._value(table, key, "strip_prefix", False, _boolean)
        rewrite = self._value(table, key, "rewrite", None, _request_path)
        if (strip or rewrite is not None) and prefix is None and path is None:
            self._problem(
                (*key, "strip_prefix" if strip else "rewrite"), "needs path_prefix or path"
            )
        if action is None:
            return None
        return Route(
            action=action,
            path_prefix=prefix,
            path=path,
            methods=self._value(table, key, "methods", None, _methods),
            header=self._header_match(table, key),
            strip_prefix=strip,
            rewrite=rewrite,
            request_headers=self._header_ops(table, key, "request_headers"),
            response_headers=self._header_ops(table, key, "response_headers"),
        )

    def _respond(self, table: Table, key: KeyPath) -> Respond:
        respond_key = (*key, "respond")
        inner = self._table(table["respond"], respond_key, _RESPOND_KEYS) or {}
        default = Respond()
        return Respond(
            status=self._value(inner, respond_key, "status", 200, _integer_between(200, 599)),
            body=self._value(inner, respond_key, "body", "", _string),
            content_type=self._value(
                inner, respond_key, "content_type", default.content_type, _field_value
            ),
        )

    def _header_match(self, table: Table, key: KeyPath) -> tuple[bytes, bytes | None] | None:
        if "header" not in table:
            return None
        header_key = (*key, "header")
        inner = self._table(table["header"], header_key, _HEADER_MATCH_KEYS) or {}
        name = self._value(inner, header_key, "name", b"", _field_name)
        if not name:
            self._problem((*header_key, "name"), "is required")
        value = self._value(inner, header_key, "value", None, _field_value)
        return name, value.encode("latin-1") if value is not None else None

    def _header_ops(self, table: Table, key: KeyPath, name: str) -> HeaderOps:
        ops_key = (*key, name)
        inner = self._table(table.get(name, {}), ops_key, _HEADER_OPS_KEYS) or {}
        default = HeaderOps()
        remove = self._value(inner, ops_key, "remove", default.remove, _field_names)
        edits = {op: self._value(inner, ops_key, op, default.add, _fields) for op in ("set", "add")}
        return HeaderOps(remove=remove, set=edits["set"], add=edits["add"])

    def _challenge(
        self, table: Table, site_key: KeyPath, issuer: Issuer, hosts: dict[KeyPath, str]
    ) -> ChallengeType | None:
        """The site's own challenge type; a wildcard host can only be validated by dns-01."""
        types: tuple[ChallengeType, ...] = get_args(ChallengeType)
        challenge = self._value(table, site_key, "challenge", None, _choice(types))
        if challenge is not None and issuer != "acme":
            self._problem(
                (*site_key, "challenge"), f'is only used with issuer "acme", not "{issuer}"'
            )
        if issuer == "acme" and challenge != "dns-01":
            for host_key, host in hosts.items():
                if host.startswith("*."):
                    self._problem(host_key, f'wildcard {_show(host)} needs challenge = "dns-01"')
        return challenge

    def _upstream_tls(
        self, table: Table, site_key: KeyPath, upstreams: Collection[Upstream]
    ) -> tuple[Upstream, ...]:
        """A group's upstreams, the https ones carrying upstream_ca and upstream_server_name
        of `table` (part of an Upstream's identity: pools are keyed by it)."""
        ca = self._value(table, site_key, "upstream_ca", None, _path)
        server_name = self._value(table, site_key, "upstream_server_name", None, _host)
        if upstreams and not any(upstream.scheme == "https" for upstream in upstreams):
            for name in ("upstream_ca", "upstream_server_name"):
                if name in table:
                    self._problem((*site_key, name), "is only used with https:// upstreams")
        elif ca is not None:
            self._check_ca_bundle((*site_key, "upstream_ca"), ca)
        return tuple(
            dataclasses.replace(upstream, ca=ca, server_name=server_name)
            if upstream.scheme == "https"
            else upstream
            for upstream in upstreams
        )

    def _check_ca_bundle(self, key: KeyPath, ca: Path) -> None:
        """Load the bundle as the upstream connections will, so a bad one fails at start."""
        if not ca.is_file():
            self._problem(key, f"file not found: {ca}")
            return
        try:
            ssl.create_default_context(cafile=ca)
        except ssl.SSLError:
            self._problem(key, f"no PEM certificate in {ca}")
        except OSError as exc:
            self._problem(key, f"cannot read {ca}: {exc.strerror or exc}")

    def _site_file(self, table: Table, site_key: KeyPath, name: str, issuer: Issuer) -> Path | None:
        """A site's cert or key path: required and existing with issuer "files", else absent."""
        key = (*site_key, name)
        path = self._value(table, site_key, name, None, _path)
        if issuer != "files" and name in table:
            self._problem(key, f'is only used with issuer "files" (the site\'s is "{issuer}")')
        elif issuer == "files" and name not in table:
            self._problem(key, 'is required with issuer "files"')
        elif path is not None and not path.is_file():
            self._problem(key, f"file not found: {path}")
        return path

    # -- generic checks -------------------------------------------------------------------

    def _problem(self, key: KeyPath, message: str) -> None:
        line = self._locator.line(key)
        where = f"{self._path}:{line}" if line else str(self._path)
        self._problems.append((line or math.inf, f"{where}: {_dotted(key)}: {message}"))

    def _section(self, root: Table, name: str, known: Collection[str]) -> Table:
        """The top-level table `name`; empty when absent or not a table."""
        return self._table(root.get(name, {}), (name,), known) or {}

    def _table(self, value: object, key: KeyPath, known: Collection[str]) -> Table | None:
        """`value` as a table after reporting its unknown keys; None if it is not a table."""
        if not isinstance(value, dict):
            self._problem(key, f"must be a table, got {_show(value)}")
            return None
        for name in value:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self._problem((*key, name), f"unknown key{hint}")
        return value

    def _value(
        self, table: Table, key: KeyPath, name: str, default: T, convert: Callable[[object], T]
    ) -> T:
        """`table[name]` converted, or `default` when absent or invalid (then reported)."""
        if name not in table:
            return default
        try:
            return convert(table[name])
        except _Invalid as exc:
            self._problem((*key, name), str(exc))
            return default

    def _each(
        self, table: Table, key: KeyPath, name: str, convert: Callable[[object], T]
    ) -> dict[KeyPath, T]:
        """The required non-empty array `table[name]`, converted, keyed by element key path.

        Bad elements are reported at their own index (`sites[0].hosts[2]`) and left out.
        """
        array_key = (*key, name)
        raw = table.get(name)
        if raw is None:
            self._problem(array_key, "is required")
            return {}
        if not isinstance(raw, list) or not raw:
            self._problem(array_key, f"must be a non-empty array, got {_show(raw)}")
            return {}
        converted: dict[KeyPath, T] = {}
        for index, element in enumerate(raw):
            try:
                converted[(*array_key, index)] = convert(element)
            except _Invalid as exc:
                self._problem((*array_key, index), str(exc))
        return converted


# -- converters: value -> model value, or raise _Invalid ------------------------------------


def _choice(options: tuple[T, ...]) -> Callable[[object], T]:
    def convert(value: object) -> T:
        for option in options:
            if value == option:
                return option
        shown = ", ".join(_show(option) for option in options)
        raise _Invalid(f"must be one of {shown}, got {_show(value)}")

    return convert


def _choices(options: tuple[T, ...]) -> Callable[[object], tuple[T, ...]]:
    """A non-empty array of distinct `options`, order kept (a preference)."""
    one = _choice(options)

    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list) or not value:
            raise _Invalid(f"must be a non-empty array, got {_show(value)}")
        chosen = tuple(one(element) for element in value)
        if len(set(chosen)) < len(chosen):
            raise _Invalid(f"must not repeat a value, got {_show(value)}")
        return chosen

    return convert


def _port(low: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and low <= value <= 65535:
            return value
        raise _Invalid(f"must be an integer port {low}-65535, got {_show(value)}")

    return convert


def _integer_between(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and low <= value <= high:
            return value
        raise _Invalid(f"must be an integer from {low} to {high}, got {_show(value)}")

    return convert


def _integer(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and value >= minimum:
            return value
        raise _Invalid(f"must be an integer >= {minimum}, got {_show(value)}")

    return convert


def _backend(value: object) -> tuple[Upstream, int]:
    """A backend: its URL, or a table { url = "...", weight = 2 }."""
    if not isinstance(value, dict):
        return _upstream(value), 1
    unknown = [name for name in value if name not in _BACKEND_KEYS]
    if unknown:
        raise _Invalid(f"unknown key {_show(unknown[0])} (a backend has url and weight)")
    if "url" not in value:
        raise _Invalid('a backend table needs url = "http://..."')
    return _upstream(value["url"]), _integer_between(1, 1000)(value.get("weight", 1))


def _networks(value: object) -> tuple[IPNetwork, ...]:
    """An array of CIDRs ("10.0.0.0/8") or single addresses."""
    if not isinstance(value, list):
        raise _Invalid(f'must be an array of CIDRs such as "10.0.0.0/8", got {_show(value)}')
    try:
        return tuple(ipaddress.ip_network(str(item), strict=False) for item in value)
    except ValueError as exc:
        raise _Invalid(f"must be an array of CIDRs: {exc}") from None


def _request_path(value: object) -> str:
    if isinstance(value, str) and _REQUEST_PATH.fullmatch(value):
        return value
    raise _Invalid(f'must be a path starting with "/", without query, got {_show(value)}')


def _methods(value: object) -> frozenset[bytes]:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, str) and _TOKEN.fullmatch(m) for m in value)
    ):
        return frozenset(str(m).upper().encode("ascii") for m in value)
    raise _Invalid(
        f'must be a non-empty array of methods such as ["GET", "HEAD"], got {_show(value)}'
    )


def _hash_key(value: object) -> str:
    if isinstance(value, str) and _HASH_KEY.fullmatch(value):
        return value
    raise _Invalid(f'must be "client_ip", "header:<name>" or "cookie:<name>", got {_show(value)}')


def _string(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"must be a string, got {_show(value)}")


def _field_name(value: object) -> bytes:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value.lower().encode("ascii")
    raise _Invalid(f"must be a header field name, got {_show(value)}")


def _field_value(value: object) -> str:
    if isinstance(value, str) and _FIELD_VALUE.fullmatch(value) and value == value.strip():
        try:
            value.encode("latin-1")
            return value
        except UnicodeEncodeError:
            pass
    raise _Invalid(f"must be a header field value (no control characters), got {_show(value)}")


def _field_names(value: object) -> tuple[bytes, ...]:
    if isinstance(value, list):
        return tuple(_field_name(name) for name in value)
    raise _Invalid(f"must be an array of header names, got {_show(value)}")


def _fields(value: object) -> tuple[tuple[bytes, bytes], ...]:
    """A table of header fields, { "X-Name" = "value" }."""
    if not isinstance(value, dict):
        raise _Invalid(f'must be a table such as {{ "X-Name" = "value" }}, got {_show(value)}')
    return tuple(
        (_field_name(name), _field_value(text).encode("latin-1")) for name, text in value.items()
    )


def _limit_converter(kind: object, *, zero_allowed: bool) -> Callable[[object], Any]:
    """[limits] values are counts (integers) or seconds and rates (numbers); 0 means "off"
    or "none" only where the key allows it."""
    if kind is int:
        return _integer(0 if zero_allowed else 1)
    return _number_at_least_zero if zero_allowed else _positive_number


def _workers(value: object) -> int:
    """A worker count, or "auto": one per CPU this process may run on (its affinity mask,
    which taskset and container cpusets narrow)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if type(value) is int and 1 <= value <= _MAX_WORKERS:
        return value
    raise _Invalid(f'must be "auto" or an integer from 1 to {_MAX_WORKERS}, got {_show(value)}')


def _number_at_least_zero(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    raise _Invalid(f"must be a number >= 0, got {_show(value)}")


def _positive_number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise _Invalid(f"must be a number > 0, got {_show(value)}")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"must be true or false, got {_show(value)}")


def _path(value: object) -> Path:
    """A file system path; relative ones are taken from the current working directory."""
    if isinstance(value, str) and value:
        return Path(value).absolute()
    raise _Invalid(f"must be a non-empty path string, got {_show(value)}")


def _optional_path(value: object) -> Path | None:
    """A path, or None for "" (the default destination, e.g. stdout)."""
    return None if value == "" else _path(value)


def _text(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise _Invalid(f"must be a non-empty string, got {_show(value)}")


def _email(value: object) -> str:
    if isinstance(value, str) and _EMAIL.fullmatch(value):
        return value
    raise _Invalid(f'must be an email address such as "admin@example.com", got {_show(value)}')


def _base64url(value: object) -> str:
    if isinstance(value, str) and _BASE64URL.fullmatch(value):
        return value
    raise _Invalid(f"must be base64url text, as the CA hands it out, got {_show(value)}")


def _redis_url(value: object) -> str:
    if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
        return value
    raise _Invalid(f'must be a "redis://" or "rediss://" URL, got {_show(value)}')


def _encryption_key(value: object) -> str:
    """base64url of 32 bytes, e.g. from `openssl rand -base64 32 | tr +/ -_`."""
    try:
        if isinstance(value, str) and len(base64.urlsafe_b64decode(value)) == 32:
            return value
    except ValueError:
        pass
    raise _Invalid("must be the base64url text of 32 random bytes")


def _lock_ttl(value: object) -> float:
    number = _positive_number(value)
    if number < 1:
        raise _Invalid(f"must be at least 1 (seconds), got {_show(value)}")
    return number


def _https_url(value: object) -> str:
    """An ACME directory URL: https, with a host."""
    try:
        url = urlsplit(value) if isinstance(value, str) else None
    except ValueError:
        url = None
    if url is None or url.scheme != "https" or not url.hostname:
        raise _Invalid(f"must be an https:// URL, got {_show(value)}")
    return str(value)


def _ip_addresses(value: object) -> tuple[str, ...]:
    """One IP address or a non-empty array of them; repeats are dropped."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _Invalid("must not be an empty array")
    return tuple(dict.fromkeys(_ip_address(element) for element in values))


def _ip_address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise _Invalid(
            f'must be an IP address such as "0.0.0.0" or "::", got {_show(value)}'
        ) from None


def _host(value: object) -> str:
    """A site host as clients send it: a lower-case DNS name (A-label) or a bare IP literal."""
    if not isinstance(value, str):
        raise _Invalid(f"must be a host name string, got {_show(value)}")
    literal = value[1:-1] if value[:1] == "[" and value[-1:] == "]" else value
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if _HOST_WITH_PORT.fullmatch(value):
        raise _Invalid(f"host {_show(value)} must not include a port")
    try:
        name = value.removesuffix(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise _Invalid(f"host {_show(value)} is not a valid DNS name or IP address")
    return name


def _site_host(value: object) -> str:
    """A site host: as `_host`, or a wildcard DNS name `*.example.com` (one label)."""
    if isinstance(value, str) and value.startswith("*."):
        try:
            parent = _host(value[2:])
        except _Invalid:
            raise _Invalid(f"host {_show(value)} is not a valid DNS name or IP address") from None
        if "." not in parent or is_ip_address(parent):
            raise _Invalid(f"wildcard {_show(value)} must stand for a label under a DNS domain")
        return f"*.{parent}"
    return _host(value)


def _base64(value: object) -> str:
    """A base64 secret, as TSIG key generators print it."""
    if isinstance(value, str) and value:
        try:
            binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
            return value
        except (binascii.Error, UnicodeEncodeError):
            pass
    raise _Invalid("must be base64 text, as tsig-keygen or keymgr print it")


def _dns_server(value: object) -> tuple[str, int]:
    """ "IP" or "IP:port" ("[IPv6]:port"); port 53 when none is given."""
    text = value if isinstance(value, str) else ""
    address, port = text, 53
    if text.startswith("[") and "]:" in text:
        address, _, port_text = text[1:].partition("]:")
        port = int(port_text) if port_text.isdigit() else 0
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        port = int(port_text) if port_text.isdigit() else 0
    if not is_ip_address(address) or not 1 <= port <= 65535:
        raise _Invalid(
            f'must be an IP address with an optional port, "127.0.0.1:53", got {_show(value)}'
        )
    return str(ipaddress.ip_address(address)), port


def _dns_servers(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be an array of servers, got {_show(value)}")
    return tuple(_dns_server(element) for element in value)


def _upstream(value: object) -> Upstream:
    """An upstream base URL: scheme and authority only, the request supplies the path."""
    if not isinstance(value, str) or "://" not in value:
        raise _Invalid(f'must be a URL such as "http://127.0.0.1:8000", got {_show(value)}')
    url = urlsplit(value)
    scheme = cast(UpstreamScheme, url.scheme.lower())
    if scheme not in _DEFAULT_PORTS:
        raise _Invalid(f"scheme must be http, h2c or https, got {_show(value)}")
    if "@" in url.netloc:
        raise _Invalid(f"must not contain user info, got {_show(value)}")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise _Invalid(f"must not have a path, query or fragment, got {_show(value)}")
    if not url.hostname:
        raise _Invalid(f"must name a host, got {_show(value)}")
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise _Invalid(f"port must be 1-65535, got {_show(value)}")
    port = port or _DEFAULT_PORTS[scheme]
    authority = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return Upstream(f"{scheme}://{authority}:{port}", scheme, url.hostname, port)


# -- message formatting ----------------------------------------------------------------------


def _show(value: object) -> str:
    """`value` as a user would write it in TOML, or its kind when that would be long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    return str(value)


def _dotted(key: KeyPath) -> str:
    """("sites", 1, "hosts", 0) -> "sites[1].hosts[0]"."""
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{name}" if text else name
    return text
