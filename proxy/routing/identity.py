"""Who the client is: the peer, or, behind trusted proxies, the first untrusted hop.

Computed once per request by the forwarder (`behind_trusted_peer`); the X-Forwarded-For chain
it reads is the one `http/headers.upstream_request` keeps and appends to for the same peers.
Behind a PROXY protocol header the peer already is the address the header names
(`proxy_gate.py`): the balancer never appears here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from proxy.config import IPNetwork
from proxy.http.model import Headers


def is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _forwarded_for(value: bytes) -> list[str]:
    """The for= nodes of an RFC 7239 Forwarded value, quotes, brackets and ports removed."""
    nodes: list[str] = []
    for element in value.split(b","):
        for pair in element.split(b";"):
            name, _, node = pair.strip().partition(b"=")
            if name.strip().lower() == b"for":
                text = node.strip().strip(b'"').decode("latin-1")
                if text.startswith("["):
                    text = text[1 : text.find("]")]
                elif text.count(":") == 1:
                    text = text.partition(":")[0]
                nodes.append(text)
    return nodes


def chain(headers: Headers) -> list[str]:
    """The addresses the request passed through before the peer, client first: from
    X-Forwarded-For, else from Forwarded."""
    hops = [
        hop.strip().decode("latin-1")
        for name, value in headers
        if name == b"x-forwarded-for"
        for hop in value.split(b",")
    ]
    if hops:
        return hops
    return [
        node for name, value in headers if name == b"forwarded" for node in _forwarded_for(value)
    ]


def client_address(peer: str, headers: Headers, trusted: Sequence[IPNetwork]) -> str:
    """The client IP: the peer itself unless it is a trusted proxy; then the nearest hop of
    the chain that is not trusted (the leftmost one if all are)."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    return behind_trusted_peer(peer, headers, trusted)


def behind_trusted_peer(peer: str, headers: Headers, trusted: Sequence[IPNetwork]) -> str:
    """`client_address` for a peer already known to be trusted."""
    hops = chain(headers)
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
