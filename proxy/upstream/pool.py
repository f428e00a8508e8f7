"""The choice of upstream for a site, over one pool per upstream.

A pool hands out `UpstreamStream`s: a pooled HTTP/1.1 connection or a stream on a shared
HTTP/2 connection. Round-robin across a site's upstreams, moving on when one cannot connect.
The scheme picks the pool: http:// HTTP/1.1, h2c:// HTTP/2 with prior knowledge, https://
TLS with ALPN choosing HTTP/2 or HTTP/1.1 for each new connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from proxy.config import LimitsConfig, SiteConfig, Upstream
from proxy.netio import StreamTimeout
from proxy.upstream.connect import Connector, OtherProtocol
from proxy.upstream.h1 import H1Pool
from proxy.upstream.h2 import H2Pool, Spawn
from proxy.upstream.stream import Pool, UpstreamStream


class UpstreamUnavailable(Exception):
    """No upstream of the site accepted a connection. `timed_out` picks 504 over 502."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ALPNPool(Pool):
    """An https:// upstream: each new connection speaks what ALPN chose, h2 preferred.

    While the upstream chooses HTTP/2, new connections go through the HTTP/2 pool, which
    opens one at a time and fills it; once it chooses HTTP/1.1, they are opened in parallel.
    """

    def __init__(self, upstream: Upstream, limits: LimitsConfig, spawn: Spawn) -> None:
        self.upstream = upstream
        self._connector = Connector(upstream, limits.upstream_connect_timeout)
        self._h1 = H1Pool(upstream, limits, self._connector)
        self._h2 = H2Pool(upstream, limits, self._connector, spawn)
        self._http1 = False  # what the upstream chose last

    async def open_stream(self) -> UpstreamStream:
        idle = self._h1.take_idle()
        if idle is not None:
            return idle
        if not self._http1:
            try:
                return await self._h2.open_stream()
            except OtherProtocol as exc:
                self._http1 = True
                return self._h1.adopt(exc.transport)
        transport = await self._connector.connect()
        self._http1 = transport.protocol == "http/1.1"
        return self._h1.adopt(transport) if self._http1 else await self._h2.adopt(transport)

    def close_all(self) -> None:
        self._h1.close_all()
        self._h2.close_all()


def make_pool(upstream: Upstream, limits: LimitsConfig, spawn: Spawn) -> Pool:
    if upstream.scheme == "https":
        return ALPNPool(upstream, limits, spawn)
    connector = Connector(upstream, limits.upstream_connect_timeout)
    if upstream.scheme == "h2c":
        return H2Pool(upstream, limits, connector, spawn)
    return H1Pool(upstream, limits, connector)


class SiteUpstreams:
    """Round-robin over a site's upstreams, moving on to the next one when a connect fails."""

    def __init__(self, site: SiteConfig, pools: dict[Upstream, Pool]) -> None:
        self._pools = [pools[u] for u in site.upstreams]
        self._next = 0

    async def open_stream(self) -> UpstreamStream:
        pools = self._pools
        start = self._next
        self._next = (start + 1) % len(pools)
        errors: list[str] = []
        timed_out = False
        for i in range(len(pools)):
            pool = pools[(start + i) % len(pools)]
            try:
                return await pool.open_stream()
            except StreamTimeout:
                timed_out = True
                errors.append(f"{pool.upstream.url}: connect timed out")
            except OSError as exc:
                errors.append(f"{pool.upstream.url}: {exc.strerror or exc}")
        raise UpstreamUnavailable("; ".join(errors), timed_out)


class Upstreams:
    """All pools of one configuration, shared by every connection of the process.

    HTTP/2 connections have tasks of their own (reader, writer) that outlive the requests
    using them: `run` owns them, and must run while requests use these pools.
    """

    def __init__(self, sites: tuple[SiteConfig, ...], limits: LimitsConfig) -> None:
        pools: dict[Upstream, Pool] = {}
        for site in sites:
            for upstream in site.upstreams:
                if upstream not in pools:
                    pools[upstream] = make_pool(upstream, limits, self._spawn)
        self._pools = pools
        self._sites = {site.name: SiteUpstreams(site, pools) for site in sites}
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the connections' tasks. Returns after close_all(), once they have closed."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._closed.wait()

    def for_site(self, site: SiteConfig) -> SiteUpstreams:
        return self._sites[site.name]

    def close_all(self) -> None:
        """Close idle connections; busy ones close once their requests are done."""
        self._closed.set()
        for pool in self._pools.values():
            pool.close_all()

    def _spawn(self, task: Callable[[], Awaitable[None]]) -> None:
        """Start a connection's task; OSError (a 502) once this configuration is gone."""
        if self._nursery is None:
            raise RuntimeError("Upstreams.run() must be running to open HTTP/2 connections")
        try:
            self._nursery.start_soon(task)
        except RuntimeError as exc:  # the nursery has closed: every connection is gone
            raise OSError("upstream pools of a replaced configuration are closed") from exc
