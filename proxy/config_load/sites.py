"""`[[sites]]`: hosts, certificate source and challenge, routes or upstreams."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

from proxy.config import (
    ChallengeType,
    Encode,
    Issuer,
    SiteConfig,
    UpstreamGroup,
)
from proxy.config_load import convert
from proxy.config_load.convert import dotted, show
from proxy.config_load.groups import UPSTREAM_TLS_KEYS
from proxy.config_load.reader import Table
from proxy.config_load.routes import ENCODE_KEYS, RouteSections
from proxy.toml_lines import KeyPath

_SITE_KEYS = (
    "hosts", "upstreams", "cert", "key", "issuer", "challenge", *UPSTREAM_TLS_KEYS, "routes",
    *ENCODE_KEYS,
)  # fmt: skip


class SiteSections(RouteSections):
    """Reads the sites; a host may be served by one site only."""

    def _sites(
        self, root: Table, issuer: Issuer, groups: dict[str, UpstreamGroup]
    ) -> tuple[SiteConfig, ...]:
        key: KeyPath = ("sites",)
        raw = root.get("sites", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[sites]]), got {show(raw)}")
            return ()
        if not raw:
            self._problem(key, "at least one [[sites]] table is required")
        sites: list[SiteConfig] = []
        served_by: dict[str, KeyPath] = {}
        for index, item in enumerate(raw):
            site_key = (*key, index)
            table = self._table(item, site_key, _SITE_KEYS)
            if table is None:
                continue
            hosts = self._each(table, site_key, "hosts", convert.site_host)
            for host_key, host in hosts.items():
                if host in served_by:
                    owner = dotted(served_by[host])
                    self._problem(host_key, f"host {show(host)} is already served by {owner}")
                served_by.setdefault(host, site_key)
            encode = self._encode(table, site_key, Encode())
            routes = self._routes(table, site_key, groups, encode)
            group = None
            if "upstreams" in table or not routes:
                group = self._group(table, site_key, "upstreams", groups, table)
            if group is not None and not isinstance(table.get("upstreams"), str):
                group = dataclasses.replace(group, name=next(iter(hosts.values()), ""))
            site_issuer = self._value(
                table, site_key, "issuer", None, convert.choice(get_args(Issuer))
            )
            challenge = self._challenge(table, site_key, site_issuer or issuer, hosts)
            cert, private_key = (
                self._site_file(table, site_key, name, site_issuer or issuer)
                for name in ("cert", "key")
            )
            sites.append(
                SiteConfig(
                    hosts=tuple(hosts.values()),
                    upstreams=group.upstreams if group else (),
                    cert=cert,
                    key=private_key,
                    issuer=site_issuer,
                    group=group,
                    routes=routes,
                    challenge=challenge,
                    encode=encode,
                )
            )
        return tuple(sites)

    def _challenge(
        self, table: Table, site_key: KeyPath, issuer: Issuer, hosts: dict[KeyPath, str]
    ) -> ChallengeType | None:
        """The site's own challenge type; a wildcard host can only be validated by dns-01."""
        types: tuple[ChallengeType, ...] = get_args(ChallengeType)
        challenge = self._value(table, site_key, "challenge", None, convert.choice(types))
        if challenge is not None and issuer != "acme":
            self._problem(
                (*site_key, "challenge"), f'is only used with issuer "acme", not "{issuer}"'
            )
        if issuer == "acme" and challenge != "dns-01":
            for host_key, host in hosts.items():
                if host.startswith("*."):
                    self._problem(host_key, f'wildcard {show(host)} needs challenge = "dns-01"')
        return challenge

    def _site_file(self, table: Table, site_key: KeyPath, name: str, issuer: Issuer) -> Path | None:
        """A site's cert or key path: required and existing with issuer "files", else absent."""
        key = (*site_key, name)
        path = self._value(table, site_key, name, None, convert.path)
        if issuer != "files" and name in table:
            self._problem(key, f'is only used with issuer "files" (the site\'s is "{issuer}")')
        elif issuer == "files" and name not in table:
            self._problem(key, 'is required with issuer "files"')
        elif path is not None and not path.is_file():
            self._problem(key, f"file not found: {path}")
        return path
