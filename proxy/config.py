"""The configuration model: one TOML file becomes a tree of frozen dataclasses.

Everything else in the proxy reads settings from these objects only, never from the TOML
text, so a reload is a matter of building a new `Config` and swapping one reference.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

Issuer = Literal["local", "files", "acme"]
UpstreamScheme = Literal["http", "h2c", "https"]
AccessLogFormat = Literal["json", "common", "combined"]
ChallengeType = Literal["http-01", "tls-alpn-01", "dns-01"]
RFC2136 = "rfc2136"  # [acme.dns] provider: dynamic updates; any other name is a dns-lexicon one
TsigAlgorithm = Literal["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1"]
KeyType = Literal["ecdsa-p256", "rsa-2048"]
ClientAuthMode = Literal["require", "request"]
Coding = Literal["zstd", "br", "gzip"]  # response content codings port443 can produce

IPNetwork = IPv4Network | IPv6Network

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
    http3: bool = False  # also serve HTTP/3 (QUIC) on UDP at the https port
    # A PROXY protocol header (v1 or v2) is required from these peers, refused from others.
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class CertsConfig:
    dir: Path = Path("certs")
    issuer: Issuer = "local"


StorageBackend = Literal["directory", "redis"]


@dataclass(frozen=True)
class StorageConfig:
    """Where certificates, ACME state and challenge answers are shared (docs/CLUSTER.md).

    "directory" is `certs.dir` alone; "redis" shares them between instances, keeping a
    local copy under `certs.dir` to serve from while Redis is unreachable.
    """

    backend: StorageBackend = "directory"
    url: str | None = None  # redis:// or rediss://; "redis" needs this or sentinels
    sentinels: tuple[tuple[str, int], ...] = ()  # Redis Sentinels (host, port) to ask ...
    service_name: str | None = None  # ... for the master of this name
    prefix: str = "port443:"  # every key starts with it: several clusters in one Redis
    password: str | None = None  # else the one in the URL, if any
    encryption_key: str | None = None  # base64url of 32 bytes: private keys at rest in Redis
    encryption_key_file: Path | None = None  # the same, read from a file (one or the other)
    lock_ttl: float = 60.0  # seconds a renewal lock outlives its holder's last heartbeat


@dataclass(frozen=True)
class DnsConfig:
    """How DNS-01 records are published: RFC 2136 updates signed with a TSIG key, or a DNS
    provider's API through dns-lexicon."""

    provider: str = RFC2136  # or a dns-lexicon provider name ("cloudflare", "route53", ...)
    # rfc2136: the primary authoritative server that takes the updates, and its TSIG key
    server: tuple[str, int] = ("127.0.0.1", 53)
    tsig_key_name: str = "."
    tsig_secret: str = field(default="", repr=False)  # base64, as tsig-keygen / keymgr print it
    tsig_algorithm: TsigAlgorithm = "hmac-sha256"
    # lexicon: the provider's options ([acme.dns.options]), and a YAML file of more of them
    # (credentials); LEXICON_<PROVIDER>_<OPTION> environment variables fill in the rest
    options: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    credentials_file: Path | None = None
    propagation_timeout: float = 120.0  # seconds until every server must show the record
    # (host, port) to check instead of the zone's NS hosts on port 53 (split horizon, tests)
    propagation_servers: tuple[tuple[str, int], ...] = ()


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
    dns: DnsConfig | None = None  # [acme.dns]: needed by sites validated with dns-01
    # on-demand TLS (sites with `on_demand`), all such sites together, per process:
    on_demand_rate: int = 10  # first orders per minute
    on_demand_max_names: int = 1000  # names given a certificate on demand
    on_demand_refusal_ttl: float = 600.0  # seconds a refused name or failed order is remembered

    def challenges_for(self, site: SiteConfig) -> tuple[ChallengeType, ...]:
        """The challenge types tried for `site`, in order: its own `challenge`, else ours."""
        return (site.challenge,) if site.challenge is not None else self.challenges


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
    fd_reserve: int = 64  # file descriptors kept free: accepting pauses before they run out
    max_connections_per_ip: int = 0  # per client address (IPv6: per /64); 0 = no limit
    requests_per_second_per_ip: float = 0.0  # token bucket per client address; 0 = no limit
    request_burst_per_ip: int = 20  # the bucket's size: requests a client may send at once
    shared_request_rate: bool = False  # the rate counts across instances, in [storage]'s Redis


@dataclass(frozen=True)
class RequestRate:
    """A site's own request rate per client address, overriding `[limits]`'s for its requests."""

    per_second: float  # 0: no limit for this site
    burst: int | None = None  # None: [limits]' request_burst_per_ip


@dataclass(frozen=True)
class Upstream:
    url: str
    scheme: UpstreamScheme
    host: str
    port: int
    ca: Path | None = None  # https: CA bundle to verify the upstream with; None = system trust
    server_name: str | None = None  # https: SNI and the name verified; None = `host`


Policy = Literal["round_robin", "least_conn", "random_two", "consistent_hash"]
RedirectStatus = Literal[301, 302, 307, 308]


@dataclass(frozen=True)
class HealthConfig:
    """When a group's backend is down. Passive: `max_fails` failures (refused, timed out, 5xx)
    within `fail_window` seconds take it out for `cooldown`. Active (only with `path`): a
    `GET path` every `interval`; `fall` failures in a row take it out, `rise` passes bring
    it back."""

    max_fails: int = 3
    fail_window: float = 10.0
    cooldown: float = 10.0
    path: str | None = None
    status: int = 200
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    host: str | None = None  # the checks' Host header; None = the backend's own authority


@dataclass(frozen=True)
class GroupTimeouts:
    """Per-group upstream timeouts; None = the [limits] value (total: no limit)."""

    connect: float | None = None
    first_byte: float | None = None
    idle: float | None = None
    total: float | None = None


@dataclass(frozen=True)
class UpstreamGroup:
    """Backends that serve the same content, how one is chosen and when one is skipped.

    `weights` line up with `upstreams`. `hash_key` (consistent_hash): "client_ip",
    "header:<name>" or "cookie:<name>"."""

    name: str
    upstreams: tuple[Upstream, ...]
    weights: tuple[int, ...] = ()  # empty: all 1
    policy: Policy = "round_robin"
    hash_key: str = "client_ip"
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: GroupTimeouts = field(default_factory=GroupTimeouts)
    retries: int = 2  # further attempts on other backends when that is safe
    retry_deadline: float = 10.0  # no new attempt after this many seconds
    retry_buffer: int = 64 * 1024  # request body bytes kept to send again; larger: no retry
    retry_non_idempotent: bool = False  # also resend POST, PATCH ... the upstream may have seen


@dataclass(frozen=True)
class HeaderOps:
    """Edits of a header block, applied in this order: remove, set (replace), add."""

    remove: tuple[bytes, ...] = ()
    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)


@dataclass(frozen=True)
class Redirect:
    target: str  # with {path} and {query} placeholders
    status: RedirectStatus = 302


@dataclass(frozen=True)
class Respond:
    status: int = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Encode:
    """Response compression (`encode`, `encode_min_size`): proxy/http/encoding.py."""

    codings: tuple[Coding, ...] = ()  # the server's order of preference; none: off
    min_size: int = 1024  # bytes; smaller responses (by Content-Length) are left as they are


@dataclass(frozen=True)
class Route:
    """One `[[sites.routes]]` entry: conditions (all must hold) and one action."""

    action: UpstreamGroup | Redirect | Respond
    path_prefix: str | None = None  # matched at a segment boundary: "/api" is not "/apix"
    path: str | None = None  # exact path, query ignored
    methods: frozenset[bytes] | None = None
    header: tuple[bytes, bytes | None] | None = None  # name, and the value it must have
    strip_prefix: bool = False
    rewrite: str | None = None  # replaces the matched prefix or path
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    client_cert_required: bool = False  # without a verified client certificate: 403
    encode: Encode = field(default_factory=Encode)  # the site's, unless the route sets its own

    @property
    def pattern(self) -> str | None:
        """The paths the route takes, as a trace names them (`http.route`): "/api/*" for
        a prefix, the path itself for `path`; None when only method or header decide."""
        if self.path is not None:
            return self.path
        if self.path_prefix is not None:
            return self.path_prefix.rstrip("/") + "/*"
        return None


@dataclass(frozen=True)
class ClientAuth:
    """A site's client certificates (mTLS): verified against `ca`, the leaf checked against
    `crl` when given. "require": the handshake fails without a valid one; "request": it is
    asked for, and a missing or invalid one leaves the connection without client identity."""

    ca: Path
    mode: ClientAuthMode = "require"
    crl: Path | None = None


@dataclass(frozen=True)
class ClientCertHeaders:
    """Request fields that carry a verified client certificate upstream; clients' own copies
    of them are always removed (None: that field is not sent)."""

    subject: bytes | None = None  # RFC 4514 distinguished name
    fingerprint: bytes | None = None  # SHA-256 of the DER certificate, lower-case hex

    @property
    def names(self) -> tuple[bytes, ...]:
        return tuple(name for name in (self.subject, self.fingerprint) if name is not None)


@dataclass(frozen=True)
class SiteConfig:
    hosts: tuple[str, ...]
    upstreams: tuple[Upstream, ...]  # the site's own group's backends (may be empty with routes)
    cert: Path | None = None  # issuer = "files"
    key: Path | None = None
    issuer: Issuer | None = None  # overrides certs.issuer for this site
    challenge: ChallengeType | None = None  # overrides acme.challenges for this site
    group: UpstreamGroup | None = None  # `upstreams` with their policy; None: round robin
    routes: tuple[Route, ...] = ()  # none: every request goes to the site's own group
    client_auth: ClientAuth | None = None  # client certificates (mTLS); None: not asked for
    client_cert_headers: ClientCertHeaders = field(default_factory=ClientCertHeaders)
    # on-demand TLS: a certificate per name the hosts match (none: any name), ordered during
    # its first handshake once `ask` (GET ?domain=<name>) answers 200
    on_demand: bool = False
    ask: str | None = None
    encode: Encode = field(default_factory=Encode)  # its routes' default, and its own group's
    request_rate: RequestRate | None = None  # None: [limits]' requests_per_second_per_ip

    @cached_property
    def own_route(self) -> Route:
        """How requests that no route takes are served: the site's own group, its `encode`."""
        return Route(action=self.own_group, encode=self.encode)

    @property
    def own_group(self) -> UpstreamGroup:
        """The group that serves requests no route takes (a site without routes: all)."""
        return self.group or UpstreamGroup(name=self.name, upstreams=self.upstreams)

    @property
    def groups(self) -> tuple[UpstreamGroup, ...]:
        """Every group the site forwards to, its own (if any) first."""
        own = (self.own_group,) if self.upstreams else ()
        routed = tuple(r.action for r in self.routes if isinstance(r.action, UpstreamGroup))
        return own + tuple(g for g in dict.fromkeys(routed) if g not in own)

    @property
    def name(self) -> str:
        """Stable name of the site: its first host. Names the certificate directory.
        An on-demand site taking any name has no hosts: "*"."""
        return self.hosts[0] if self.hosts else "*"


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
    stall_timeout: int = 10  # seconds a response may wait for the client's window to open


@dataclass(frozen=True)
class Http3Config:
    """HTTP/3 to clients ([listen] http3 turns it on): address validation by Retry (a round
    trip proving the client's address is its own, against UDP amplification and floods of
    Initials from spoofed sources), and the receive windows for request bodies."""

    retry: bool = False  # every new client first gets a Retry
    retry_threshold: int = 100  # ...else once this many handshakes are in progress (per process)
    stream_window: int = 256 * 1024  # request body bytes a stream may send past what was read
    connection_window: int = 1024 * 1024  # the same, all streams together


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
class TracingConfig:
    """OpenTelemetry tracing: a span per HTTPS request, sent over OTLP/HTTP (protobuf)."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # the collector's traces URL
    service_name: str = "port443"
    sample_ratio: float = 1.0  # share of new traces recorded; a continued one follows its parent
    headers: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False)  # collector auth
    trust_incoming: bool = True  # continue the traceparent of clients in trusted_proxies


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    certs: CertsConfig = field(default_factory=CertsConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    hsts: HSTSConfig = field(default_factory=HSTSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    http2: Http2Config = field(default_factory=Http2Config)
    http3: Http3Config = field(default_factory=Http3Config)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    sites: tuple[SiteConfig, ...] = ()
    log_level: str = "info"
    trusted_proxies: tuple[IPNetwork, ...] = ()  # peers whose X-Forwarded-*/Forwarded we keep
    warnings: tuple[str, ...] = field(default=(), compare=False)  # `check` prints them
    _sites_by_host: Mapping[str, SiteConfig] = field(init=False, repr=False, compare=False)
    _any_name_site: SiteConfig | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # site_for_host runs on every request: index the hosts once (the first site wins).
        by_host = {host: site for site in reversed(self.sites) for host in site.hosts}
        object.__setattr__(self, "_sites_by_host", by_host)
        any_name = next((site for site in self.sites if not site.hosts), None)
        object.__setattr__(self, "_any_name_site", any_name)

    def issuer_of(self, site: SiteConfig) -> Issuer:
        """Where `site` gets its certificate: its own `issuer`, else `certs.issuer`."""
        return site.issuer or self.certs.issuer

    def site_for_host(self, host: str) -> SiteConfig | None:
        """The site serving `host` (already lower-cased, without port; IPv6 without brackets):
        the one listing it, else the one listing its wildcard, else an on-demand site
        without hosts (it takes any name)."""
        site = self._sites_by_host.get(host)
        if site is None and (wildcard := wildcard_of(host)) is not None:
            site = self._sites_by_host.get(wildcard)
        return site or self._any_name_site


def is_ip_address(host: str) -> bool:
    """Whether a site host is an IP literal (an RFC 8738 identifier) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def wildcard_of(host: str) -> str | None:
    """The wildcard name covering `host` ("a.example.com" -> "*.example.com"), if any.

    A wildcard stands for exactly one left-most label (RFC 6125 6.4.3), so only the
    first label is replaced; a name with a single label has no wildcard.
    """
    _, dot, parent = host.partition(".")
    return f"*.{parent}" if dot and parent else None
