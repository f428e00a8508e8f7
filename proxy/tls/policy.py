"""The one place that decides how TLS is spoken: every SSLContext comes from here.

The policy is Mozilla's "intermediate" profile: TLS 1.2 and 1.3, forward-secret AEAD
ciphers only, the client's cipher preference, and the X25519/P-256/P-384 groups, with the
post-quantum hybrid X25519MLKEM768 first where OpenSSL has it (3.5+), as browsers, Caddy
and nginx do. A site's context may also verify client certificates (mTLS).
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import secrets
import ssl
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from proxy.config import ClientAuth

TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
CLASSIC_GROUPS = ("X25519", "P-256", "P-384")
POST_QUANTUM_GROUP = "X25519MLKEM768"
POST_QUANTUM_OPENSSL = (3, 5)


def groups_for(openssl_version: tuple[int, ...]) -> str:
    """The OpenSSL group list to offer, most preferred first, for that OpenSSL version."""
    post_quantum = openssl_version[:2] >= POST_QUANTUM_OPENSSL
    return ":".join((POST_QUANTUM_GROUP, *CLASSIC_GROUPS) if post_quantum else CLASSIC_GROUPS)


GROUPS = groups_for(ssl.OPENSSL_VERSION_INFO)

_SSL_CTRL_SET_GROUPS_LIST = 92


class ServerContext(ssl.SSLContext):
    """A site's server context, knowing which client certificates it verifies."""

    client_auth: ClientAuth | None = None  # None: it asks for none


def server_context(
    chain: Path, key: Path, alpn: Sequence[str], client_auth: ClientAuth | None = None
) -> ServerContext:
    """A server context for one certificate chain and key, offering `alpn` in that order,
    verifying client certificates per `client_auth` when given."""
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites keep OpenSSL's defaults, all AEAD
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Python turns server preference on; Mozilla intermediate leaves the choice to clients,
    # which know whether they have AES hardware (else they prefer ChaCha20).
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    set_groups(ctx, GROUPS)
    if _ticket_keys:
        _share_ticket_keys(ctx)
    ctx.load_cert_chain(chain, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_auth is not None:
        _verify_clients(ctx, client_auth)
    return ctx


# -- client certificates ------------------------------------------------------------------

_SSL_VERIFY_PEER = 1
_X509_V_OK = 0


def _verify_clients(ctx: ServerContext, client_auth: ClientAuth) -> None:
    """Ask for client certificates and verify them against the site's CA (and CRL).

    "require": OpenSSL ends a handshake without a valid certificate with its own alert:
    certificate_required (TLS 1.3) or handshake_failure (TLS 1.2) when none was sent;
    unknown_ca, certificate_revoked, certificate_expired, ... for a bad one. "request": a
    verify callback accepts any certificate so that the handshake completes, and the verdict
    is read afterwards (`verification_error`), as nginx's `ssl_verify_client optional` does.
    The CA names go into the CertificateRequest, so browsers offer only fitting
    certificates. Sessions are bound to these settings (the session id context is a hash of
    the mode, CA and CRL): session-ticket keys are shared by every context, and a ticket
    from a site without client certificates, or with another CA, must not resume here.
    """
    lib = _crypto()
    address = ssl_ctx_address(ctx)
    ctx.load_verify_locations(cafile=client_auth.ca)
    names = lib.SSL_load_client_CA_file(str(client_auth.ca).encode())
    if not names:
        raise ssl.SSLError(f"no CA certificate in {client_auth.ca}")
    lib.SSL_CTX_set_client_CA_list(address, names)  # the context owns the list now
    binding = hashlib.sha256(client_auth.mode.encode() + client_auth.ca.read_bytes())
    if client_auth.crl is not None:
        ctx.load_verify_locations(cafile=client_auth.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        binding.update(client_auth.crl.read_bytes())
    if client_auth.mode == "require":
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        lib.SSL_CTX_set_verify(address, _SSL_VERIFY_PEER, _accept_any)
    sid_ctx = binding.digest()  # 32 bytes: OpenSSL's maximum
    if lib.SSL_CTX_set_session_id_context(address, sid_ctx, len(sid_ctx)) != 1:
        raise ssl.SSLError("OpenSSL refused the session id context")
    ctx.client_auth = client_auth


def verification_error(tls: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """Why the peer's certificate did not verify (OpenSSL's words), None if it did or none
    was verified. Python's `ssl` does not expose SSL_get_verify_result, so the SSL object
    is found through CPython's PySSLSocket layout (the SSL pointer follows the header and
    the socket reference), checked against the context's SSL_CTX before use."""
    lib = _crypto()
    sslobj = getattr(tls, "_sslobj", None)
    if sslobj is None:
        return None
    address = ctypes.c_void_p.from_address(
        id(sslobj) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
    ).value
    if not address or lib.SSL_get_SSL_CTX(address) != ssl_ctx_address(tls.context):
        raise RuntimeError(
            "CPython's PySSLSocket no longer holds its SSL pointer after the socket "
            "reference; tls/policy.py:verification_error needs updating for this Python"
        )
    result = lib.SSL_get_verify_result(address)
    if result == _X509_V_OK:
        return None
    reason: bytes = lib.X509_verify_cert_error_string(result)
    return reason.decode("ascii", "replace")


_VERIFY_CB_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_accept_any = _VERIFY_CB_TYPE(lambda _ok, _store: 1)  # one object for the process: kept alive


def client_context(ca: Path | None, alpn: Sequence[str]) -> ssl.SSLContext:
    """A context for connections to https upstreams: the certificate chain and host name are
    verified against the CA bundle `ca`, or the system trust store when None."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def reject_context() -> ssl.SSLContext:
    """A context that refuses every handshake with the `unrecognized_name` alert (112).

    Used for names we hold no certificate for: the client learns why at once instead of
    seeing some other site's certificate. OpenSSL calls the servername callback even
    when the client sends no SNI, so that case is refused the same way.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sni_callback = _refuse_name
    return ctx


def _refuse_name(_sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> int:
    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Limit the key-exchange groups of `ctx` to the OpenSSL group list `groups`.

    `SSLContext.set_groups` only exists from Python 3.15 and `set_ecdh_curve` takes a
    single curve, so older interpreters call SSL_CTX_ctrl(SSL_CTRL_SET_GROUPS_LIST) in the
    OpenSSL that `_ssl` is linked against.
    """
    native = getattr(ctx, "set_groups", None)
    if native is not None:
        native(groups)
        return
    ctrl = _openssl_function("SSL_CTX_ctrl", (ctypes.c_int, ctypes.c_long, ctypes.c_void_p))
    encoded = ctypes.c_char_p(groups.encode("ascii"))
    if ctrl(ssl_ctx_address(ctx), _SSL_CTRL_SET_GROUPS_LIST, 0, encoded) != 1:
        raise ssl.SSLError(f"OpenSSL refused the group list {groups!r}")


def ssl_ctx_address(ctx: ssl.SSLContext) -> int:
    """The address of the OpenSSL SSL_CTX behind `ctx`: the only use of CPython's private
    PySSLContext layout (the SSL_CTX pointer is the first field after the object header).

    Checked against `ctx.options`, so a changed layout fails here with a clear message
    instead of handing OpenSSL a wrong pointer.
    """
    address = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    get_options = _openssl_function("SSL_CTX_get_options", (), restype=ctypes.c_uint64)
    if not address or get_options(address) != ctx.options:
        raise RuntimeError(
            "CPython's PySSLContext no longer starts with its SSL_CTX pointer; "
            "tls/policy.py:ssl_ctx_address needs updating for this Python"
        )
    return address


@cache
def _openssl_function(
    name: str, argtypes: tuple[type[ctypes._SimpleCData[Any]], ...], restype: type = ctypes.c_long
) -> Callable[..., int]:
    """`name`(SSL_CTX *, *argtypes) from the OpenSSL library `_ssl` is linked against."""
    function = getattr(ctypes.CDLL(_ssl.__file__), name)
    function.argtypes = [ctypes.c_void_p, *argtypes]
    function.restype = restype
    return function  # type: ignore[no-any-return]


# -- session tickets shared by worker processes -------------------------------------------

TICKET_KEY_BYTES = 80  # OpenSSL's layout: key name 16, HMAC-SHA256 key 32, AES-256 key 32
_SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
_TICKET_NOT_FOUND, _TICKET_OK, _TICKET_OK_RENEW = 0, 1, 2
_TicketKey = tuple[bytes, bytes, bytes]  # (name, HMAC key, AES key)
_ticket_keys: list[_TicketKey] = []  # newest first; empty: OpenSSL's own per-context keys


def new_ticket_key() -> bytes:
    """Fresh random key material for `set_ticket_keys`."""
    return secrets.token_bytes(TICKET_KEY_BYTES)


def set_ticket_keys(keys: Sequence[bytes]) -> None:
    """Encrypt session tickets with `keys[0]` and accept tickets under any of `keys`, in
    every server context of this process, made before or after.

    Python's `ssl` has no API for ticket keys, and by default OpenSSL draws random ones per
    SSL_CTX: a client resuming at another worker (or after a certificate swap) would get a
    full handshake. Worker processes get the same keys from their supervisor, which rotates
    them and keeps the previous one, so tickets survive a rotation. Installed through
    SSL_CTX_set_tlsext_ticket_key_cb (the SSL_CTX_callback_ctrl form, in the OpenSSL that
    `_ssl` is linked against); the callback runs once per ticket issued or presented.
    """
    for key in keys:
        if len(key) != TICKET_KEY_BYTES:
            raise ValueError(f"a ticket key has {TICKET_KEY_BYTES} bytes, got {len(key)}")
    _ticket_keys[:] = [(key[:16], key[16:48], key[48:]) for key in keys]


def _share_ticket_keys(ctx: ssl.SSLContext) -> None:
    lib = _crypto()
    if (
        lib.SSL_CTX_callback_ctrl(
            ssl_ctx_address(ctx), _SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, _ticket_cb
        )
        != 1
    ):
        raise ssl.SSLError("OpenSSL refused the session ticket key callback")


def _ticket_callback(
    _ssl: int | None, name: int, iv: int, cipher_ctx: int, hmac_ctx: int, encrypt: int
) -> int:
    """OpenSSL's ticket key callback: set up the cipher and HMAC for one ticket."""
    lib = _crypto()
    keys = _ticket_keys
    if not keys:
        return -1
    if encrypt:
        key_name, hmac_key, aes_key = keys[0]
        if lib.RAND_bytes(iv, 16) != 1:
            return -1
        ctypes.memmove(name, key_name, 16)
        cipher_init = lib.EVP_EncryptInit_ex
        result = _TICKET_OK
    else:
        presented = ctypes.string_at(name, 16)
        index = next((i for i, key in enumerate(keys) if key[0] == presented), None)
        if index is None:
            return _TICKET_NOT_FOUND  # an unknown or retired key: a full handshake
        _, hmac_key, aes_key = keys[index]
        cipher_init = lib.EVP_DecryptInit_ex
        result = _TICKET_OK if index == 0 else _TICKET_OK_RENEW  # renew: under the new key
    if lib.HMAC_Init_ex(hmac_ctx, hmac_key, 32, lib.EVP_sha256(), None) != 1:
        return -1
    if cipher_init(cipher_ctx, lib.EVP_aes_256_cbc(), None, aes_key, iv) != 1:
        return -1
    return result


_TICKET_CB_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)
_ticket_cb = _TICKET_CB_TYPE(_ticket_callback)  # one object for the process: kept alive


@cache
def _crypto() -> ctypes.CDLL:
    """libssl and libcrypto functions as `_ssl` links them, with their C signatures."""
    lib = ctypes.CDLL(_ssl.__file__)
    p, i = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[list[Any], Any]] = {
        "SSL_CTX_callback_ctrl": ([p, i, p], ctypes.c_long),
        "RAND_bytes": ([p, i], i),
        "HMAC_Init_ex": ([p, ctypes.c_char_p, i, p, p], i),
        "EVP_EncryptInit_ex": ([p, p, p, ctypes.c_char_p, p], i),
        "EVP_DecryptInit_ex": ([p, p, p, ctypes.c_char_p, p], i),
        "EVP_sha256": ([], p),
        "EVP_aes_256_cbc": ([], p),
        "SSL_CTX_set_verify": ([p, i, p], None),
        "SSL_CTX_set_session_id_context": ([p, ctypes.c_char_p, ctypes.c_uint], i),
        "SSL_load_client_CA_file": ([ctypes.c_char_p], p),
        "SSL_CTX_set_client_CA_list": ([p, p], None),
        "SSL_get_SSL_CTX": ([p], p),
        "SSL_get_verify_result": ([p], ctypes.c_long),
        "X509_verify_cert_error_string": ([ctypes.c_long], ctypes.c_char_p),
    }
    for function, (argtypes, restype) in signatures.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = restype
    return lib
