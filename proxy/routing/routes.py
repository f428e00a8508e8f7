"""Route matching: the first `[[sites.routes]]` entry whose conditions all hold wins.

Pure functions over the frozen config, no I/O: the forwarder calls `match_route` once per
request of a site that has routes, and the config loader calls `shadowing` to warn about a
route no request can reach.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.config import Redirect, Route
from proxy.http.model import Request


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Origin-form target -> (path, query without the "?")."""
    path, _, query = target.partition(b"?")
    return path, query


def _under(path: bytes, prefix: bytes) -> bool:
    """Whether `path` is `prefix` or below it, at a segment boundary."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] == 0x2F


def matches(route: Route, request: Request, path: bytes) -> bool:
    if route.path is not None and path != route.path.encode():
        return False
    if route.path_prefix is not None and not _under(path, route.path_prefix.encode()):
        return False
    if route.methods is not None and request.method not in route.methods:
        return False
    if route.header is not None:
        name, wanted = route.header
        values = [value for field, value in request.headers if field == name]
        if not values or (wanted is not None and wanted not in values):
            return False
    return True


def match_route(routes: Sequence[Route], request: Request) -> Route | None:
    path = split_target(request.target)[0]
    for route in routes:
        if matches(route, request, path):
            return route
    return None


def rewritten_path(route: Route, path: bytes) -> bytes:
    """The path after `strip_prefix` or `rewrite`: the matched part replaced."""
    matched = route.path if route.path is not None else route.path_prefix
    if matched is None or not (route.strip_prefix or route.rewrite is not None):
        return path
    rest = path[len(matched.encode()) :]
    new = (route.rewrite or "").encode() + rest
    if not new.startswith(b"/"):
        new = b"/" + new
    return new


def rewritten_target(route: Route, target: bytes) -> bytes:
    path, query = split_target(target)
    new = rewritten_path(route, path)
    return new + b"?" + query if b"?" in target else new


def redirect_location(route: Route, redirect: Redirect, target: bytes) -> bytes:
    """The Location of a redirect route: {path} (after strip_prefix / rewrite) and {query}
    (without "?") filled in from the request."""
    path, query = split_target(target)
    location = redirect.target.encode()
    location = location.replace(b"{path}", rewritten_path(route, path))
    return location.replace(b"{query}", query)


def _covers(earlier: Route, later: Route) -> bool:
    """Whether every request `later` matches is matched by `earlier` first."""
    if earlier.methods is not None and (later.methods is None or later.methods - earlier.methods):
        return False
    if earlier.header is not None and earlier.header != later.header:
        return False
    if earlier.path is not None:
        return later.path == earlier.path
    if earlier.path_prefix is None:
        return True
    prefix = earlier.path_prefix.encode()
    later_path = later.path if later.path is not None else later.path_prefix
    return later_path is not None and _under(later_path.encode(), prefix)


def shadowing(routes: Sequence[Route]) -> list[tuple[int, int]]:
    """(shadowed, by) index pairs: routes an earlier route always matches first."""
    found: list[tuple[int, int]] = []
    for index, route in enumerate(routes):
        for earlier in range(index):
            if _covers(routes[earlier], route):
                found.append((index, earlier))
                break
    return found
