"""The plain-HTTP port: ACME HTTP-01 answers, and a 308 to https for everything else."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.certs.acme_challenges import HTTP01_PATH_PREFIX, http01_key_authorization
from proxy.handlers.observed import RequestHandler, respond
from proxy.http.model import CONNECTION_CLOSE, Exchange, Outcome, ResponseHead, plain_response

ACME_CHALLENGE_PREFIX = HTTP01_PATH_PREFIX.encode("ascii")
# reg-name or IPv4 (RFC 3986 host), or a bracketed IPv6 literal; optional port.
_HOST = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def https_location(host: bytes, target: bytes, https_port: int) -> bytes | None:
    """The https URL for a plain-HTTP request, or None if Host is missing or malformed."""
    if not _HOST.fullmatch(host):
        return None
    name = host[: host.index(b"]") + 1] if host.startswith(b"[") else host.partition(b":")[0]
    if target.startswith((b"http://", b"https://")):  # absolute-form: keep only path?query
        after_scheme = target.partition(b"://")[2]
        slash = after_scheme.find(b"/")
        target = after_scheme[slash:] if slash >= 0 else b"/"
    elif not target.startswith(b"/"):
        target = b"/"  # asterisk-form (OPTIONS *)
    port = b"" if https_port == 443 else b":%d" % https_port
    return b"https://" + name.lower() + port + target


class Redirector(RequestHandler):
    """Request handler of the HTTP listener. Closes every connection after one answer,
    as Caddy does: a client that was redirected has no more business on this port."""

    def __init__(self, https_port: int, certs_dir: Path) -> None:
        self._https_port = https_port
        self._certs_dir = certs_dir

    async def __call__(self, exchange: Exchange, outcome: Outcome) -> None:
        request = exchange.request
        if request.target.startswith(ACME_CHALLENGE_PREFIX):
            head, body = self._acme_http01(request.target)
        else:
            location = https_location(request.host, request.target, self._https_port)
            if location is None:
                head, body = plain_response(
                    400, "Bad Request: missing or invalid Host", CONNECTION_CLOSE
                )
            else:
                head, body = plain_response(
                    308, "Permanent Redirect", (b"location", location), CONNECTION_CLOSE
                )
        await respond(exchange, outcome, head, body)

    def _acme_http01(self, target: bytes) -> tuple[ResponseHead, bytes]:
        """The key authorization of a pending HTTP-01 challenge (RFC 8555 §8.3), never
        redirected: the CA fetches it over plain HTTP."""
        token = target[len(ACME_CHALLENGE_PREFIX) :].partition(b"?")[0]
        answer = http01_key_authorization(self._certs_dir, token.decode("ascii", "replace"))
        if answer is None:
            return plain_response(404, "Not Found", CONNECTION_CLOSE)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(len(answer)).encode("ascii")),
            CONNECTION_CLOSE,
        ]
        return ResponseHead(200, headers), answer
