"""Prometheus metrics of one proxy process, in a registry of its own.

Request metrics come from each finished request's `Outcome` (the `Metrics` observer);
connection counts and certificate state are read from the server when scraped, so they
cannot drift from the truth; handshake failures are counted by the TLS listener.
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from proxy.certs.manager import CertManager
from proxy.config import Config, UpstreamGroup
from proxy.connections import Admission
from proxy.http.model import ConnectionInfo, Outcome
from proxy.netio import StreamTimeout

# Seconds, from a cached response to a slow upload or a long poll.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GATEWAY_ERRORS = frozenset((502, 504))
# Merging the workers' metrics: these are the same fact seen by each worker, not shares of
# a total. The oldest certificate in service; an upstream is down if any worker saw it fail.
MERGED_BY_MINIMUM = frozenset(
    ("port443_certificate_expiry_timestamp_seconds", "port443_upstream_up", "port443_backend_up")
)


class ServerState(Protocol):
    """What the metrics read from the running server (the current generation's config and
    certificates: both change on reload)."""

    @property
    def config(self) -> Config: ...

    @property
    def certs(self) -> CertManager: ...

    @property
    def admission(self) -> Admission: ...


def handshake_failure_reason(exc: BaseException) -> str:
    """A bounded label value: OpenSSL's reason (`tlsv1_alert_unknown_ca`), `timeout`, or
    the errno name of a broken connection (`econnreset`)."""
    if isinstance(exc, ssl.SSLError):  # `reason` is unset on some, e.g. built by Python
        return str(getattr(exc, "reason", None) or "ssl_error").lower()
    if isinstance(exc, StreamTimeout):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "os_error").lower()
    return type(exc).__name__.lower()


@dataclass(frozen=True, slots=True)
class _SiteChildren:
    duration: Histogram
    bytes_in: Counter
    bytes_out: Counter


class Metrics:
    """The registry and every metric in it; an `Observer` of finished requests."""

    def __init__(self, server: ServerState) -> None:
        self._server = server
        self.registry = registry = CollectorRegistry()
        self._requests = Counter(
            "port443_requests",
            "Requests answered, by listener (https, http, admin), site (empty: no site for the "
            "Host), status (0: the client left before a response) and protocol.",
            ["listener", "site", "status", "protocol"],
            registry=registry,
        )
        self._duration = Histogram(
            "port443_request_duration_seconds",
            "Time from the request head to the end of the response.",
            ["site"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._upstream_time = Histogram(
            "port443_upstream_response_seconds",
            "Time from forwarding the request to the upstream's response head.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._bytes_in = Counter(
            "port443_request_body_bytes",
            "Request body bytes forwarded upstream.",
            ["site"],
            registry=registry,
        )
        self._bytes_out = Counter(
            "port443_response_body_bytes",
            "Response body bytes sent to clients.",
            ["site"],
            registry=registry,
        )
        self._upstream_up = Gauge(
            "port443_upstream_up",
            "1 if the upstream's latest request got a response, 0 if it failed (refused, "
            "timed out, closed); absent until an upstream has been used.",
            ["upstream"],
            registry=registry,
        )
        self._backend_up = Gauge(
            "port443_backend_up",
            "Health of each backend of each upstream group: 1 up, 0 down (passive or active "
            "health checks).",
            ["group", "backend"],
            registry=registry,
        )
        self._handshake_failures = Counter(
            "port443_tls_handshake_failures",
            "TLS handshakes that failed, by reason.",
            ["reason"],
            registry=registry,
        )
        self._quic_handshake_failures = Counter(
            "port443_quic_handshake_failures",
            "QUIC (HTTP/3) handshakes that failed, by reason: malformed_initial, hello_timeout, "
            "no_certificate, invalid_token, timeout, or the QUIC or TLS alert code name.",
            ["reason"],
            registry=registry,
        )
        self._quic_retries = Counter(
            "port443_quic_retries",
            "Retry packets sent to new QUIC clients (address validation).",
            registry=registry,
        )
        self._handshakes = Counter(
            "port443_tls_handshakes",
            "TLS handshakes completed, by protocol version and negotiated ALPN.",
            ["version", "alpn"],
            registry=registry,
        )
        self._proxy_rejections = Counter(
            "port443_proxy_protocol_rejections",
            "Connections closed over their PROXY protocol header ([listen] proxy_protocol), "
            "by reason: missing, malformed, truncated, timeout, untrusted (from a peer not "
            "in proxy_protocol_from).",
            ["reason"],
            registry=registry,
        )
        Gauge(
            "port443_open_connections",
            "Client connections open now (HTTPS and HTTP listeners).",
            registry=registry,
        ).set_function(lambda: server.admission.registry.open_connections)
        registry.register(_CertificateCollector(server))
        registry.register(_AdmissionCollector(server.admission))
        self._request_children: dict[tuple[str, str, int, str], Counter] = {}
        self._site_children: dict[str, _SiteChildren] = {}
        self._upstream_children: dict[str, tuple[Histogram, Gauge]] = {}

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    def backend_health(self, group: UpstreamGroup, backend: str, up: bool) -> None:
        """A backend's health changed (or a configuration brought it in, up)."""
        self._backend_up.labels(group.name, backend).set(1 if up else 0)

    def tls_handshake_completed(self, info: ConnectionInfo) -> None:
        self._handshakes.labels(info.tls_version or "", info.alpn or "").inc()

    def tls_handshake_failed(self, exc: BaseException) -> None:
        self._handshake_failures.labels(handshake_failure_reason(exc)).inc()

    def proxy_protocol_rejected(self, reason: str) -> None:
        self._proxy_rejections.labels(reason).inc()

    def quic_handshake_failed(self, reason: str) -> None:
        self._quic_handshake_failures.labels(reason).inc()

    def quic_retry_sent(self) -> None:
        self._quic_retries.inc()

    def record(self, outcome: Outcome) -> None:
        # Children are cached per label values: labels() costs a lock and validation per
        # call, and this runs once per request. The label sets are bounded by the config.
        site = outcome.site or ""
        key = (outcome.listener, site, outcome.status, outcome.request.protocol)
        requests = self._request_children.get(key)
        if requests is None:
            requests = self._requests.labels(
                outcome.listener, site, str(outcome.status), outcome.request.protocol
            )
            self._request_children[key] = requests
        requests.inc()
        per_site = self._site_children.get(site)
        if per_site is None:
            per_site = self._site_children[site] = _SiteChildren(
                self._duration.labels(site),
                self._bytes_in.labels(site),
                self._bytes_out.labels(site),
            )
        per_site.duration.observe(outcome.finished - outcome.started)
        if outcome.bytes_in:
            per_site.bytes_in.inc(outcome.bytes_in)
        if outcome.bytes_out:
            per_site.bytes_out.inc(outcome.bytes_out)
        if outcome.upstream_time is not None and outcome.upstream is not None:
            per_upstream = self._upstream_children.get(outcome.upstream)
            if per_upstream is None:
                per_upstream = self._upstream_children[outcome.upstream] = (
                    self._upstream_time.labels(outcome.upstream),
                    self._upstream_up.labels(outcome.upstream),
                )
            per_upstream[0].observe(outcome.upstream_time)
            per_upstream[1].set(1)
        elif outcome.status in GATEWAY_ERRORS and outcome.site is not None:
            for upstream in self._failed_upstreams(outcome.site, outcome.upstream):
                self._upstream_up.labels(upstream).set(0)

    def _failed_upstreams(self, site_name: str, upstream: str | None) -> tuple[str, ...]:
        """A gateway error without an upstream response: that upstream failed, or, when none
        is named, none of the site's upstreams accepted a connection (all were tried)."""
        if upstream is not None:
            return (upstream,)
        site = self._server.config.site_for_host(site_name)
        return () if site is None else tuple(u.url for u in site.upstreams)


class _CertificateCollector(Collector):
    """Certificate state of the current generation, read at scrape time."""

    def __init__(self, server: ServerState) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        certs = self._server.certs
        expiry = GaugeMetricFamily(
            "port443_certificate_expiry_timestamp_seconds",
            "When the certificate in service for each certificate name expires (Unix time).",
            labels=["cert"],
        )
        for cert in certs.certificates():
            expiry.add_metric([cert.name], cert.not_after.timestamp())
        yield expiry
        failures = CounterMetricFamily(
            "port443_certificate_renewal_failures",
            "Failed attempts to obtain or renew a certificate since start or the last reload.",
            labels=["cert"],
        )
        for name, count in certs.renewal_failures.items():
            failures.add_metric([name], count)
        yield failures
        on_demand = CounterMetricFamily(
            "port443_on_demand",
            "On-demand TLS names, by outcome: ordered (first orders placed), refused (by the "
            "ask endpoint), rate_limited (by on_demand_rate or on_demand_max_names).",
            labels=["outcome"],
        )
        if certs.on_demand is not None:
            for outcome, count in certs.on_demand.counts.items():
                on_demand.add_metric([outcome], count)
        yield on_demand
        yield GaugeMetricFamily(
            "port443_storage_unreachable",
            "Processes whose shared certificate store (Redis) does not answer; serving goes on.",
            value=int(certs.storage_unreachable),
        )


class _AdmissionCollector(Collector):
    """What the connection limits did to clients, read at scrape time."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        admission = self._admission
        yield CounterMetricFamily(
            "port443_connections_evicted",
            "Idle client connections closed to admit new ones (at max_connections or the "
            "file descriptor reserve).",
            value=admission.registry.evicted,
        )
        reserve = admission.reserve
        yield CounterMetricFamily(
            "port443_accept_pauses",
            "Times accepting paused because only fd_reserve file descriptors were left.",
            value=0 if reserve is None else reserve.pauses,
        )
        refusals = CounterMetricFamily(
            "port443_client_limit_refusals",
            "Connections closed at accept (max_connections_per_ip) and requests answered 429 "
            "(requests_per_second_per_ip), by kind.",
            labels=["kind"],
        )
        clients = admission.clients
        if clients is not None:
            refusals.add_metric(["connection"], clients.refused_connections)
            refusals.add_metric(["request"], clients.refused_requests)
        yield refusals
        yield CounterMetricFamily(
            "port443_client_limit_unshared_requests",
            "Requests whose shared request rate (shared_request_rate) this process decided "
            "alone because Redis did not answer.",
            value=0 if clients is None else clients.unshared_requests,
        )


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One exposition for the whole instance from its workers' ones: samples of the same
    name and labels are added up (requests, bytes, histogram buckets, open connections),
    except the facts in MERGED_BY_MINIMUM and `_created` timestamps, of which the earliest
    counts. A worker restarted since the last scrape shows as a counter reset."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            by_minimum = family.name in MERGED_BY_MINIMUM
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = merged.get(key)
                if old is None:
                    merged[key] = sample.value
                elif by_minimum or sample.name.endswith("_created"):
                    merged[key] = min(old, sample.value)
                else:
                    merged[key] = old + sample.value
    for name, family in families.items():
        family.samples = [
            Sample(sample_name, dict(labels), value)
            for (sample_name, labels), value in values[name].items()
        ]
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    """Metrics already collected elsewhere, exposed as they are."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
