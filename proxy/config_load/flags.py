"""`port443 proxy --from HOST --to BACKEND`: a configuration from command-line flags, as
`caddy reverse-proxy` runs without a Caddyfile.

The flags become the table a TOML file would parse into, and the one `ConfigReader` turns it
into a `Config`: the same defaults and the same checks as a file. Only the problems differ,
naming the flag a value came from instead of a file line.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from proxy.config import Config
from proxy.config_load import ConfigReader
from proxy.config_load.convert import dotted
from proxy.config_load.reader import ConfigError, Table
from proxy.toml_lines import KeyLocator, KeyPath

FLAGS_PATH = Path("port443 proxy")  # Config.path of a configuration from flags: no file
# Names that no public CA certifies: the local CA serves them (as Caddy's internal issuer).
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa")


@dataclass(frozen=True, kw_only=True)
class QuickStart:
    """The `port443 proxy` flags; None: the config file's default."""

    origin: str  # --from: host, host:port or https://host[:port]
    backends: tuple[str, ...]  # --to: URLs, or host:port meaning http://host:port
    https_port: int | None = None  # else --from's port, else [listen] https
    http_port: int | None = None
    address: str | None = None
    certs_dir: Path | None = None
    internal_certs: bool = False  # the local CA even for a public name
    email: str | None = None  # ACME contact
    debug: bool = False


def is_local_name(host: str) -> bool:
    """A host only this machine or network knows (localhost, an IP address, .local ...)."""
    name = host.lower().removesuffix(".")
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return name == "localhost" or name.endswith(_LOCAL_SUFFIXES)
    return True


def split_origin(origin: str) -> tuple[str, int | None]:
    """--from's host and port: `host`, `host:port`, `[v6]:port`, with `https://` or no
    scheme, a trailing "/" allowed. ConfigError for anything else (plain http://, a path)."""

    def refuse(why: str) -> ConfigError:
        return ConfigError([f"--from {origin}: {why}"])

    text = origin
    scheme, separator, rest = text.partition("://")
    if separator:
        if scheme.lower() != "https":
            raise refuse("port443 serves HTTPS: give https:// or no scheme")
        text = rest
    text = text.removesuffix("/")
    if any(mark in text for mark in "/?#@"):
        raise refuse("takes a host and an optional port, nothing more")
    host, port = text, ""
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise refuse("an IPv6 address is written [address] or [address]:port")
        port = after[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port:
            raise refuse("a colon must be followed by a port")
    if not host:
        raise refuse("needs a host name: the certificate is made for it")
    if port and not port.isdigit():
        raise refuse(f"port {port!r} is not a number")
    return host, int(port) if port else None


def backend_url(target: str) -> str:
    """--to's backend as an upstream URL: `host:port` means plain HTTP/1.1."""
    return target if "://" in target else f"http://{target}"


def quick_start_config(flags: QuickStart) -> Config:
    """The configuration the flags describe; ConfigError naming the flags at fault."""
    host, port = split_origin(flags.origin)
    https = flags.https_port
    https_flag = f"--https-port {https}"
    if port is not None:
        if https is not None and https != port:
            raise ConfigError([f"--from {flags.origin} and {https_flag} name different ports"])
        https, https_flag = port, f"--from {flags.origin}"
    issuer = "local" if flags.internal_certs or is_local_name(host) else "acme"
    site: Table = {
        "hosts": [host],
        "upstreams": [backend_url(target) for target in flags.backends],
        "issuer": issuer,
    }
    listen: Table = {}
    origins: dict[KeyPath, str] = {
        ("sites", 0, "hosts"): f"--from {flags.origin}",
        ("sites", 0, "upstreams"): "--to",
        **{("sites", 0, "upstreams", i): f"--to {to}" for i, to in enumerate(flags.backends)},
    }
    for name, value, flag in (
        ("https", https, https_flag),
        ("http", flags.http_port, f"--http-port {flags.http_port}"),
        ("address", flags.address, f"--address {flags.address}"),
    ):
        if value is not None:
            listen[name] = value
            origins[("listen", name)] = flag
    root: Table = {
        "listen": listen,
        "admin": {"enabled": False},  # nothing to administer but this one process
        "sites": [site],
    }
    if flags.certs_dir is not None:
        root["certs"] = {"dir": str(flags.certs_dir)}
        origins[("certs", "dir")] = f"--certs-dir {flags.certs_dir}"
    if flags.email is not None:
        root["acme"] = {"email": flags.email}
        origins[("acme", "email")] = f"--email {flags.email}"
    if flags.debug:
        root["log_level"] = "debug"
    return FlagReader(origins).checked(root)


class FlagReader(ConfigReader):
    """The config reader for a table built from flags: problems name their flag."""

    def __init__(self, origins: dict[KeyPath, str]) -> None:
        super().__init__(FLAGS_PATH, KeyLocator(""))
        self._origins = origins

    def _where(self, key: KeyPath, line: int | None) -> str:
        for end in range(len(key), 0, -1):
            flag = self._origins.get(key[:end])
            if flag is not None:
                return flag
        return f"{FLAGS_PATH}: {dotted(key)}"
