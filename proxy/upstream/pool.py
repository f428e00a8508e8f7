"""The choice of upstream for a site, over one pool per upstream.

A pool hands out `UpstreamStream`s: a pooled HTTP/1.1 connection or a stream on a shared
HTTP/2 connection. Round-robin across a site's upstreams, moving on when one cannot connect.
"""

from __future__ import annotations

from typing import Protocol

from proxy.config import LimitsConfig, SiteConfig, Upstream
from proxy.netio import StreamTimeout
from proxy.upstream.h1 import H1Pool
from proxy.upstream.stream import UpstreamStream


class UpstreamUnavailable(Exception):
    """No upstream of the site accepted a connection. `timed_out` picks 504 over 502."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Pool(Protocol):
    upstream: Upstream

    async def open_stream(self) -> UpstreamStream:
        """Raises OSError (refused, unreachable) or StreamTimeout (connect timed out)."""
        ...

    def close_all(self) -> None: ...


def make_pool(upstream: Upstream, limits: LimitsConfig) -> Pool:
    if upstream.scheme == "http":
        return H1Pool(upstream, limits)
    raise ValueError(f"upstream scheme {upstream.scheme!r} is not supported yet")


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
    """All pools of one configuration, shared by every connection of the process."""

    def __init__(self, sites: tuple[SiteConfig, ...], limits: LimitsConfig) -> None:
        pools: dict[Upstream, Pool] = {}
        for site in sites:
            for upstream in site.upstreams:
                if upstream not in pools:
                    pools[upstream] = make_pool(upstream, limits)
        self._pools = pools
        self._sites = {site.name: SiteUpstreams(site, pools) for site in sites}

    def for_site(self, site: SiteConfig) -> SiteUpstreams:
        return self._sites[site.name]

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.close_all()
