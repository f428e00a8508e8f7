"""Converters: a TOML value -> a model value, or `Invalid` with a message for the user."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from proxy.config import (
    IPNetwork,
    Upstream,
    UpstreamScheme,
    is_ip_address,
)
from proxy.toml_lines import KeyPath

T = TypeVar("T")

_BACKEND_KEYS = ("url", "weight")
_REQUEST_PATH = re.compile(r"/[\x21\x22\x24-\x3e\x40-\x7e]*")  # visible ASCII, no ? or #
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HASH_KEY = re.compile(r"client_ip|(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_MAX_WORKERS = 1024
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+=*")
_HOST_WITH_PORT = re.compile(r"[^:]+:\d*|\[[^\]]*\]:\d*")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DEFAULT_PORTS: dict[UpstreamScheme, int] = {"http": 80, "h2c": 80, "https": 443}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Invalid(ValueError):
    """A value failed a check; the message is reported against the value's key."""


def choice(options: tuple[T, ...]) -> Callable[[object], T]:
    def convert(value: object) -> T:
        for option in options:
            if value == option:
                return option
        shown = ", ".join(show(option) for option in options)
        raise Invalid(f"must be one of {shown}, got {show(value)}")

    return convert


def choices(
    options: tuple[T, ...], *, empty_allowed: bool = False
) -> Callable[[object], tuple[T, ...]]:
    """An array of distinct `options`, order kept (a preference); non-empty unless allowed."""
    one = choice(options)

    def convert(value: object) -> tuple[T, ...]:
        if not isinstance(value, list) or not (value or empty_allowed):
            raise Invalid(f"must be a non-empty array, got {show(value)}")
        chosen = tuple(one(element) for element in value)
        if len(set(chosen)) < len(chosen):
            raise Invalid(f"must not repeat a value, got {show(value)}")
        return chosen

    return convert


def port(low: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and low <= value <= 65535:
            return value
        raise Invalid(f"must be an integer port {low}-65535, got {show(value)}")

    return convert


def integer_between(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and low <= value <= high:
            return value
        raise Invalid(f"must be an integer from {low} to {high}, got {show(value)}")

    return convert


def integer(minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if type(value) is int and value >= minimum:
            return value
        raise Invalid(f"must be an integer >= {minimum}, got {show(value)}")

    return convert


def backend(value: object) -> tuple[Upstream, int]:
    """A backend: its URL, or a table { url = "...", weight = 2 }."""
    if not isinstance(value, dict):
        return upstream(value), 1
    unknown = [name for name in value if name not in _BACKEND_KEYS]
    if unknown:
        raise Invalid(f"unknown key {show(unknown[0])} (a backend has url and weight)")
    if "url" not in value:
        raise Invalid('a backend table needs url = "http://..."')
    return upstream(value["url"]), integer_between(1, 1000)(value.get("weight", 1))


def networks(value: object) -> tuple[IPNetwork, ...]:
    """An array of CIDRs ("10.0.0.0/8") or single addresses."""
    if not isinstance(value, list):
        raise Invalid(f'must be an array of CIDRs such as "10.0.0.0/8", got {show(value)}')
    try:
        return tuple(ipaddress.ip_network(str(item), strict=False) for item in value)
    except ValueError as exc:
        raise Invalid(f"must be an array of CIDRs: {exc}") from None


def request_path(value: object) -> str:
    if isinstance(value, str) and _REQUEST_PATH.fullmatch(value):
        return value
    raise Invalid(f'must be a path starting with "/", without query, got {show(value)}')


def methods(value: object) -> frozenset[bytes]:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, str) and _TOKEN.fullmatch(m) for m in value)
    ):
        return frozenset(str(m).upper().encode("ascii") for m in value)
    raise Invalid(
        f'must be a non-empty array of methods such as ["GET", "HEAD"], got {show(value)}'
    )


def hash_key(value: object) -> str:
    if isinstance(value, str) and _HASH_KEY.fullmatch(value):
        return value
    raise Invalid(f'must be "client_ip", "header:<name>" or "cookie:<name>", got {show(value)}')


def string(value: object) -> str:
    if isinstance(value, str):
        return value
    raise Invalid(f"must be a string, got {show(value)}")


def field_name(value: object) -> bytes:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value.lower().encode("ascii")
    raise Invalid(f"must be a header field name, got {show(value)}")


def field_value(value: object) -> str:
    if isinstance(value, str) and _FIELD_VALUE.fullmatch(value) and value == value.strip():
        try:
            value.encode("latin-1")
            return value
        except UnicodeEncodeError:
            pass
    raise Invalid(f"must be a header field value (no control characters), got {show(value)}")


def field_names(value: object) -> tuple[bytes, ...]:
    if isinstance(value, list):
        return tuple(field_name(name) for name in value)
    raise Invalid(f"must be an array of header names, got {show(value)}")


def fields(value: object) -> tuple[tuple[bytes, bytes], ...]:
    """A table of header fields, { "X-Name" = "value" }."""
    if not isinstance(value, dict):
        raise Invalid(f'must be a table such as {{ "X-Name" = "value" }}, got {show(value)}')
    return tuple(
        (field_name(name), field_value(text).encode("latin-1")) for name, text in value.items()
    )


def string_table(value: object) -> dict[str, str]:
    """A table of text values, { name = "value" } (a provider's options)."""
    if not isinstance(value, dict):
        raise Invalid(f'must be a table of strings such as {{ name = "value" }}, got {show(value)}')
    for name, text in value.items():
        if not isinstance(text, str):
            raise Invalid(f"{name} must be a string, got {show(text)}")
    return {str(name): text for name, text in value.items()}


def limit_converter(kind: object, *, zero_allowed: bool) -> Callable[[object], Any]:
    """[limits] values are counts (integers) or seconds and rates (numbers); 0 means "off"
    or "none" only where the key allows it."""
    if kind is int:
        return integer(0 if zero_allowed else 1)
    return number_at_least_zero if zero_allowed else positive_number


def workers(value: object) -> int:
    """A worker count, or "auto": one per CPU this process may run on (its affinity mask,
    which taskset and container cpusets narrow)."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if type(value) is int and 1 <= value <= _MAX_WORKERS:
        return value
    raise Invalid(f'must be "auto" or an integer from 1 to {_MAX_WORKERS}, got {show(value)}')


def number_at_least_zero(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    raise Invalid(f"must be a number >= 0, got {show(value)}")


def positive_number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise Invalid(f"must be a number > 0, got {show(value)}")


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid(f"must be true or false, got {show(value)}")


def path(value: object) -> Path:
    """A file system path; relative ones are taken from the current working directory."""
    if isinstance(value, str) and value:
        return Path(value).absolute()
    raise Invalid(f"must be a non-empty path string, got {show(value)}")


def optional_path(value: object) -> Path | None:
    """A path, or None for "" (the default destination, e.g. stdout)."""
    return None if value == "" else path(value)


def text(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise Invalid(f"must be a non-empty string, got {show(value)}")


def email(value: object) -> str:
    if isinstance(value, str) and _EMAIL.fullmatch(value):
        return value
    raise Invalid(f'must be an email address such as "admin@example.com", got {show(value)}')


def base64url(value: object) -> str:
    if isinstance(value, str) and _BASE64URL.fullmatch(value):
        return value
    raise Invalid(f"must be base64url text, as the CA hands it out, got {show(value)}")


def redis_url(value: object) -> str:
    if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
        return value
    raise Invalid(f'must be a "redis://" or "rediss://" URL, got {show(value)}')


def sentinels(value: object) -> tuple[tuple[str, int], ...]:
    """Redis Sentinels: "host" or "host:port" ("[IPv6]:port"), port 26379 when none is given."""
    if not isinstance(value, list) or not value:
        raise Invalid(f'must be an array such as ["10.0.0.1:26379"], got {show(value)}')
    return tuple(_sentinel(element) for element in value)


def _sentinel(value: object) -> tuple[str, int]:
    text = value if isinstance(value, str) else ""
    name, port_text = text, "26379"
    if text.startswith("[") and "]" in text:
        name, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") if rest else port_text
    elif text.count(":") == 1:
        name, _, port_text = text.partition(":")
    port = int(port_text) if port_text.isdigit() else 0
    if not 1 <= port <= 65535:
        raise Invalid(f'must be "host" or "host:port", got {show(value)}')
    return host(name), port


def encryption_key(value: object) -> str:
    """base64url of 32 bytes, e.g. from `openssl rand -base64 32 | tr +/ -_`."""
    try:
        if isinstance(value, str) and len(base64.urlsafe_b64decode(value)) == 32:
            return value
    except ValueError:
        pass
    raise Invalid("must be the base64url text of 32 random bytes")


def lock_ttl(value: object) -> float:
    number = positive_number(value)
    if number < 1:
        raise Invalid(f"must be at least 1 (seconds), got {show(value)}")
    return number


def _url_scheme(value: object) -> str | None:
    """The scheme of a URL with a host, or None if `value` is not one."""
    try:
        url = urlsplit(value) if isinstance(value, str) else None
    except ValueError:
        url = None
    return url.scheme if url is not None and url.hostname else None


def https_url(value: object) -> str:
    """An ACME directory URL: https, with a host."""
    if _url_scheme(value) != "https":
        raise Invalid(f"must be an https:// URL, got {show(value)}")
    return str(value)


def ask_url(value: object) -> str:
    """An on-demand `ask` endpoint: http or https, with a host; `domain=` is appended to
    its query, so it has no fragment."""
    if _url_scheme(value) not in ("http", "https") or "#" in str(value):
        raise Invalid(f'must be an http:// or https:// URL without "#", got {show(value)}')
    return str(value)


def http_url(value: object) -> str:
    """A collector's URL: http or https, with a host."""
    if _url_scheme(value) not in ("http", "https"):
        raise Invalid(f"must be an http:// or https:// URL, got {show(value)}")
    return str(value)


def ratio(value: object) -> float:
    """A share: a number from 0 to 1."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise Invalid(f"must be a number from 0 to 1, got {show(value)}")


def ip_addresses(value: object) -> tuple[str, ...]:
    """One IP address or a non-empty array of them; repeats are dropped."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise Invalid("must not be an empty array")
    return tuple(dict.fromkeys(ip_address(element) for element in values))


def ip_address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(value if isinstance(value, str) else ""))
    except ValueError:
        raise Invalid(
            f'must be an IP address such as "0.0.0.0" or "::", got {show(value)}'
        ) from None


def host(value: object) -> str:
    """A site host as clients send it: a lower-case DNS name (A-label) or a bare IP literal."""
    if not isinstance(value, str):
        raise Invalid(f"must be a host name string, got {show(value)}")
    literal = value[1:-1] if value[:1] == "[" and value[-1:] == "]" else value
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if _HOST_WITH_PORT.fullmatch(value):
        raise Invalid(f"host {show(value)} must not include a port")
    try:
        name = value.removesuffix(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise Invalid(f"host {show(value)} is not a valid DNS name or IP address")
    return name


def site_host(value: object) -> str:
    """A site host: as `host`, or a wildcard DNS name `*.example.com` (one label)."""
    if isinstance(value, str) and value.startswith("*."):
        try:
            parent = host(value[2:])
        except Invalid:
            raise Invalid(f"host {show(value)} is not a valid DNS name or IP address") from None
        if "." not in parent or is_ip_address(parent):
            raise Invalid(f"wildcard {show(value)} must stand for a label under a DNS domain")
        return f"*.{parent}"
    return host(value)


def base64_secret(value: object) -> str:
    """A base64 secret, as TSIG key generators print it."""
    if isinstance(value, str) and value:
        try:
            binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
            return value
        except (binascii.Error, UnicodeEncodeError):
            pass
    raise Invalid("must be base64 text, as tsig-keygen or keymgr print it")


def dns_server(value: object) -> tuple[str, int]:
    """ "IP" or "IP:port" ("[IPv6]:port"); port 53 when none is given."""
    text = value if isinstance(value, str) else ""
    address, port = text, 53
    if text.startswith("[") and "]:" in text:
        address, _, port_text = text[1:].partition("]:")
        port = int(port_text) if port_text.isdigit() else 0
    elif text.count(":") == 1:
        address, _, port_text = text.partition(":")
        port = int(port_text) if port_text.isdigit() else 0
    if not is_ip_address(address) or not 1 <= port <= 65535:
        raise Invalid(
            f'must be an IP address with an optional port, "127.0.0.1:53", got {show(value)}'
        )
    return str(ipaddress.ip_address(address)), port


def dns_servers(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise Invalid(f"must be an array of servers, got {show(value)}")
    return tuple(dns_server(element) for element in value)


def upstream(value: object) -> Upstream:
    """An upstream base URL: scheme and authority only, the request supplies the path."""
    if not isinstance(value, str) or "://" not in value:
        raise Invalid(f'must be a URL such as "http://127.0.0.1:8000", got {show(value)}')
    url = urlsplit(value)
    scheme = cast(UpstreamScheme, url.scheme.lower())
    if scheme not in _DEFAULT_PORTS:
        raise Invalid(f"scheme must be http, h2c or https, got {show(value)}")
    if "@" in url.netloc:
        raise Invalid(f"must not contain user info, got {show(value)}")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise Invalid(f"must not have a path, query or fragment, got {show(value)}")
    if not url.hostname:
        raise Invalid(f"must name a host, got {show(value)}")
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise Invalid(f"port must be 1-65535, got {show(value)}")
    port = port or _DEFAULT_PORTS[scheme]
    authority = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return Upstream(f"{scheme}://{authority}:{port}", scheme, url.hostname, port)


def show(value: object) -> str:
    """`value` as a user would write it in TOML, or its kind when that would be long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    return str(value)


def dotted(key: KeyPath) -> str:
    """("sites", 1, "hosts", 0) -> "sites[1].hosts[0]"."""
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{name}" if text else name
    return text
