"""Everything built from one configuration, replaced as a unit when the config is reloaded.

Requests hold on to the generation they started in, so a reload never changes the
upstreams or policy under a request in flight; new requests, also on connections that are
already open, use the newest generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import trio

from proxy.certs.manager import CertManager
from proxy.config import Config
from proxy.handlers.forward import Forwarder
from proxy.handlers.redirect import Redirector
from proxy.upstream.pool import HealthObserver, Upstreams, ignore_health


class Generation:
    def __init__(
        self, config: Config, alpn: Sequence[str], on_health: HealthObserver = ignore_health
    ) -> None:
        self.config = config
        self.certs = CertManager(config, alpn)
        self.upstreams = Upstreams(config.sites, config.limits, on_health)
        self.forwarder = Forwarder(config, self.upstreams)
        self.redirector = Redirector(config.listen.https, config.certs.dir)
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Certificate upkeep and upstream connections for this generation; started() once
        certificates are loaded. After retire() it ends when its upstream connections have."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.upstreams.run)
            with self._scope:
                await self.certs.run(task_status=task_status)

    def retire(self) -> None:
        """Stop renewals and release idle upstream connections; requests in flight finish
        on what they hold, and their connections close instead of going back to a pool."""
        self._scope.cancel()
        self.upstreams.close_all()


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human-readable differences, for the reload log line."""
    old_sites = {site.name: site for site in old.sites}
    new_sites = {site.name: site for site in new.sites}
    changes = [f"site {name} added" for name in new_sites.keys() - old_sites.keys()]
    changes += [f"site {name} removed" for name in old_sites.keys() - new_sites.keys()]
    changes += [
        f"site {name} changed"
        for name in old_sites.keys() & new_sites.keys()
        if old_sites[name] != new_sites[name]
    ]
    changes += [
        f"{field.name} changed"
        for field in dataclasses.fields(Config)
        if field.compare
        and field.name not in ("path", "sites")
        and getattr(old, field.name) != getattr(new, field.name)
    ]
    return sorted(changes)
