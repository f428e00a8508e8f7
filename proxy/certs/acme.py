"""Certificate issuance over ACME (RFC 8555) with the `acme` package, driven from trio.

`acme` is synchronous (requests underneath), so each protocol request runs in a worker
thread while every wait between requests happens in trio: a cancelled issuance stops at
once and always removes its challenge files. Polling is ours, with short waits, because
`ClientV2.poll_and_finalize` sleeps a whole second per round.

The account key is created once per ACME directory and kept in
`<certs>/acme/<directory host>/account.json`; registering is idempotent (the CA answers
an existing key with its account), so every process start reuses the same account. With
a shared store the first instance's account is every instance's (`CertificateStorage.account`).

Two additions to what `acme` sends: a renewal order names the certificate it replaces
(RFC 9773 `replaces`, which Let's Encrypt exempts from rate limits), and the CA's
renewalInfo for a certificate is fetched when the directory offers it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import requests
import trio
from acme import challenges, crypto_util, messages
from acme import client as acme_client
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.b64 import b64encode
from josepy.errors import DeserializationError
from josepy.json_util import field
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from proxy.certs.acme_challenges import write_http01, write_tls_alpn01
from proxy.certs.dns01 import Dns01Records, DnsError, TxtRecord, challenge_record, dns01_records
from proxy.certs.renewal import AriWindow, ari_cert_id
from proxy.certs.store import CertificateStorage, account_path, atomic_write
from proxy.config import LETS_ENCRYPT, ChallengeType, DnsConfig, KeyType, is_ip_address

log = logging.getLogger(__name__)

ARI_RECHECK = timedelta(hours=6)  # RFC 9773 4.3: poll renewalInfo again when no Retry-After

_BAD_NONCE_ATTEMPTS = 10  # RFC 8555 6.5: badNonce is retryable; CAs may reject good nonces
_NETWORK_ATTEMPTS = 3
_HTTP_TIMEOUT = 30  # seconds, per HTTP request to the CA
_POLL_FIRST, _POLL_MAX = 0.05, 2.0  # seconds between polls of an authorization or order

_T = TypeVar("_T")


class AcmeError(Exception):
    """An issuance failed; the message names the identifier, challenge and the CA's problem.

    `retry_after` is the CA's Retry-After on the failing response (e.g. rate limited).
    """

    def __init__(self, message: str, retry_after: timedelta | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IssuedCertificate(NamedTuple):
    fullchain_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class RenewalInfo:
    """A CA's RFC 9773 answer for one certificate."""

    window: AriWindow
    recheck_at: datetime  # when to ask again (the response's Retry-After)


@dataclass(frozen=True)
class ExternalAccountBinding:
    """RFC 8555 7.3.4 credentials, for CAs that only serve pre-existing customers."""

    kid: str
    hmac_key: str  # base64url, as the CA hands it out


class _ReadyResponse(challenges.KeyAuthorizationChallengeResponse):
    """The `{}` POST that asks the CA to validate a challenge of any type.

    `acme` 5 has no TLS-ALPN-01 classes; this body is the same for every type. The key
    authorization field is never sent, it only keeps the object truthy so that `acme`
    signs a `{}` payload instead of an empty POST-as-GET.
    """

    typ = "ready"


class _NewOrder(messages.NewOrder):
    """A new-order body that can name the certificate it renews (RFC 9773 section 5)."""

    replaces: str | None = field("replaces", omitempty=True)


class _Client(acme_client.ClientV2):
    """ClientV2 over our `_Network`, placing orders that may carry `replaces`."""

    net: _Network

    def new_order_replacing(
        self, csr_pem: bytes, names: Sequence[str], profile: str | None, replaces: str | None
    ) -> messages.OrderResource:
        """`ClientV2.new_order` for `names`, with `replaces` in the request body."""
        identifiers = [_identifier(name) for name in names]
        body = _NewOrder(identifiers=identifiers, profile=profile, replaces=replaces)
        response = self._post(self.directory["newOrder"], body)
        order = messages.Order.from_json(response.json())
        authorizations = [
            self._authzr_from_response(self._post_as_get(url), uri=url)
            for url in order.authorizations
        ]
        return messages.OrderResource(
            body=order,
            uri=response.headers.get("Location"),
            authorizations=authorizations,
            csr_pem=csr_pem,
        )


class _Network(acme_client.ClientNetwork):
    """A ClientNetwork that keeps retrying badNonce rejections, not only once, and
    remembers the last response's Retry-After (`acme` drops it when raising an error)."""

    last_retry_after = 0.0

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = _retry_after(response)
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, _BAD_NONCE_ATTEMPTS + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == _BAD_NONCE_ATTEMPTS:
                    raise
                log.debug("ACME badNonce on attempt %d, retrying: %s", attempt, error)
        raise AssertionError("unreachable")


class AcmeClient:
    """One ACME account at one CA; issues certificates for sets of names."""

    def __init__(
        self,
        certs_dir: Path,
        directory: str = LETS_ENCRYPT,
        *,
        email: str | None = None,
        ca_bundle: Path | None = None,
        challenges: Sequence[ChallengeType] = ("http-01", "tls-alpn-01"),
        eab: ExternalAccountBinding | None = None,
        dns: DnsConfig | None = None,
        timeout: float = 120.0,
        accounts: CertificateStorage | None = None,
    ) -> None:
        self.certs_dir = certs_dir
        self.directory = directory
        self.account_path = account_path(certs_dir, _directory_dirname(directory))
        self._accounts = accounts  # where the account is shared with other instances
        self._email = email
        self._verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        self._challenges = tuple(challenges)
        self._eab = eab
        self._dns = dns01_records(dns) if dns is not None else None
        # DNS propagation happens within the order, so it extends the order's time limit
        self._timeout = timeout + (dns.propagation_timeout if dns is not None else 0.0)
        self._client: _Client | None = None
        self._setup_lock = trio.Lock()
        self._one_request = trio.CapacityLimiter(1)  # requests.Session is not thread-safe

    async def account_uri(self) -> str:
        """Register (or find) the account; returns its URL at the CA."""
        client = await self._registered()
        assert client.net.account is not None
        return str(client.net.account.uri)

    async def issue(
        self,
        names: Sequence[str],
        key_type: KeyType = "ecdsa-p256",
        challenges: Sequence[ChallengeType] | None = None,
        *,
        profile: str | None = None,
        replaces: x509.Certificate | None = None,
    ) -> IssuedCertificate:
        """Order one certificate covering `names` with a fresh key; AcmeError on failure.

        `profile` must be one the CA offers. `replaces` is the certificate this one renews;
        it is named in the order only when the CA offers ARI (RFC 9773 section 5).
        """
        names = list(dict.fromkeys(n.lower().rstrip(".") for n in names))
        preference = tuple(challenges) if challenges is not None else self._challenges
        key_pem = _new_key_pem(key_type)
        addresses = [ipaddress.ip_address(name) for name in names if is_ip_address(name)]
        domains = [name for name in names if not is_ip_address(name)]
        csr_pem = crypto_util.make_csr(key_pem, domains, ipaddrs=addresses)
        what = ", ".join(names)
        log.info(
            "ACME: ordering a certificate for %s from %s, %s",
            what,
            self.directory,
            " or ".join(preference),
        )
        with trio.move_on_after(self._timeout) as scope:
            try:
                client, order = await self._new_order(csr_pem, names, profile, replaces)
                await self._authorize(client, order, preference)
                fullchain = await self._finalize(client, order)
            except messages.Error as error:
                raise AcmeError(f"{what}: {error}", self._retry_after()) from error
            except (requests.RequestException, acme_errors.Error) as error:
                raise AcmeError(f"{what}: {type(error).__name__}: {error}") from error
            except DnsError as error:
                raise AcmeError(f"{what}: dns-01: {error}") from error
        if scope.cancelled_caught:
            raise AcmeError(f"{what}: no certificate within {self._timeout:g} s")
        log.info("ACME: issued a certificate for %s by %s", what, self.directory)
        return IssuedCertificate(fullchain.encode("ascii"), key_pem)

    async def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        """The CA's suggested renewal window for `cert`, or None when it offers no ARI."""
        try:
            client = await self._registered()
            base = _renewal_info_url(client)
            if base is None:
                return None
            url = f"{base.rstrip('/')}/{ari_cert_id(cert)}"
            response = await self._call(client.net.get, url, content_type="application/json")
            window = messages.RenewalInfo.from_json(response.json()).suggested_window
        except (
            messages.Error,
            requests.RequestException,
            acme_errors.Error,
            DeserializationError,
            ValueError,  # no authorityKeyIdentifier, or a body that is not JSON
        ) as error:
            raise AcmeError(f"renewalInfo from {self.directory}: {error}") from error
        wait = timedelta(seconds=_retry_after(response)) or ARI_RECHECK
        return RenewalInfo(AriWindow(window.start, window.end), datetime.now(UTC) + wait)

    async def _new_order(
        self,
        csr_pem: bytes,
        names: Sequence[str],
        profile: str | None,
        replaces: x509.Certificate | None,
    ) -> tuple[_Client, messages.OrderResource]:
        """Place the order, registering again once if the CA no longer knows the account."""
        for attempt in (1, 2):
            client = await self._registered()
            _check_profile(client, profile)
            cert_id = ari_cert_id(replaces) if replaces and _renewal_info_url(client) else None
            try:
                order = await self._call(
                    client.new_order_replacing, csr_pem, names, profile, cert_id
                )
            except messages.Error as error:
                if error.code != "accountDoesNotExist" or attempt == 2:
                    raise
                log.warning(
                    "ACME: %s forgot account %s, registering again",
                    self.directory,
                    client.net.account.uri if client.net.account else None,
                )
                self._client = None
                continue
            return client, order
        raise AssertionError("unreachable")

    def _retry_after(self) -> timedelta | None:
        seconds = self._client.net.last_retry_after if self._client is not None else 0.0
        return timedelta(seconds=seconds) if seconds else None

    async def _registered(self) -> _Client:
        async with self._setup_lock:
            if self._client is None:
                self._client = await self._call(self._register)
            return self._client

    def _register(self) -> _Client:
        """Load or create the account key, then create or look up its account (blocking)."""
        if not self.account_path.exists():
            key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            self._save_account(key, None)  # before registering: a crash must not lose it
        key, known_uri = self._shared_account()
        # requests takes a CA file path as well as a bool; a path also beats REQUESTS_CA_BUNDLE
        verify: Any = self._verify
        net = _Network(key, alg=ES256, verify_ssl=verify, timeout=_HTTP_TIMEOUT)
        net.user_agent = "port443"
        directory = acme_client.ClientV2.get_directory(self.directory, net)
        client = _Client(directory, net)
        binding = None
        if self._eab is not None:
            binding = messages.ExternalAccountBinding.from_data(
                key.public_key(), self._eab.kid, self._eab.hmac_key, directory
            )
        elif client.external_account_required():
            raise AcmeError(f"{self.directory} requires external account binding (eab_kid)")
        registration = messages.NewRegistration.from_data(
            email=self._email, terms_of_service_agreed=True, external_account_binding=binding
        )
        try:
            uri = client.new_account(registration).uri
            log.info("ACME: registered account %s at %s", uri, self.directory)
        except acme_errors.ConflictError as existing:  # the key already has an account
            uri = existing.location
            client.net.account = messages.RegistrationResource(
                uri=uri, body=messages.Registration()
            )
        if known_uri != uri:
            self._save_account(key, uri)
        return client

    def _shared_account(self) -> tuple[JWKEC, str | None]:
        """The account every instance sharing the store uses: this one's file is proposed,
        the first proposal stored wins, and this instance keeps a copy of the winner."""
        text = self.account_path.read_bytes()
        mine = self._parse_account(text)
        if self._accounts is None:
            return mine
        try:
            shared_text = self._accounts.account(_directory_dirname(self.directory), text)
        except (OSError, ValueError) as error:  # unreachable, or a key that does not open
            raise AcmeError(f"the shared account for {self.directory}: {error}") from error
        shared = self._parse_account(shared_text)
        if shared[0] == mine[0]:  # the same key: this copy may know the account's URL
            return mine
        atomic_write(self.account_path, shared_text, 0o600)
        log.info("ACME: using the account shared through the store at %s", self.directory)
        return shared

    def _parse_account(self, text: bytes) -> tuple[JWKEC, str | None]:
        try:
            data = json.loads(text)
            key = JWK.from_json(data["key"])
        except (ValueError, KeyError, TypeError, DeserializationError) as error:
            raise AcmeError(f"{self.account_path}: unreadable account file: {error}") from error
        if not isinstance(key, JWKEC):  # we only ever create P-256 keys, signed with ES256
            raise AcmeError(f"{self.account_path}: the account key is not an EC key")
        return key, data.get("uri")

    def _save_account(self, key: JWKEC, uri: str | None) -> None:
        data = {"directory": self.directory, "uri": uri, "key": key.to_json()}
        self.account_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.account_path, json.dumps(data, indent=2).encode(), 0o600)

    async def _authorize(
        self,
        client: acme_client.ClientV2,
        order: messages.OrderResource,
        preference: tuple[ChallengeType, ...],
    ) -> None:
        """Answer every pending authorization of `order` and wait until all are valid.

        Every answer is in place (files written, DNS records visible) before the CA is
        asked to validate any; all are removed afterwards, whatever happened.
        """
        published: list[Path] = []
        records: list[TxtRecord] = []
        pending: list[tuple[messages.AuthorizationResource, messages.ChallengeBody, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:  # reused by the CA
                    continue
                if authz.body.status != messages.STATUS_PENDING:
                    raise AcmeError(_authz_failure(authz, None))
                challb, typ = _pick_challenge(authz, preference)
                identifier = authz.body.identifier.value
                key_authorization = _key_authorization(client, challb)
                if typ == "dns-01":
                    records.append(challenge_record(identifier, key_authorization))
                else:
                    published.append(self._write(typ, identifier, challb, key_authorization))
                pending.append((authz, challb, typ))
            if records:
                await self._dns01().publish(records)
            for _, challb, _ in pending:
                await self._call(client.answer_challenge, challb, _ReadyResponse())
            for authz, _, typ in pending:
                done = await self._poll_authorization(client, authz)
                if done.body.status != messages.STATUS_VALID:
                    raise AcmeError(_authz_failure(done, typ))
        finally:
            for path in published:
                path.unlink(missing_ok=True)
            if records and self._dns is not None:
                await self._dns.remove(records)

    def _dns01(self) -> Dns01Records:
        if self._dns is None:
            raise AcmeError("dns-01 needs an [acme.dns] table: how to publish the records")
        return self._dns

    def _write(
        self, typ: str, identifier: str, challb: messages.ChallengeBody, key_authorization: str
    ) -> Path:
        """The file answering an http-01 or tls-alpn-01 challenge, for any worker to serve."""
        if typ == "http-01":
            token = str(challb.to_partial_json()["token"])
            return write_http01(self.certs_dir, token, key_authorization)
        return write_tls_alpn01(self.certs_dir, identifier, key_authorization)

    async def _poll_authorization(
        self, client: acme_client.ClientV2, authz: messages.AuthorizationResource
    ) -> messages.AuthorizationResource:
        for delay in _poll_delays():
            authz, response = await self._call(client.poll, authz)
            if authz.body.status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                return authz
            await trio.sleep(max(delay, _retry_after(response)))
        raise AssertionError("unreachable")

    async def _finalize(self, client: acme_client.ClientV2, order: messages.OrderResource) -> str:
        """Submit the CSR, wait for the certificate and download the full chain."""
        body = (await self._call(client.begin_finalization, order)).body
        new_nonce = client.directory["newNonce"]
        wait = 0.0
        for delay in _poll_delays():
            if body.status == messages.STATUS_INVALID:
                raise AcmeError(f"order {order.uri} became invalid: {body.error}")
            if body.status == messages.STATUS_VALID and body.certificate:
                cert = await self._call(
                    client.net.post, body.certificate, None, new_nonce_url=new_nonce
                )
                return str(cert.text)
            await trio.sleep(max(delay, wait))
            response = await self._call(client.net.post, order.uri, None, new_nonce_url=new_nonce)
            body, wait = messages.Order.from_json(response.json()), _retry_after(response)
        raise AssertionError("unreachable")

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one blocking `acme` call in a thread; connection failures are retried."""
        for attempt in range(1, _NETWORK_ATTEMPTS + 1):
            try:
                return await trio.to_thread.run_sync(
                    lambda: fn(*args, **kwargs), limiter=self._one_request
                )
            except (requests.ConnectionError, requests.Timeout) as error:
                if attempt == _NETWORK_ATTEMPTS or isinstance(error, requests.exceptions.SSLError):
                    raise
                log.warning("ACME: %s unreachable (%s), retrying", self.directory, error)
                await trio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")


def _key_authorization(client: acme_client.ClientV2, challb: messages.ChallengeBody) -> str:
    """RFC 8555 8.1: the challenge's token and our account key's thumbprint."""
    token = str(challb.to_partial_json()["token"])
    assert client.net.key is not None
    thumbprint = client.net.key.public_key().thumbprint(hash_function=hashes.SHA256)
    return f"{token}.{b64encode(thumbprint).decode('ascii')}"


def _identifier(name: str) -> messages.Identifier:
    """An order's identifier: "ip" for an address (RFC 8738), else "dns"."""
    kind = messages.IDENTIFIER_IP if is_ip_address(name) else messages.IDENTIFIER_FQDN
    return messages.Identifier(typ=kind, value=name)


def _renewal_info_url(client: acme_client.ClientV2) -> str | None:
    try:
        return str(client.directory["renewalInfo"])
    except KeyError:
        return None


def _check_profile(client: acme_client.ClientV2, profile: str | None) -> None:
    """A profile the CA does not list would be refused or silently ignored: say so first."""
    offered = client.directory.meta.profiles or {}
    if profile is not None and profile not in offered:
        raise AcmeError(f"the CA offers no profile {profile!r} (it offers {sorted(offered)})")


def _pick_challenge(
    authz: messages.AuthorizationResource, preference: tuple[ChallengeType, ...]
) -> tuple[messages.ChallengeBody, str]:
    offered = {str(c.to_partial_json()["type"]): c for c in authz.body.challenges}
    for typ in preference:
        if typ in offered:
            return offered[typ], typ
    raise AcmeError(
        f"{authz.body.identifier.value}: the CA offers {sorted(offered)},"
        f" none of the enabled challenges {list(preference)}"
    )


def _authz_failure(authz: messages.AuthorizationResource, typ: str | None) -> str:
    """Say which identifier failed, with which challenge, and the CA's problem detail."""
    name = authz.body.identifier.value
    for challb in authz.body.challenges:
        if challb.error is not None:
            challenge_type = challb.to_partial_json()["type"]
            return f"{name}: {challenge_type} validation failed: {challb.error}"
    how = f" after {typ}" if typ else ""
    return f"{name}: authorization is {authz.body.status}{how}, the CA gave no detail"


def _poll_delays() -> Iterator[float]:
    delay = _POLL_FIRST
    while True:
        yield delay
        delay = min(delay * 2, _POLL_MAX)


def _retry_after(response: requests.Response) -> float:
    """Seconds the CA asked us to wait (RFC 8555 7.1.1 Retry-After), 0 when it did not."""
    value = response.headers.get("Retry-After")
    if not value:
        return 0.0
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def _new_key_pem(key_type: KeyType) -> bytes:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _directory_dirname(directory: str) -> str:
    """`acme-v02.api.letsencrypt.org`, or `127.0.0.1_14000` when the port is explicit."""
    return urlsplit(directory).netloc.lower().replace(":", "_")
