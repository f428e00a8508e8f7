"""Keep-alive connection pools, one per upstream, and the choice of upstream for a site."""

from __future__ import annotations

import logging
from collections import deque

import trio

from proxy.config import LimitsConfig, SiteConfig, Upstream
from proxy.netio import StreamTimeout, close_socket, connect_tcp
from proxy.upstream.h1 import UpstreamConnection

log = logging.getLogger(__name__)

IDLE_LIFETIME = 60.0  # seconds an idle pooled connection is kept (nginx: keepalive_timeout 60s)


class UpstreamUnavailable(Exception):
    """No upstream of the site accepted a connection. `timed_out` picks 504 over 502."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ConnectionPool:
    """Idle connections to one upstream, most recently used first (warm sockets, and the
    upstream's idle timeout closes the cold ones at the other end)."""

    def __init__(self, upstream: Upstream, limits: LimitsConfig) -> None:
        self.upstream = upstream
        self._limits = limits
        self._idle: deque[UpstreamConnection] = deque()

    async def acquire(self) -> UpstreamConnection:
        """A live idle connection, or a new one. Raises OSError or StreamTimeout."""
        idle = self._idle
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_LIFETIME and not conn.is_stale():
                conn.reused = True
                return conn
            close_socket(conn.stream.socket)
        upstream = self.upstream
        sock = await connect_tcp(
            upstream.host, upstream.port, now + self._limits.upstream_connect_timeout
        )
        return UpstreamConnection(sock, upstream, self._limits.max_header_bytes)

    def release(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose exchange completed cleanly; close anything else."""
        if not conn.finish_cycle():
            close_socket(conn.stream.socket)
            return
        conn.idle_since = trio.current_time()
        self._idle.append(conn)
        if len(self._idle) > self._limits.upstream_keepalive:
            close_socket(self._idle.popleft().stream.socket)

    def close_all(self) -> None:
        while self._idle:
            close_socket(self._idle.pop().stream.socket)


class SiteUpstreams:
    """Round-robin over a site's upstreams, moving on to the next one when a connect fails."""

    def __init__(self, site: SiteConfig, pools: dict[Upstream, ConnectionPool]) -> None:
        self._pools = [pools[u] for u in site.upstreams]
        self._next = 0

    async def connect(self) -> tuple[ConnectionPool, UpstreamConnection]:
        pools = self._pools
        start = self._next
        self._next = (start + 1) % len(pools)
        errors: list[str] = []
        timed_out = False
        for i in range(len(pools)):
            pool = pools[(start + i) % len(pools)]
            try:
                return pool, await pool.acquire()
            except StreamTimeout:
                timed_out = True
                errors.append(f"{pool.upstream.url}: connect timed out")
            except OSError as exc:
                errors.append(f"{pool.upstream.url}: {exc.strerror or exc}")
        raise UpstreamUnavailable("; ".join(errors), timed_out)


class Upstreams:
    """All pools of one configuration, shared by every connection of the process."""

    def __init__(self, sites: tuple[SiteConfig, ...], limits: LimitsConfig) -> None:
        pools: dict[Upstream, ConnectionPool] = {}
        for site in sites:
            for upstream in site.upstreams:
                if upstream not in pools:
                    pools[upstream] = ConnectionPool(upstream, limits)
        self._pools = pools
        self._sites = {site.name: SiteUpstreams(site, pools) for site in sites}

    def for_site(self, site: SiteConfig) -> SiteUpstreams:
        return self._sites[site.name]

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.close_all()
