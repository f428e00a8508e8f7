"""A test double for what Pebble 2.4 lacks: ACME Renewal Information (RFC 9773) and profiles.

It sits in front of a real Pebble and forwards every request unchanged, keeping the Host
header so that the URLs Pebble hands out point back at the double. Only three things
differ: the directory gains `renewalInfo` and `meta.profiles`; renewalInfo requests are
answered with responses shaped like the ones recorded from Let's Encrypt (below), whose
window the test chooses; and the payload of every new-order request is kept, so a test
can check the `replaces` and `profile` fields a renewal order carries.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import h11
import requests
import trio

from tests.support.pebble import Pebble
from tests.support.tiny_http import Reply, serve_http

# Recorded from https://acme-v02.api.letsencrypt.org (GET renewalInfo/<CertID>); the
# double substitutes the window's start and end.
RECORDED_RENEWAL_INFO = {
    "suggestedWindow": {"start": "2025-06-17T03:24:35Z", "end": "2025-06-19T03:24:35Z"},
    "explanationURL": "https://letsencrypt.org/docs/integration-guide/#renewal-information",
}
RECORDED_RETRY_AFTER = "21600"
PROFILES = {"classic": "The same profile you're accustomed to", "shortlived": "Valid for 6 days"}
_FORWARDED = ("content-type", "location", "link", "replay-nonce", "retry-after")

Window = Callable[[str], tuple[datetime, datetime]]  # CertID -> suggested window


@dataclass
class AriDouble:
    pebble: Pebble
    window: Window  # which window to suggest for a certificate
    port: int = 0
    new_orders: list[dict[str, object]] = field(default_factory=list)  # decoded payloads
    renewal_info_requests: list[str] = field(default_factory=list)  # CertIDs asked about

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.pebble.tls_cert, self.pebble.tls_key)
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(partial(serve_http, self._answer, ssl_context=context))
            task_status.started()

    async def _answer(self, request: h11.Request, body: bytes) -> Reply:
        host = dict(request.headers)[b"host"].decode()
        path = request.target.decode()
        if path.startswith("/renewal-info/"):
            return self._renewal_info(path.removeprefix("/renewal-info/"))
        status, headers, payload = await trio.to_thread.run_sync(
            self._forward, request.method.decode(), path, host, dict(request.headers), body
        )
        if path == "/dir":
            directory = json.loads(payload)
            directory["renewalInfo"] = f"https://{host}/renewal-info"
            directory.setdefault("meta", {})["profiles"] = PROFILES
            payload = json.dumps(directory).encode()
        elif path == "/order-plz" and request.method == b"POST":
            self.new_orders.append(json.loads(_b64url(json.loads(body)["payload"])))
        return status, headers, payload

    def _renewal_info(self, cert_id: str) -> Reply:
        self.renewal_info_requests.append(cert_id)
        start, end = self.window(cert_id)
        answer = json.loads(json.dumps(RECORDED_RENEWAL_INFO))
        answer["suggestedWindow"] = {"start": _rfc3339(start), "end": _rfc3339(end)}
        headers = [("Content-Type", "application/json"), ("Retry-After", RECORDED_RETRY_AFTER)]
        return 200, headers, json.dumps(answer).encode()

    def _forward(
        self, method: str, path: str, host: str, headers: dict[bytes, bytes], body: bytes
    ) -> Reply:
        pebble = self.pebble.directory.removesuffix("/dir")
        content_type = headers.get(b"content-type", b"application/jose+json").decode()
        response = requests.request(
            method,
            pebble + path,
            data=body,
            headers={"Host": host, "Content-Type": content_type},
            verify=str(self.pebble.ca_bundle),
            timeout=10,
        )
        kept = [(k, v) for k, v in response.headers.items() if k.lower() in _FORWARDED]
        return response.status_code, kept, response.content


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
