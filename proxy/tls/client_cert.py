"""What a verified client certificate tells the upstream: its subject and its fingerprint.

No I/O: `tls/stream.py` hands the DER certificate of a verified peer, the forwarder puts
these values into the request fields the site names (`http/headers.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    subject: str  # RFC 4514, printable ASCII only (see `header_safe`)
    fingerprint: str  # SHA-256 of the DER certificate, lower-case hex

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        return cls(subject=header_safe(subject), fingerprint=hashlib.sha256(der).hexdigest())


def header_safe(dn: str) -> str:
    """An RFC 4514 string with every character outside printable ASCII written as RFC 4514
    hex pairs of its UTF-8 bytes (`\\c3\\a9` for "é"): a CA may put control characters or
    any Unicode in a name, and a header field value must carry neither (CR LF would split
    the field). Only an attribute value can hold such characters, where hex pairs are
    RFC 4514's own escape, so the result still parses as the same name."""
    out = []
    for char in dn:
        if " " <= char <= "~":
            out.append(char)
        else:
            out.extend(f"\\{byte:02x}" for byte in char.encode("utf-8"))
    return "".join(out)
