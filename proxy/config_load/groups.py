"""Upstream groups: `[[upstream_groups]]`, and the inline arrays or tables sites and routes use."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any, get_args, get_type_hints

from proxy.config import (
    GroupTimeouts,
    HealthConfig,
    Policy,
    Upstream,
    UpstreamGroup,
)
from proxy.config_load import convert
from proxy.config_load.convert import dotted, show
from proxy.config_load.reader import Reader, Table
from proxy.toml_lines import KeyPath

UPSTREAM_TLS_KEYS = ("upstream_ca", "upstream_server_name")
_GROUP_KEYS = (
    "backends", "policy", "hash_key", "health", "timeouts", "retries", "retry_deadline",
    "retry_buffer", "retry_non_idempotent", *UPSTREAM_TLS_KEYS,
)  # fmt: skip
_NAMED_GROUP_KEYS = ("name", *_GROUP_KEYS)
_HEALTH_TYPES = get_type_hints(HealthConfig)
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(GroupTimeouts))
_MAX_RETRY_BUFFER = 16 * 1024 * 1024  # per request in flight: memory, not a disk spool


class GroupSections(Reader):
    """Reads upstream groups: backends, policy, health checks, timeouts, upstream TLS."""

    def _named_groups(self, root: Table) -> dict[str, UpstreamGroup]:
        """`[[upstream_groups]]`: groups that routes and sites name."""
        key: KeyPath = ("upstream_groups",)
        raw = root.get("upstream_groups", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[upstream_groups]]), got {show(raw)}")
            return {}
        groups: dict[str, UpstreamGroup] = {}
        for index, item in enumerate(raw):
            group_key = (*key, index)
            table = self._table(item, group_key, _NAMED_GROUP_KEYS)
            if table is None:
                continue
            name = self._value(table, group_key, "name", "", convert.text)
            if not name:
                self._problem((*group_key, "name"), "is required")
            elif name in groups:
                self._problem((*group_key, "name"), f"group {show(name)} is defined twice")
            group = self._group_table(table, group_key, name, table)
            if group is not None and name:
                groups[name] = group
        return groups

    def _group(
        self,
        table: Table,
        key: KeyPath,
        name: str,
        groups: dict[str, UpstreamGroup],
        tls: Table,
    ) -> UpstreamGroup | None:
        """`table[name]`: an array of backends, a group table, or a named group's name;
        https backends take upstream_ca / upstream_server_name from `tls`."""
        value = table.get(name)
        group_key = (*key, name)
        if isinstance(value, str):
            if value not in groups:
                self._problem(group_key, f"no [[upstream_groups]] entry is named {show(value)}")
            return groups.get(value)
        if isinstance(value, dict):
            inner = self._table(value, group_key, _GROUP_KEYS)
            return None if inner is None else self._group_table(inner, group_key, dotted(key), tls)
        backends = self._backends(table, key, name, tls)
        return UpstreamGroup(name=dotted(key), upstreams=backends[0], weights=backends[1])

    def _group_table(self, table: Table, key: KeyPath, name: str, tls: Table) -> UpstreamGroup:
        upstreams, weights = self._backends(table, key, "backends", {**tls, **table})
        policies: tuple[Policy, ...] = get_args(Policy)
        default = UpstreamGroup(name=name, upstreams=upstreams)
        policy = self._value(table, key, "policy", default.policy, convert.choice(policies))
        hash_key = self._value(table, key, "hash_key", default.hash_key, convert.hash_key)
        if "hash_key" in table and policy != "consistent_hash":
            self._problem((*key, "hash_key"), 'is only used with policy = "consistent_hash"')
        return UpstreamGroup(
            name=name,
            upstreams=upstreams,
            weights=weights,
            policy=policy,
            hash_key=hash_key,
            health=self._health(table, key),
            timeouts=self._timeouts(table, key),
            retries=self._value(table, key, "retries", default.retries, convert.integer(0)),
            retry_deadline=self._value(
                table, key, "retry_deadline", default.retry_deadline, convert.positive_number
            ),
            retry_buffer=self._value(
                table,
                key,
                "retry_buffer",
                default.retry_buffer,
                convert.integer_between(0, _MAX_RETRY_BUFFER),
            ),
            retry_non_idempotent=self._value(
                table, key, "retry_non_idempotent", default.retry_non_idempotent, convert.boolean
            ),
        )

    def _backends(
        self, table: Table, key: KeyPath, name: str, tls: Table
    ) -> tuple[tuple[Upstream, ...], tuple[int, ...]]:
        """The backends and their weights (all 1: no weights)."""
        backends = list(self._each(table, key, name, convert.backend).values())
        upstreams = self._upstream_tls(tls, key, [upstream for upstream, _ in backends])
        weights = tuple(weight for _, weight in backends)
        return upstreams, weights if any(weight != 1 for weight in weights) else ()

    def _health(self, table: Table, key: KeyPath) -> HealthConfig:
        health_key = (*key, "health")
        inner = self._table(table.get("health", {}), health_key, _HEALTH_TYPES) or {}
        default = HealthConfig()
        converters: dict[str, Callable[[object], Any]] = {
            "path": convert.request_path,
            "status": convert.integer_between(100, 599),
            "host": convert.host,
        }
        values: dict[str, Any] = {
            name: self._value(
                inner,
                health_key,
                name,
                getattr(default, name),
                converters.get(name)
                or (convert.integer(1) if kind is int else convert.positive_number),
            )
            for name, kind in _HEALTH_TYPES.items()
        }
        return HealthConfig(**values)

    def _timeouts(self, table: Table, key: KeyPath) -> GroupTimeouts:
        timeouts_key = (*key, "timeouts")
        inner = self._table(table.get("timeouts", {}), timeouts_key, _TIMEOUT_KEYS) or {}
        values = {
            name: self._value(inner, timeouts_key, name, None, convert.positive_number)
            for name in _TIMEOUT_KEYS
        }
        return GroupTimeouts(**values)

    def _upstream_tls(
        self, table: Table, site_key: KeyPath, upstreams: Collection[Upstream]
    ) -> tuple[Upstream, ...]:
        """A group's upstreams, the https ones carrying upstream_ca and upstream_server_name
        of `table` (part of an Upstream's identity: pools are keyed by it)."""
        ca = self._value(table, site_key, "upstream_ca", None, convert.path)
        server_name = self._value(table, site_key, "upstream_server_name", None, convert.host)
        if upstreams and not any(upstream.scheme == "https" for upstream in upstreams):
            for name in ("upstream_ca", "upstream_server_name"):
                if name in table:
                    self._problem((*site_key, name), "is only used with https:// upstreams")
        elif ca is not None:
            self._check_ca_bundle((*site_key, "upstream_ca"), ca)
        return tuple(
            dataclasses.replace(upstream, ca=ca, server_name=server_name)
            if upstream.scheme == "https"
            else upstream
            for upstream in upstreams
        )
