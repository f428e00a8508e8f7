"""The container image's HEALTHCHECK: exit 0 when the proxy answers GET /healthz, else 1.

/healthz is served by the admin listener (`[admin]`, default 127.0.0.1:2019), which is never
published. With the admin listener disabled, a TCP connection to the HTTPS port stands in.
Reads the configuration the container runs with: $PORT443_CONFIG, default
/etc/port443/port443.toml (set the variable when the container runs with another `-c`).

Runs on the image's plain python3 with the standard library only: not on the proxy's
interpreter, which carries a file capability.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import sys
import tomllib

DEFAULT_CONFIG = "/etc/port443/port443.toml"
TIMEOUT = 3.0


def _loopback_for(address: str) -> str:
    """Where to reach a listener bound to `address` from inside the container."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "::1"
    return address


def check(config_path: str) -> str | None:
    """None when healthy, else what is wrong."""
    with open(config_path, "rb") as file:
        config = tomllib.load(file)
    admin = config.get("admin", {})
    if admin.get("enabled", True):
        host = _loopback_for(admin.get("address", "127.0.0.1"))
        connection = http.client.HTTPConnection(host, admin.get("port", 2019), timeout=TIMEOUT)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            if response.status != 200:
                return f"/healthz answered {response.status} {response.reason}"
        finally:
            connection.close()
        return None
    listen = config.get("listen", {})
    addresses = listen.get("address", "0.0.0.0")
    address = addresses[0] if isinstance(addresses, list) else addresses
    socket.create_connection((_loopback_for(address), listen.get("https", 443)), TIMEOUT).close()
    return None


def main() -> int:
    config_path = os.environ.get("PORT443_CONFIG", DEFAULT_CONFIG)
    try:
        problem = check(config_path)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy ({config_path}): {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
