"""Header policy for forwarded messages (RFC 9110 §7.6): what a proxy removes and adds."""

from __future__ import annotations

import re

from proxy.config import ClientCertHeaders, Config, HeaderOps
from proxy.http.model import Headers, Request, UpstreamRequest
from proxy.tls.client_cert import ClientCertificate
from proxy.tracing.context import TRACE_FIELDS, TraceContext

# Fields that describe one connection, not the message: HTTP/2 forbids them (RFC 9113
# §8.2.2), and each upstream protocol writes its own framing.
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
HOP_BY_HOP = CONNECTION_SPECIFIC | {
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
}
VIA_NAME = b"port443"
_FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
_TOKEN_HOST = re.compile(rb"[A-Za-z0-9.\-]+(?::[0-9]+)?")  # a host needing no quotes


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message only."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def _lists_trailers(te: bytes) -> bool:
    """Whether a TE value lists the "trailers" token (RFC 9110 §10.1.4)."""
    return any(token.partition(b";")[0].strip().lower() == b"trailers" for token in te.split(b","))


def _hop_by_hop(name: bytes, named: frozenset[bytes]) -> bool:
    return name in HOP_BY_HOP or name in named or name.startswith(b"proxy-")


def requested_upgrade(headers: Headers) -> bytes | None:
    """The protocol an HTTP/1.1 request asks to switch to: Upgrade, listed in Connection."""
    if b"upgrade" not in _connection_tokens(headers):
        return None
    return next((value for name, value in headers if name == b"upgrade"), None)


def upgrade_headers(protocol: bytes) -> Headers:
    """The hop-by-hop pair that carries an upgrade across the proxy (RFC 9110 §7.8)."""
    return [(b"connection", b"upgrade"), (b"upgrade", protocol)]


def without_hop_by_hop(headers: Headers) -> Headers:
    named = _connection_tokens(headers)
    return [(name, value) for name, value in headers if not _hop_by_hop(name, named)]


def _via(http_version: bytes) -> bytes:
    return http_version + b" " + VIA_NAME


def _forwarded_node(address: str) -> bytes:
    """An address as an RFC 7239 node: IPv6 quoted in brackets."""
    return f'"[{address}]"'.encode() if ":" in address else address.encode("ascii")


def upstream_request(
    request: Request, *, keep_forwarded: bool, trace: TraceContext | None = None
) -> UpstreamRequest:
    """The request to send upstream: hop-by-hop fields dropped, X-Forwarded-*, Forwarded
    (RFC 7239) and Via added; Host and Content-Length become the request's authority and
    body length, for each upstream protocol to frame.

    `keep_forwarded` (the peer is a trusted proxy): incoming X-Forwarded-For and Forwarded
    are appended to, X-Forwarded-Proto and -Host kept; otherwise all are replaced.
    Expect is dropped: like nginx and Go, we answer 100-continue ourselves when we start
    reading the body, so backends that ignore Expect cannot stall the upload.
    TE is hop-by-hop, but its "trailers" token goes on as `TE: trailers`: trailers are relayed
    end to end, so the next hop may send them, and gRPC servers require it (the only TE that
    HTTP/2 allows, RFC 9113 §8.2.2; Envoy does the same).
    With tracing on (`trace`), traceparent and tracestate are port443's span's, replacing
    the client's; with it off they pass through like any end-to-end field.
    """
    peer = request.client_ip
    forwarded_for = peer.encode("ascii")
    forwarded = b"for=" + _forwarded_node(peer) + b";proto=https"
    if _TOKEN_HOST.fullmatch(request.host):
        forwarded += b";host=" + request.host
    kept: dict[bytes, bytes] = {}
    via = _via(request.http_version)
    trailers = False
    length: int | None = None
    named = _connection_tokens(request.headers)
    out: Headers = []
    for name, value in request.headers:
        if name == b"te":
            trailers = trailers or _lists_trailers(value)
        elif _hop_by_hop(name, named):
            continue
        elif name == b"content-length":
            length = int(value)  # digits: both front ends checked it
        elif name == b"via":
            via = value + b", " + via
        elif name in _FORWARDING:
            if keep_forwarded:
                kept[name] = kept[name] + b", " + value if name in kept else value
        elif name != b"expect":
            out.append((name, value))
    if trailers:
        out.append((b"te", b"trailers"))
    if b"x-forwarded-for" in kept:
        forwarded_for = kept[b"x-forwarded-for"] + b", " + forwarded_for
    if b"forwarded" in kept:
        forwarded = kept[b"forwarded"] + b", " + forwarded
    out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-proto", kept.get(b"x-forwarded-proto", b"https")))
    out.append((b"x-forwarded-host", kept.get(b"x-forwarded-host", request.host)))
    out.append((b"forwarded", forwarded))
    out.append((b"via", via))
    if trace is not None:
        out = [field for field in out if field[0] not in TRACE_FIELDS]
        out.extend(trace.upstream_fields())
    return UpstreamRequest(
        method=request.method,
        target=request.target,
        authority=request.host,
        fields=out,
        has_body=request.has_body,
        body_length=length,
        upgrade=request.upgrade,
    )


def client_response_headers(headers: Headers, upstream_version: bytes, added: Headers) -> Headers:
    """Headers sent to the client: hop-by-hop dropped, Via added, and the proxy's own
    fields (`https_response_fields`) unless the upstream set them."""
    out = without_hop_by_hop(headers)
    via = _via(upstream_version)
    present: set[bytes] = set()
    for i, (name, value) in enumerate(out):
        if name == b"via":
            via = value + b", " + via
            out[i] = (b"via", via)
            via = b""
        present.add(name)
    if via:
        out.append((b"via", via))
    out.extend(field for field in added if field[0] not in present)
    return out


def https_response_fields(config: Config, *, advertise_http3: bool = True) -> Headers:
    """Fields every HTTPS response carries: HSTS when on, and Alt-Svc advertising HTTP/3
    on the HTTPS port when it is served (RFC 7838; a day, as Caddy and nginx say) and
    `advertise_http3`."""
    fields: Headers = []
    hsts = config.hsts.header_value()
    if hsts is not None:
        fields.append((b"strict-transport-security", hsts))
    if config.listen.http3 and advertise_http3:
        fields.append((b"alt-svc", b'h3=":%d"; ma=86400' % config.listen.https))
    return fields


def with_client_certificate(
    headers: Headers, names: ClientCertHeaders, cert: ClientCertificate | None
) -> Headers:
    """`headers` without any field a site names for client certificates, plus those fields
    for `cert` (a verified certificate) if there is one: an upstream trusting them must
    never see a copy a client wrote itself."""
    named = names.names
    out = [(name, value) for name, value in headers if name not in named]
    if cert is not None:
        if names.subject is not None:
            out.append((names.subject, cert.subject.encode("ascii")))
        if names.fingerprint is not None:
            out.append((names.fingerprint, cert.fingerprint.encode("ascii")))
    return out


def apply_header_ops(headers: Headers, ops: HeaderOps) -> Headers:
    """A route's header operations on a header block: remove, then set, then add."""
    replaced = {name for name, _ in ops.set}
    gone = replaced.union(ops.remove)
    out = [(name, value) for name, value in headers if name not in gone]
    out.extend(ops.set)
    out.extend(ops.add)
    return out
