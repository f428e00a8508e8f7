"""The pools of one configuration, and its upstream groups over them.

A pool hands out `UpstreamStream`s: a pooled HTTP/1.1 connection or a stream on a shared
HTTP/2 connection. The scheme picks the pool: http:// HTTP/1.1, h2c:// HTTP/2 with prior
knowledge, https:// TLS with ALPN choosing HTTP/2 or HTTP/1.1 for each new connection. The
choice among a group's backends is `upstream/group.py`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import trio

from proxy.config import LimitsConfig, SiteConfig, Upstream, UpstreamGroup
from proxy.upstream.connect import Connector, OtherProtocol
from proxy.upstream.group import GroupUpstreams
from proxy.upstream.h1 import H1Pool
from proxy.upstream.h2 import H2Pool, Spawn
from proxy.upstream.stream import Pool, UpstreamStream

HealthObserver = Callable[[UpstreamGroup, str, bool], None]  # group, backend URL, up


def ignore_health(group: UpstreamGroup, url: str, up: bool) -> None:
    """No observer: the log line is the only record."""


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


class Upstreams:
    """All pools of one configuration, shared by every connection of the process.

    HTTP/2 connections have tasks of their own (reader, writer) that outlive the requests
    using them: `run` owns them, and must run while requests use these pools.
    """

    def __init__(
        self,
        sites: tuple[SiteConfig, ...],
        limits: LimitsConfig,
        on_health: HealthObserver = ignore_health,
    ) -> None:
        # Pools are per upstream and connect timeout (a group setting), shared by groups.
        pools: dict[tuple[Upstream, float], Pool] = {}
        self._pools = pools
        self._by_site: dict[str, GroupUpstreams] = {}
        self._by_group: dict[int, GroupUpstreams] = {}  # id() of a route's UpstreamGroup
        for site in sites:
            groups = site.groups  # the site's own group first, if it has upstreams
            for group in groups:
                if id(group) not in self._by_group:
                    self._by_group[id(group)] = self._runtime(group, limits, on_health)
            if site.upstreams:
                self._by_site[site.name] = self._by_group[id(groups[0])]
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    def _runtime(
        self, group: UpstreamGroup, limits: LimitsConfig, on_health: HealthObserver
    ) -> GroupUpstreams:
        """The group over its pools, created as needed; it keeps `group` alive, so the id()
        keys stay unique."""
        timeouts = group.timeouts
        connect = timeouts.connect or limits.upstream_connect_timeout
        group_limits = dataclasses.replace(limits, upstream_connect_timeout=connect)
        members = []
        for upstream in group.upstreams:
            key = (upstream, connect)
            if key not in self._pools:
                self._pools[key] = make_pool(upstream, group_limits, self._spawn)
            members.append(self._pools[key])
        first_byte = timeouts.first_byte or limits.upstream_timeout
        idle = timeouts.idle or limits.upstream_timeout
        return GroupUpstreams(group, members, (first_byte, idle), on_health)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the connections' tasks. Returns after close_all(), once they have closed."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with trio.open_nursery() as checks:  # ended at close; connections are not
                for group in self._by_group.values():
                    checks.start_soon(group.check_health)
                task_status.started()
                await self._closed.wait()
                checks.cancel_scope.cancel()

    def for_site(self, site: SiteConfig) -> GroupUpstreams:
        """The site's own group: what a site without routes sends everything to."""
        return self._by_site[site.name]

    def for_group(self, group: UpstreamGroup) -> GroupUpstreams:
        """A route's group (the same object the config holds)."""
        return self._by_group[id(group)]

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
