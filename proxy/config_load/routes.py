"""`[[sites.routes]]`: matchers, one action each, header operations, compression."""

from __future__ import annotations

import dataclasses
from typing import get_args

from proxy.config import (
    Coding,
    Encode,
    HeaderOps,
    Redirect,
    RedirectStatus,
    Respond,
    Route,
    UpstreamGroup,
)
from proxy.config_load import convert
from proxy.config_load.convert import dotted, show
from proxy.config_load.groups import GroupSections
from proxy.config_load.reader import Table
from proxy.routing.routes import shadowing
from proxy.toml_lines import KeyPath

ENCODE_KEYS = ("encode", "encode_min_size")  # on a route, and on a site (its routes' default)
_ROUTE_KEYS = (
    "path_prefix", "path", "methods", "header", "strip_prefix", "rewrite",
    "upstreams", "redirect", "status", "respond", "request_headers", "response_headers",
    "client_cert",
    *ENCODE_KEYS,
)  # fmt: skip
_ACTIONS = ("upstreams", "redirect", "respond")
_HEADER_MATCH_KEYS = ("name", "value")
_RESPOND_KEYS = tuple(f.name for f in dataclasses.fields(Respond))
_HEADER_OPS_KEYS = ("remove", "set", "add")


class RouteSections(GroupSections):
    """Reads a site's routes; an upstreams action is a group (GroupSections)."""

    def _routes(
        self, site: Table, site_key: KeyPath, groups: dict[str, UpstreamGroup], encode: Encode
    ) -> tuple[Route, ...]:
        key = (*site_key, "routes")
        raw = site.get("routes", [])
        if not isinstance(raw, list):
            self._problem(key, f"must be an array of tables ([[sites.routes]]), got {show(raw)}")
            return ()
        routes: list[Route] = []
        for index, item in enumerate(raw):
            table = self._table(item, (*key, index), _ROUTE_KEYS)
            if table is not None:
                route = self._route(table, (*key, index), groups, site, encode)
                if route is not None:
                    routes.append(route)
        for shadowed, by in shadowing(routes):
            line = self._locator.line((*key, shadowed))
            where = f"{self._path}:{line}" if line else str(self._path)
            self.warnings.append(
                f"{where}: {dotted((*key, shadowed))}: never matches: "
                f"{dotted((*key, by))} above it matches every request it would"
            )
        return tuple(routes)

    def _route(
        self,
        table: Table,
        key: KeyPath,
        groups: dict[str, UpstreamGroup],
        site: Table,
        site_encode: Encode,
    ) -> Route | None:
        actions = [name for name in _ACTIONS if name in table]
        if len(actions) != 1:
            found = ", ".join(actions) or "none"
            self._problem(
                key, f"needs exactly one action of upstreams, redirect, respond ({found})"
            )
            return None
        if "path" in table and "path_prefix" in table:
            self._problem((*key, "path"), "use path or path_prefix, not both")
        if "status" in table and "redirect" not in table:
            self._problem((*key, "status"), "is only used with redirect")
        for name in ENCODE_KEYS:
            if name in table and "upstreams" not in table:
                self._problem((*key, name), "is only used with upstreams")
        action: UpstreamGroup | Redirect | Respond | None
        if "redirect" in table:
            statuses: tuple[RedirectStatus, ...] = get_args(RedirectStatus)
            action = Redirect(
                target=self._value(table, key, "redirect", "/", convert.text),
                status=self._value(table, key, "status", 302, convert.choice(statuses)),
            )
        elif "respond" in table:
            action = self._respond(table, key)
        else:
            action = self._group(table, key, "upstreams", groups, site)
        prefix = self._value(table, key, "path_prefix", None, convert.request_path)
        path = self._value(table, key, "path", None, convert.request_path)
        strip = self._value(table, key, "strip_prefix", False, convert.boolean)
        rewrite = self._value(table, key, "rewrite", None, convert.request_path)
        if (strip or rewrite is not None) and prefix is None and path is None:
            self._problem(
                (*key, "strip_prefix" if strip else "rewrite"), "needs path_prefix or path"
            )
        client_cert = self._value(table, key, "client_cert", None, convert.choice(("required",)))
        if client_cert is not None and "client_ca" not in site:
            self._problem((*key, "client_cert"), "needs client_ca on the site")
        if action is None:
            return None
        return Route(
            action=action,
            path_prefix=prefix,
            path=path,
            methods=self._value(table, key, "methods", None, convert.methods),
            header=self._header_match(table, key),
            strip_prefix=strip,
            rewrite=rewrite,
            request_headers=self._header_ops(table, key, "request_headers"),
            response_headers=self._header_ops(table, key, "response_headers"),
            client_cert_required=client_cert is not None,
            encode=self._encode(table, key, site_encode),
        )

    def _respond(self, table: Table, key: KeyPath) -> Respond:
        respond_key = (*key, "respond")
        inner = self._table(table["respond"], respond_key, _RESPOND_KEYS) or {}
        default = Respond()
        return Respond(
            status=self._value(
                inner, respond_key, "status", 200, convert.integer_between(200, 599)
            ),
            body=self._value(inner, respond_key, "body", "", convert.string),
            content_type=self._value(
                inner, respond_key, "content_type", default.content_type, convert.field_value
            ),
        )

    def _header_match(self, table: Table, key: KeyPath) -> tuple[bytes, bytes | None] | None:
        if "header" not in table:
            return None
        header_key = (*key, "header")
        inner = self._table(table["header"], header_key, _HEADER_MATCH_KEYS) or {}
        name = self._value(inner, header_key, "name", b"", convert.field_name)
        if not name:
            self._problem((*header_key, "name"), "is required")
        value = self._value(inner, header_key, "value", None, convert.field_value)
        return name, value.encode("latin-1") if value is not None else None

    def _header_ops(self, table: Table, key: KeyPath, name: str) -> HeaderOps:
        ops_key = (*key, name)
        inner = self._table(table.get(name, {}), ops_key, _HEADER_OPS_KEYS) or {}
        default = HeaderOps()
        remove = self._value(inner, ops_key, "remove", default.remove, convert.field_names)
        edits = {
            op: self._value(inner, ops_key, op, default.add, convert.fields)
            for op in ("set", "add")
        }
        return HeaderOps(remove=remove, set=edits["set"], add=edits["add"])

    def _encode(self, table: Table, key: KeyPath, default: Encode) -> Encode:
        """`encode` and `encode_min_size` of a site or route; what is absent, from `default`."""
        codings: tuple[Coding, ...] = get_args(Coding)
        encode = Encode(
            codings=self._value(
                table, key, "encode", default.codings, convert.choices(codings, empty_allowed=True)
            ),
            min_size=self._value(
                table, key, "encode_min_size", default.min_size, convert.integer(0)
            ),
        )
        if "encode_min_size" in table and not encode.codings:
            self._problem((*key, "encode_min_size"), "is only used with encode")
        return encode
