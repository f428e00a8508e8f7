"""The tables that say how the proxy serves: [server], [listen], [limits], [http2], [http3], [hsts],
[tls], [admin] and [access_log].
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

from proxy.config import (
    AccessLogConfig,
    AccessLogFormat,
    AdminConfig,
    HSTSConfig,
    Http2Config,
    Http3Config,
    LimitsConfig,
    ListenConfig,
    ServerConfig,
    SiteConfig,
    StorageConfig,
    TLSConfig,
)
from proxy.config_load import convert
from proxy.config_load.convert import Invalid, show
from proxy.config_load.reader import Reader, Table
from proxy.toml_lines import KeyPath

_SERVER_KEYS = ("workers",)
_LISTEN_KEYS = ("address", "http", "https", "http3", "proxy_protocol", "proxy_protocol_from")
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
_HTTP3_KEYS = tuple(f.name for f in dataclasses.fields(Http3Config))
_WINDOW = (16384, 1 << 30)  # bytes: a few packets, up to 1 GiB
_ACCESS_LOG_KEYS = tuple(f.name for f in dataclasses.fields(AccessLogConfig))
_ADMIN_KEYS = tuple(f.name for f in dataclasses.fields(AdminConfig))
_LIMITS_ZERO_ALLOWED = frozenset(
    {"shutdown_delay", "fd_reserve", "max_connections_per_ip", "requests_per_second_per_ip"}
)
_PRELOAD_MIN_AGE = 31536000  # one year: hstspreload.org's minimum


class ServerSections(Reader):
    """Reads the serving tables; each check that spans tables (ports, default_site) lives here."""

    def _server(self, root: Table) -> ServerConfig:
        table = self._section(root, "server", _SERVER_KEYS)
        workers = self._value(
            table, ("server",), "workers", ServerConfig().workers, convert.workers
        )
        return ServerConfig(workers=workers)

    def _listen(self, root: Table) -> ListenConfig:
        key: KeyPath = ("listen",)
        table = self._section(root, "listen", _LISTEN_KEYS)
        default = ListenConfig()
        addresses = self._value(table, key, "address", default.addresses, convert.ip_addresses)
        http = self._value(table, key, "http", default.http, convert.port(0))
        https = self._value(table, key, "https", default.https, convert.port(1))
        if http == https:
            self._problem((*key, "http"), f"must differ from listen.https (both are {https})")
        http3 = self._value(table, key, "http3", default.http3, convert.boolean)
        proxy_protocol = self._value(
            table, key, "proxy_protocol", default.proxy_protocol, convert.boolean
        )
        proxy_from = self._value(
            table, key, "proxy_protocol_from", default.proxy_protocol_from, convert.networks
        )
        if proxy_protocol and not proxy_from:
            self._problem(
                (*key, "proxy_protocol"),
                "needs proxy_protocol_from, the balancers that send it "
                '(["0.0.0.0/0", "::/0"] for any peer)',
            )
        return ListenConfig(
            addresses=addresses,
            http=http,
            https=https,
            http3=http3,
            proxy_protocol=proxy_protocol,
            proxy_protocol_from=proxy_from,
        )

    def _hsts(self, root: Table) -> HSTSConfig:
        key: KeyPath = ("hsts",)
        table = self._section(root, "hsts", _HSTS_KEYS)
        default = HSTSConfig()
        hsts = HSTSConfig(
            max_age=self._value(table, key, "max_age", default.max_age, convert.integer(0)),
            include_subdomains=self._value(
                table, key, "include_subdomains", default.include_subdomains, convert.boolean
            ),
            preload=self._value(table, key, "preload", default.preload, convert.boolean),
        )
        if hsts.preload and not hsts.include_subdomains:
            self._problem((*key, "preload"), "requires include_subdomains = true")
        if hsts.preload and hsts.max_age < _PRELOAD_MIN_AGE:
            self._problem(
                (*key, "preload"),
                f"requires max_age >= {_PRELOAD_MIN_AGE} (one year), got {hsts.max_age}",
            )
        return hsts

    def _limits(self, root: Table, storage: StorageConfig) -> LimitsConfig:
        key: KeyPath = ("limits",)
        table = self._section(root, "limits", _LIMITS_TYPES)
        default = LimitsConfig()
        values: dict[str, Any] = {
            name: self._value(
                table,
                key,
                name,
                getattr(default, name),
                convert.boolean
                if kind is bool
                else convert.limit_converter(kind, zero_allowed=name in _LIMITS_ZERO_ALLOWED),
            )
            for name, kind in _LIMITS_TYPES.items()
        }
        limits = LimitsConfig(**values)
        if limits.shared_request_rate:
            where = (*key, "shared_request_rate")
            if storage.backend != "redis":
                self._problem(where, 'needs [storage] backend = "redis" (where it is shared)')
            if not limits.requests_per_second_per_ip:
                self._problem(where, "needs requests_per_second_per_ip (the rate shared)")
        return limits

    def _access_log(self, root: Table) -> AccessLogConfig:
        key: KeyPath = ("access_log",)
        table = self._section(root, "access_log", _ACCESS_LOG_KEYS)
        default = AccessLogConfig()
        formats: tuple[AccessLogFormat, ...] = get_args(AccessLogFormat)
        path = self._value(table, key, "path", default.path, convert.optional_path)
        if path is not None and not path.parent.is_dir():
            self._problem((*key, "path"), f"directory not found: {path.parent}")
        return AccessLogConfig(
            enabled=self._value(table, key, "enabled", default.enabled, convert.boolean),
            format=self._value(table, key, "format", default.format, convert.choice(formats)),
            path=path,
        )

    def _admin(self, root: Table, listen: ListenConfig) -> AdminConfig:
        key: KeyPath = ("admin",)
        table = self._section(root, "admin", _ADMIN_KEYS)
        default = AdminConfig()
        token_file = self._value(table, key, "token_file", None, convert.path)
        admin = AdminConfig(
            enabled=self._value(table, key, "enabled", default.enabled, convert.boolean),
            address=self._value(table, key, "address", default.address, convert.ip_address),
            port=self._value(table, key, "port", default.port, convert.port(1)),
            token=self._value(table, key, "token", None, convert.text),
            token_file=token_file,
        )
        if token_file is not None:
            if admin.token is not None:
                self._problem((*key, "token_file"), "set admin.token or admin.token_file, not both")
            try:  # surrounding whitespace (a trailing newline) is no part of it
                token = convert.text(token_file.read_text(encoding="utf-8").strip())
                admin = dataclasses.replace(admin, token=token)
            except (OSError, UnicodeDecodeError, Invalid) as exc:
                self._problem((*key, "token_file"), f"cannot read a token from it: {exc}")
        if admin.enabled and admin.port in (listen.http, listen.https):
            self._problem((*key, "port"), "must differ from listen.http and listen.https")
        return admin

    def _http2(self, root: Table) -> Http2Config:
        key: KeyPath = ("http2",)
        table = self._section(root, "http2", _HTTP2_RANGES)
        default = Http2Config()
        values = {
            name: self._value(
                table, key, name, getattr(default, name), convert.integer_between(*bounds)
            )
            for name, bounds in _HTTP2_RANGES.items()
        }
        return Http2Config(**values)

    def _http3(self, root: Table) -> Http3Config:
        key: KeyPath = ("http3",)
        table = self._section(root, "http3", _HTTP3_KEYS)
        default = Http3Config()
        stream_window = self._value(
            table, key, "stream_window", default.stream_window, convert.integer_between(*_WINDOW)
        )
        connection_window = self._value(
            table,
            key,
            "connection_window",
            default.connection_window,
            convert.integer_between(*_WINDOW),
        )
        if connection_window < stream_window:
            self._problem((*key, "connection_window"), "must be >= http3.stream_window")
        return Http3Config(
            retry=self._value(table, key, "retry", default.retry, convert.boolean),
            retry_threshold=self._value(
                table, key, "retry_threshold", default.retry_threshold, convert.integer(0)
            ),
            stream_window=stream_window,
            connection_window=connection_window,
        )

    def _tls(self, root: Table, sites: tuple[SiteConfig, ...]) -> TLSConfig:
        key: KeyPath = ("tls",)
        table = self._section(root, "tls", _TLS_KEYS)
        default_site = self._value(table, key, "default_site", None, convert.host)
        hosts = [host for site in sites for host in site.hosts]
        if default_site is not None and hosts and default_site not in hosts:
            self._problem((*key, "default_site"), f"{show(default_site)} is not a host of any site")
        return TLSConfig(default_site)
