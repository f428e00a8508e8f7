"""Upstream request heads for h11 built from fields that were already validated.

Every field port443 sends upstream was parsed and checked on its way in (h11 for HTTP/1.1,
the RFC 9113 checks for HTTP/2) or is one of our own; h11 would still normalise and re-check
each one on every send, one of the largest costs of a request. h11 has a switch for heads it
parsed itself (`_parsed=True` with its `Headers` object): private API, used here and nowhere
else, checked by tests/test_h11_trusted.py on every h11 upgrade. (The h11 client connection
must still see the request event: it parses the response that follows.)
"""

from __future__ import annotations

import h11
from h11._headers import Headers as _H11Headers

from proxy.http.model import Headers


def _trusted_fields(fields: Headers) -> _H11Headers:
    """h11's own header list: (name as sent, lower-case name, value); names are already
    lower case here."""
    return _H11Headers([(name, name, value) for name, value in fields])


def trusted_request(method: bytes, target: bytes, fields: Headers) -> h11.Request:
    return h11.Request(method=method, target=target, headers=_trusted_fields(fields), _parsed=True)
