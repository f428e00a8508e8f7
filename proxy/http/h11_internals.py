"""The two private parts of h11 that port443 uses, each behind one function.

- Upstream request heads built from fields that were already validated. Every field sent
  upstream was parsed and checked on its way in (h11 for HTTP/1.1, the RFC 9113 checks for
  HTTP/2) or is one of our own; h11 would still normalise and re-check each one on every
  send, one of the largest costs of a request. h11 has a switch for heads it parsed itself
  (`_parsed=True` with its `Headers` object). The h11 client connection must still see the
  request event: it parses the response that follows.
- The size a chunk header declared, which h11 does not report: a proxy must refuse sizes
  no real body has (beyond 2^63) instead of waiting for them.
tests/test_h11_internals.py fails with a clear message when an h11 upgrade changes either.
"""

from __future__ import annotations

import h11
from h11._headers import Headers as _H11Headers

from proxy.http.model import Headers


def trusted_request(method: bytes, target: bytes, fields: Headers) -> h11.Request:
    """h11's request event for lower-case, already validated fields, without re-checking."""
    headers = _H11Headers([(name, name, value) for name, value in fields])
    return h11.Request(method=method, target=target, headers=headers, _parsed=True)


def declared_chunk_size(conn: h11.Connection, first_data: h11.Data) -> int:
    """The size the chunk header declared, given the chunk's first Data event."""
    remaining: int = getattr(conn._reader, "_bytes_in_chunk")  # noqa: B009
    return remaining + len(first_data.data)
