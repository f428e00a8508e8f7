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
    max_header_bytes: int = 64 * 1024  # request head larger than this -> 431
    header_timeout: float = 10.0  # a client must send a whole request head within this
    keepalive_timeout: float = 75.0  # idle client connection between requests
    client_timeout: float = 60.0  # mid-request, the client must send or read within this
    max_connections: int = 10000  # concurrent client connections per process
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0  # waiting for the upstream's response head or next byte
    upstream_keepalive: int = 32  # idle pooled connections kept per upstream
    grace_period: float = 30.0  # shutdown: how long in-flight requests may still run
    shutdown_delay: float = 0.0  # after SIGTERM, keep serving (readiness 503) this long first


@dataclass(frozen=True)
class Upstream:
    url: str
    scheme: UpstreamScheme
    host: str
    port: int


@dataclass(frozen=True)
class SiteConfig:
    hosts: tuple[str, ...]
    upstreams: tuple[Upstream, ...]
    cert: Path | None = None  # issuer = "files"
    key: Path | None = None

    @property
    def name(self) -> str:
        """Stable name of the site: its first host. Names the certificate directory."""
        return self.hosts[0]


@dataclass(frozen=True)
class TLSConfig:
    default_site: str | None = None  # host whose certificate answers unknown or missing SNI


@dataclass(frozen=True)
class Config:
    path: Path
    listen: ListenConfig = field(default_factory=ListenConfig)
    certs: CertsConfig = field(default_factory=CertsConfig)
    hsts: HSTSConfig = field(default_factory=HSTSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    sites: tuple[SiteConfig, ...] = ()
    log_level: str = "info"
    _sites_by_host: Mapping[str, SiteConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # site_for_host runs on every request: index the hosts once (the first site wins).
        by_host = {host: site for site in reversed(self.sites) for host in site.hosts}
        object.__setattr__(self, "_sites_by_host", by_host)

    def site_for_host(self, host: str) -> SiteConfig | None:
        """The site serving `host` (already lower-cased, without port; IPv6 without brackets)."""
        return self._sites_by_host.get(host)
