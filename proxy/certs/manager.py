"""Which certificate answers which server name, and keeping those certificates fresh.

The manager owns the host -> SSLContext map that every handshake consults. Renewing a
certificate builds a new context and replaces the map entries; connections already open
keep the context they started with. A site whose certificate cannot be had is logged and
retried with backoff while its names fall through to the default site or are refused.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import trio

from proxy.certs.local_ca import LocalCA
from proxy.certs.store import CertStore, InvalidCertificate, StoredCert, read_pair
from proxy.config import Config, SiteConfig
from proxy.tls.policy import reject_context, server_context

log = logging.getLogger(__name__)

RETRY_MIN = timedelta(minutes=1)  # first retry after a failed issuance; doubles each time
RETRY_MAX = timedelta(days=1)
MAX_SLEEP = 3600.0  # re-read the wall clock at least hourly (suspend, clock steps)


class Issuer(Protocol):
    """Where new certificates come from (the local CA, ACME)."""

    async def issue(self, site: SiteConfig) -> tuple[bytes, bytes]:
        """A new certificate for all of `site.hosts`: (fullchain PEM, private key PEM)."""
        ...


class LocalIssuer:
    """Issues from the built-in CA, off the event loop (key generation, root file I/O)."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca

    async def issue(self, site: SiteConfig) -> tuple[bytes, bytes]:
        return await trio.to_thread.run_sync(self.ca.issue, site.hosts)


def renewal_time(cert: StoredCert) -> datetime:
    """When a third of the certificate's lifetime is left (certmagic's default ratio)."""
    return cert.not_after - (cert.not_after - cert.not_before) / 3


class CertManager:
    """Loads, issues and renews every site's certificate; picks contexts per handshake.

    `issuer` defaults to the local CA for `certs.issuer = "local"`; the ACME issuer must
    be passed in. With `certs.issuer = "files"` each site's `cert`/`key` is served as is.
    """

    def __init__(
        self, config: Config, alpn: Sequence[str], *, issuer: Issuer | None = None
    ) -> None:
        self._config = config
        self._alpn = tuple(alpn)
        self._store = CertStore(config.certs.dir)
        self._issuer = _choose_issuer(config, issuer)
        default = config.tls.default_site
        self._default = default.lower() if default else None
        self._reject = reject_context()
        self._contexts: dict[str, ssl.SSLContext] = {}  # lower-case host -> context
        self._certs: dict[str, StoredCert] = {}  # site name -> certificate in service
        self._due: dict[str, datetime] = {}  # site name -> next refresh
        self._failures: dict[str, int] = {}  # site name -> consecutive failed refreshes

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a handshake's SNI: exact host, else the default site, else refuse."""
        if server_name is not None:
            context = self._contexts.get(server_name.lower())
            if context is not None:
                return context
        if self._default is not None:
            context = self._contexts.get(self._default)
            if context is not None:
                return context
        return self._reject

    def certificates(self) -> list[StoredCert]:
        """The certificates currently served, one per site that has one."""
        return list(self._certs.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Obtain every site's certificate, report started, then renew them as they come due."""
        await self._refresh_all(self._config.sites)
        task_status.started()
        while True:
            next_due = min(self._due.values(), default=None)
            if next_due is None:
                await trio.sleep_forever()
            else:
                delay = (next_due - datetime.now(UTC)).total_seconds()
                await trio.sleep(min(max(delay, 0.0), MAX_SLEEP))
            now = datetime.now(UTC)
            await self._refresh_all(
                [
                    site
                    for site in self._config.sites
                    if site.name in self._due and self._due[site.name] <= now
                ]
            )

    async def _refresh_all(self, sites: Sequence[SiteConfig]) -> None:
        async with trio.open_nursery() as nursery:
            for site in sites:
                nursery.start_soon(self._refresh, site)

    async def _refresh(self, site: SiteConfig) -> None:
        """Bring one site up to date; on failure keep serving what it has and retry later."""
        try:
            await self._update(site)
        except Exception as exc:  # one site's trouble must not take the others down
            self._failed(site, exc)
        else:
            self._failures.pop(site.name, None)

    async def _update(self, site: SiteConfig) -> None:
        if self._issuer is None:
            await self._install(site, await _read_site_files(site))
            return
        stored = await trio.to_thread.run_sync(self._store.load, site.name)
        now = datetime.now(UTC)
        if stored is not None and _covers(site, stored) and now < stored.not_after:
            await self._install(site, stored)  # serve it meanwhile, even if due for renewal
            if now < renewal_time(stored):
                return
        await self._renew(site, self._issuer)

    def _failed(self, site: SiteConfig, exc: Exception) -> None:
        what = f"certificate for site {site.name} ({', '.join(site.hosts)})"
        serving = (
            "keeping the current one"
            if site.name in self._certs
            else "its names fall through to the default site or are refused"
        )
        if self._issuer is None:
            log.error("%s cannot be loaded: %s; %s", what, exc, serving)
            return
        failures = self._failures.get(site.name, 0) + 1
        self._failures[site.name] = failures
        delay = min(RETRY_MIN * 2 ** (failures - 1), RETRY_MAX)
        self._due[site.name] = datetime.now(UTC) + delay
        log.error("%s failed: %s; %s; retrying in %s", what, exc, serving, delay)

    async def _renew(self, site: SiteConfig, issuer: Issuer) -> None:
        chain, key = await issuer.issue(site)
        meta: dict[str, object] = {
            "issuer": self._config.certs.issuer,
            "hosts": list(site.hosts),
            "issued_at": datetime.now(UTC).isoformat(),
        }
        await trio.to_thread.run_sync(self._store.write, site.name, chain, key, meta)
        cert = await trio.to_thread.run_sync(self._store.load, site.name)
        if cert is None or not _covers(site, cert):
            raise InvalidCertificate("the issued certificate is unusable or lacks site names")
        log.info("issued a new certificate for site %s", site.name)
        await self._install(site, cert)
        if renewal_time(cert) <= datetime.now(UTC):
            raise InvalidCertificate("the issued certificate is already due for renewal")

    async def _install(self, site: SiteConfig, cert: StoredCert) -> None:
        """Serve `cert` for the site's hosts from now on (unchanged serial: no rebuild)."""
        current = self._certs.get(site.name)
        if current is None or current.serial != cert.serial:
            context = await trio.to_thread.run_sync(
                server_context, cert.chain_path, cert.key_path, self._alpn
            )
            for host in site.hosts:
                self._contexts[host.lower()] = context  # atomic swap per name
            self._certs[site.name] = cert
            log.info(
                "site %s: serving certificate %x, valid until %s",
                site.name,
                cert.serial,
                cert.not_after,
            )
        if self._issuer is not None:
            self._due[site.name] = renewal_time(cert)


def _choose_issuer(config: Config, issuer: Issuer | None) -> Issuer | None:
    """None means "files": certificates are provided, never issued."""
    if config.certs.issuer == "files":
        return None
    if issuer is not None:
        return issuer
    if config.certs.issuer == "local":
        return LocalIssuer(LocalCA(config.certs.dir))
    raise ValueError(f"certs.issuer = {config.certs.issuer!r} needs an issuer passed in")


def _covers(site: SiteConfig, cert: StoredCert) -> bool:
    names = {name.lower() for name in cert.names}
    return all(host.lower() in names for host in site.hosts)


async def _read_site_files(site: SiteConfig) -> StoredCert:
    if site.cert is None or site.key is None:
        raise InvalidCertificate("issuer 'files' needs cert and key for the site")
    cert = await trio.to_thread.run_sync(read_pair, site.name, site.cert, site.key)
    if cert.not_after <= datetime.now(UTC):
        log.warning(
            "certificate %s for site %s expired at %s", site.cert, site.name, cert.not_after
        )
    if not _covers(site, cert):
        log.warning("certificate %s does not name every host of site %s", site.cert, site.name)
    return cert
