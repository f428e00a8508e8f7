"""The part of the PowerDNS HTTP API that dns-lexicon's `powerdns` provider uses, on loopback,
writing every change into a real Knot zone by RFC 2136: the lexicon path of DNS-01 runs
unchanged (provider, HTTP, credentials) and the records it makes are real DNS data that
Pebble's VA and the propagation check see.

API: `GET /api/v1/servers/localhost/zones/<zone>.` (the zone's rrsets this server wrote) and
`PATCH` of the same path with `{"rrsets": [{name, type, ttl, changetype: REPLACE|DELETE,
records: [{content}]}]}`; every request needs `X-API-Key: <token>`, else 401.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dns.query
import dns.rcode
import dns.tsig
import dns.update

from tests.support.knot import KEY_NAME, ZONE, Knot

_ZONE_PATH = f"/api/v1/servers/localhost/zones/{ZONE}."


@dataclass
class FakePowerDns:
    url: str  # the provider's pdns_server option
    token: str
    requests: list[str] = field(default_factory=list)  # "METHOD path", in order


@contextmanager
def run_fake_powerdns(knot: Knot, token: str) -> Iterator[FakePowerDns]:
    rrsets: dict[tuple[str, str], dict[str, Any]] = {}  # (name, type) -> rrset as the API shows it
    lock = threading.Lock()
    keyring = dns.tsig.Key(KEY_NAME, knot.tsig_secret, "hmac-sha256")

    def apply(change: dict[str, Any]) -> None:
        """Replace or delete one rrset, in Knot first."""
        update = dns.update.UpdateMessage(
            ZONE, keyring=keyring, keyname=keyring.name, keyalgorithm=keyring.algorithm
        )
        update.delete(change["name"], change["type"])
        records = change.get("records", []) if change["changetype"] == "REPLACE" else []
        for record in records:
            update.add(change["name"], change.get("ttl", 60), change["type"], record["content"])
        response = dns.query.tcp(update, "127.0.0.1", timeout=5, port=knot.port)
        assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())
        key = (change["name"], change["type"])
        if records:
            rrsets[key] = {**change, "records": [{**r, "disabled": False} for r in records]}
        else:
            rrsets.pop(key, None)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self._allowed():
                with lock:
                    zone = {"name": f"{ZONE}.", "kind": "Native", "rrsets": list(rrsets.values())}
                self._reply(200, zone)

        def do_PATCH(self) -> None:
            if self._allowed():
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    for change in body["rrsets"]:
                        apply(change)
                self.send_response(204)
                self.end_headers()

        def _allowed(self) -> bool:
            fake.requests.append(f"{self.command} {self.path}")
            if self.headers.get("X-API-Key") != token:
                self._reply(401, {"error": "Unauthorized"})
                return False
            if self.path != _ZONE_PATH:
                self._reply(404, {"error": "Not Found"})
                return False
            return True

        def _reply(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake = FakePowerDns(url=f"http://127.0.0.1:{server.server_address[1]}", token=token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
