"""The configuration model: one TOML file becomes a tree of frozen dataclasses.

Everything else in the proxy reads settings from these objects only, never from the TOML
text, so a reload is a matter of building a new `Config` and swapping one reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Issuer = Literal["local", "files", "acme"]
UpstreamScheme = Literal["http", "h2c", "https"]
AccessLogFormat = Literal["json", "common", "combined"]
ChallengeType = Literal["http-01", "tls-alpn-01"]
KeyType = Literal["ecdsa-p256", "rsa-2048"]

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True)
class ServerConfig:
    """The process model: 1 is one process; more, a supervisor and that many workers."""

    workers: int = 1  # "auto" in the file: the CPUs this process may run on


@dataclass(frozen=True)
class ListenConfig:
    addresses: tuple[str, ...] = ("0.0.0.0",)
    http: int = 80  # 0 disables the redirector
    https: int = 443


@dataclass(frozen=True)
class CertsConfig:
    dir: Path = Path("certs")
    issuer: Issuer = "local"


@dataclass(frozen=True)
class AcmeConfig:
    """How `issuer = "acme"` certificates are ordered; `challenges` in order of preference."""

    directory: str = LETS_ENCRYPT
    email: str | None = None
    ca_bundle: Path | None = None  # trust root for the ACME server's own HTTPS
    challenges: tuple[ChallengeType, ...] = ("http-01", "tls-alpn-01")
    eab_kid: str | None = None  # external account binding: both or neither
    eab_hmac_key: str | None = None
    fallback_directory: str | None = None  # a second CA, tried when the first one fails
    key_type: KeyType = "ecdsa-p256"
    profile: str | None = None  # ACME profile requested for every order, renewals included


@dataclass(frozen=True)
class HSTSConfig:
    max_age: int = 63072000
    include_subdomains: bool = True
    preload: bool = False

    def header_value(self) -> bytes | None:
        """The Strict-Transport-Security value, or None when HSTS is off."""
        if self.max_age <= 0:
            return None
        value = f"max-age={self.max_age}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value.encode("ascii")


@dataclass(frozen=True)
class LimitsConfig:
    max_header_bytes: int = 64 * 1024  # request head larger -> 431; upstream response head -> 502
    header_timeout: float = 10.0  # a client must send a whole request head within this
    keepalive_timeout: float = 75.0  # idle client connection between requests
    client_timeout: float = 60.0  # mid-request, the client must send or read within this
    max_connections: int = 10000  # concurrent client connections per process
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0  # waiting for the upstream's response head or next byte
    upstream_keepalive: int = 128  # idle pooled connections kept per upstream
    grace_period: float = 30.0  # shutdown: how long in-flight requests may still run
    shutdown_delay: float = 0.0  # after SIGTERM, keep serving (readiness 503) this long first


@dataclass(frozen=True)
class Upstream:
    url: str
    scheme: UpstreamScheme
    host: str
    port: int
    ca: Path | None = None  # https: CA bundle to verify the upstream with; None = system trust
    server_name: str | None = None  # https: SNI and the name verified; None = `host`


@dataclass(frozen=True)
class SiteConfig:
    hosts: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    cert: Path | None = None  # issuer = "files"
    key: Path | None = None
    issuer: Issuer | None = None  # overrides certs.issuer for this site

    @property
    def name(self) -> str:
        """Stable name of the site: its first host. Names the certificate directory."""
        return self.hosts[0]


@dataclass(frozen=True)
class TLSConfig:
    default_site: str | None = None  # host whose certificate answers unknown or missing SNI


@dataclass(frozen=True)
class Http2Config:
    """HTTP/2 to clients: the SETTINGS we announce (defaults from Envoy's edge guidance) and
    the flood caps that close an abusive connection with ENHANCE_YOUR_CALM."""

    max_concurrent_streams: int = 100
    initial_window_size: int = 65536  # request body bytes per stream buffered before read
    connection_window_size: int = 1024 * 1024  # the same, all streams together
    max_frame_size: int = 16384
    max_header_list_size: int = 65536
    max_resets_per_second: int = 200  # RST_STREAM received or provoked (rapid reset)
    max_control_frames_per_second: int = 100  # SETTINGS, PING, PRIORITY, empty DATA


@dataclass(frozen=True)
class AccessLogConfig:
    enabled: bool = True
    format: AccessLogFormat = "json"
    path: Path | None = None  # None: stdout


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener (metrics, health): loopback only unless said otherwise."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 2019
    # Asked for by all but /healthz and /readyz; `token_file` is read into `token` on load.
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    certs: CertsConfig = field(default_factory=CertsConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    hsts: HSTSConfig = field(default_factory=HSTSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    sites: tuple[SiteConfig, ...] = ()
    log_level: str = "info"
    _sites_by_host: Mapping[str, SiteConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # site_for_host runs on every request: index the hosts once (the first site wins).
        by_host = {host: site for site in reversed(self.sites) for host in site.hosts}
        object.__setattr__(self, "_sites_by_host", by_host)

    def issuer_of(self, site: SiteConfig) -> Issuer:
        """Where `site` gets its certificate: its own `issuer`, else `certs.issuer`."""
        return site.issuer or self.certs.issuer

    def site_for_host(self, host: str) -> SiteConfig | None:
        """The site serving `host` (already lower-cased, without port; IPv6 without brackets)."""
        return self._sites_by_host.get(host)
