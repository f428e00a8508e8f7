"""Where certificates come from: the `Issuer` protocol and its two implementations.

The certificate manager decides *when* a site needs a certificate; an issuer only knows
*how* to get one. The local CA answers at once; ACME needs the proxy's listeners up (the
CA validates through them), may offer a renewal window (ARI) and may have a fallback CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import trio
from cryptography import x509

from proxy.certs.acme import AcmeClient, ExternalAccountBinding, RenewalInfo
from proxy.certs.local_ca import LocalCA
from proxy.certs.store import CertificateStorage, StoredCert
from proxy.config import AcmeConfig, SiteConfig


@dataclass(frozen=True)
class IssueRequest:
    site: SiteConfig
    previous: StoredCert | None = None  # the certificate being renewed, from this issuer
    other_challenge: bool = False  # retry policy: put another challenge type first
    fallback_ca: bool = False  # retry policy: order from the fallback CA


class Issued(NamedTuple):
    fullchain_pem: bytes
    key_pem: bytes
    meta: dict[str, object]  # kept in meta.json: which issuer (and CA, profile) it came from


class Issuer(Protocol):
    __slots__ = ()  # slotted implementations stay slotted

    instant: bool  # issues without the network: wait for it before listening
    has_fallback: bool  # a fallback CA that the retry policy may switch to

    async def issue(self, request: IssueRequest) -> Issued:
        """A new certificate for all of `request.site.hosts`, with a new key."""
        ...

    def issued(self, cert: StoredCert) -> bool:
        """Whether `cert` came from this issuer; any other is replaced at once."""
        ...

    async def renewal_info(self, cert: StoredCert) -> RenewalInfo | None:
        """The CA's renewal window for `cert` (RFC 9773), None when it offers none."""
        ...


class LocalIssuer(Issuer):
    """Issues from the built-in CA, off the event loop (key generation, root file I/O)."""

    instant = True
    has_fallback = False

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca

    async def issue(self, request: IssueRequest) -> Issued:
        chain, key = await trio.to_thread.run_sync(self.ca.issue, request.site.hosts)
        return Issued(chain, key, {"issuer": "local"})

    def issued(self, cert: StoredCert) -> bool:
        return cert.meta.get("issuer") == "local"

    async def renewal_info(self, cert: StoredCert) -> RenewalInfo | None:
        return None


class AcmeIssuer(Issuer):
    """Orders from the configured ACME directory, or from its fallback when the retry
    policy says so; the configured profile is requested by every order, renewals too."""

    instant = False

    def __init__(
        self, certs_dir: Path, config: AcmeConfig, accounts: CertificateStorage | None = None
    ) -> None:
        self._config = config
        self._accounts = accounts
        eab = None
        if config.eab_kid is not None and config.eab_hmac_key is not None:
            eab = ExternalAccountBinding(config.eab_kid, config.eab_hmac_key)
        self._primary = self._client(certs_dir, config.directory, eab)
        self._fallback = None
        if config.fallback_directory is not None:  # EAB credentials belong to the first CA
            self._fallback = self._client(certs_dir, config.fallback_directory, None)
        self.has_fallback = self._fallback is not None

    def _client(
        self, certs_dir: Path, directory: str, eab: ExternalAccountBinding | None
    ) -> AcmeClient:
        config = self._config
        return AcmeClient(
            certs_dir,
            directory,
            email=config.email,
            ca_bundle=config.ca_bundle,
            challenges=config.challenges,
            eab=eab,
            dns=config.dns,
            accounts=self._accounts,
        )

    async def issue(self, request: IssueRequest) -> Issued:
        client = self._fallback if request.fallback_ca and self._fallback else self._primary
        challenges = self._config.challenges_for(request.site)
        if request.other_challenge:
            challenges = (*challenges[1:], *challenges[:1])
        previous = request.previous
        replaces = None
        if previous is not None and previous.meta.get("directory") == client.directory:
            replaces = await _leaf(previous)  # ARI `replaces` names a certificate of this CA
        chain, key = await client.issue(
            request.site.hosts,
            self._config.key_type,
            challenges,
            profile=self._config.profile,
            replaces=replaces,
        )
        meta: dict[str, object] = {"issuer": "acme", "directory": client.directory}
        if self._config.profile is not None:
            meta["profile"] = self._config.profile
        return Issued(chain, key, meta)

    def issued(self, cert: StoredCert) -> bool:
        return cert.meta.get("issuer") == "acme" and self._client_for(cert) is not None

    async def renewal_info(self, cert: StoredCert) -> RenewalInfo | None:
        client = self._client_for(cert)
        if client is None:
            return None
        return await client.renewal_info(await _leaf(cert))

    def _client_for(self, cert: StoredCert) -> AcmeClient | None:
        """The client of the CA that issued `cert` (a switch to staging or production: none)."""
        for client in (self._primary, self._fallback):
            if client is not None and cert.meta.get("directory") == client.directory:
                return client
        return None


async def _leaf(cert: StoredCert) -> x509.Certificate:
    data = await trio.Path(cert.chain_path).read_bytes()
    return x509.load_pem_x509_certificate(data)
