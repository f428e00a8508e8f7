"""Per-client limits: open connections and a request rate (token bucket) per client address.

Both are off unless configured (`[limits] max_connections_per_ip`, `requests_per_second_per_ip`;
a site may set its own rate, counted in a bucket of its own) and count per process (each
worker keeps its own). An IPv6 client counts by its /64, the smallest network one subscriber
is given, or one host could pose as 2^64 clients.

With `shared_request_rate` the rate counts across every process of every instance, in
`[storage]`'s Redis (`shared_rate.py`). When Redis does not answer, requests are not refused for
that: each process's own bucket decides meanwhile (a metric counts those requests), and
Redis is asked again a second later.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from proxy.config import LimitsConfig, SiteConfig, StorageConfig
from proxy.lograte import RateLimitedLog

if TYPE_CHECKING:
    from proxy.shared_rate import SharedRate

log = logging.getLogger(__name__)

MAX_BUCKETS = 65536  # clients whose request rate is tracked; the least recently seen go first
SHARED_RETRY = 1.0  # seconds between tries while Redis does not answer
SHARED_THREADS = 16  # Redis round trips in flight per process (redis-py blocks a thread)


def client_key(ip: str) -> str:
    """The address a client is counted by: IPv4 as it is, IPv6 by its /64."""
    if ":" not in ip:
        return ip
    try:
        network = ipaddress.IPv6Network((ip.partition("%")[0], 64), strict=False)
    except ValueError:
        return ip
    return str(network)


def _bucket(site_name: str, client: str) -> str:
    """A bucket's key: the client's, within a site with its own rate."""
    return f"{site_name} {client}" if site_name else client


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float  # time.monotonic() when `tokens` was computed


class ClientLimits:
    """Connections per client and requests per second per client, for one process."""

    def __init__(self, limits: LimitsConfig, storage: StorageConfig | None = None) -> None:
        self._connections: dict[str, int] = {}  # only clients with a connection open
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first
        self.refused_connections = 0
        self.refused_requests = 0
        self.unshared_requests = 0  # decided here alone: Redis did not answer (metrics)
        self._log_connections = RateLimitedLog(log, logging.WARNING)
        self._log_requests = RateLimitedLog(log, logging.WARNING)
        self._log_unshared = RateLimitedLog(log, logging.WARNING, interval=60.0)
        self._shared: SharedRate | None = None
        self._shared_down_until = -math.inf  # time.monotonic() of the next try at Redis
        self._threads = trio.CapacityLimiter(SHARED_THREADS)
        self.configure(limits, storage)

    def configure(self, limits: LimitsConfig, storage: StorageConfig | None = None) -> None:
        """New limits (reload); open connections and buckets carry over."""
        self._max_connections = limits.max_connections_per_ip
        self._rate = limits.requests_per_second_per_ip
        self._burst = float(limits.request_burst_per_ip)
        shared = storage if limits.shared_request_rate else None
        if self._shared is not None and self._shared.storage != shared:
            self._shared.close()
            self._shared = None
        if shared is not None and self._shared is None:
            from proxy.shared_rate import SharedRate  # only users of Redis import redis

            self._shared = SharedRate(shared)

    # -- connections -----------------------------------------------------------------------

    def connection_opened(self, key: str) -> bool:
        """Count a new connection of `key`; False (not counted) when it is one too many."""
        count = self._connections.get(key, 0)
        if self._max_connections and count >= self._max_connections:
            self.refused_connections += 1
            self._log_connections(
                "client %s: more than %d connections: refused", key, self._max_connections
            )
            return False
        self._connections[key] = count + 1
        return True

    def connection_closed(self, key: str) -> None:
        count = self._connections.pop(key) - 1
        if count:
            self._connections[key] = count

    # -- requests --------------------------------------------------------------------------

    def _rate_of(self, site: SiteConfig | None) -> tuple[str, float, float]:
        """The site whose rate and burst a request to `site` counts against: the site's own
        (its name: a bucket per client per such site), else [limits]' ("": one per client)."""
        own = site.request_rate if site is not None else None
        if site is None or own is None:
            return "", self._rate, self._burst
        burst = self._burst if own.burst is None else float(own.burst)
        return site.name, own.per_second, burst

    async def check_request(self, client_ip: str, site: SiteConfig | None = None) -> int | None:
        """None when a request of `client_ip` to `site` may go ahead, else the seconds for
        429's Retry-After: counted in Redis when the rate is shared and Redis answers, else
        by this process (`retry_after`)."""
        shared = self._shared
        site_name, rate, burst = self._rate_of(site)
        if shared is None or not rate:
            return self._take_local(client_ip, site_name, rate, burst)
        if time.monotonic() >= self._shared_down_until:
            key = client_key(client_ip)
            try:
                wait = await trio.to_thread.run_sync(
                    shared.wait, _bucket(site_name, key), rate, int(burst), limiter=self._threads
                )
            except shared.unavailable as exc:
                self._shared_down_until = time.monotonic() + SHARED_RETRY
                self._log_unshared(
                    "shared request rate: Redis unreachable (%s); each process counts alone "
                    "until it is back",
                    exc,
                )
            else:
                if self._shared_down_until > -math.inf:
                    self._shared_down_until = -math.inf
                    log.info("shared request rate: Redis reachable again")
                return None if wait <= 0 else self._refused(key, site_name, rate, wait)
        self.unshared_requests += 1
        return self._take_local(client_ip, site_name, rate, burst)

    def _refused(self, key: str, site_name: str, rate: float, wait: float) -> int:
        """Count and log a 429; Retry-After in whole seconds, at least 1."""
        self.refused_requests += 1
        on_site = f" on site {site_name}" if site_name else ""
        self._log_requests("client %s%s: more than %g requests per second: 429", key, on_site, rate)
        return max(1, math.ceil(wait))

    def retry_after(self, client_ip: str, site: SiteConfig | None = None) -> int | None:
        """This process's bucket: None when a request of `client_ip` to `site` may go ahead
        (taking a token), else the seconds until the client's bucket holds one again (for
        429's Retry-After). `client_ip` is the request's client as `trusted_proxies`
        identify it (`Forwarder.identify`)."""
        return self._take_local(client_ip, *self._rate_of(site))

    def _take_local(self, client_ip: str, site_name: str, rate: float, burst: float) -> int | None:
        if not rate:
            return None
        client = client_key(client_ip)
        key = _bucket(site_name, client)
        now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(burst, now)
            if len(buckets) > MAX_BUCKETS:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return self._refused(client, site_name, rate, (1 - bucket.tokens) / rate)
