"""Which certificate answers which server name, and keeping those certificates fresh.

The manager owns the host -> SSLContext map that every handshake consults, and runs one
task per site. An issued site (local CA, ACME) sleeps until its certificate is due, by
renewal.py's policy and the CA's ARI window, then orders a new one; failures are retried
per renewal.py while the current certificate keeps being served. A "files" site watches
its two files and swaps in a new pair once it validates. A new certificate replaces the
map entries for new handshakes; connections already open keep the context they have.

Until a site has a certificate its names are refused (or get the default site's), and
ACME orders run in the background: the CA validates through our own listeners.

An on-demand site has no certificate of its own: each name it takes gets one during its
first handshake (certs/on_demand.py decides which and when), kept like a site's from then on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import trio

from proxy.certs.acme import ARI_RECHECK, AcmeError
from proxy.certs.acme_challenges import (
    ACME_TLS_ALPN,
    SharedChallenges,
    TlsAlpn01Contexts,
    share_challenges,
)
from proxy.certs.issuers import AcmeIssuer, Issuer, IssueRequest, LocalIssuer
from proxy.certs.local_ca import LocalCA
from proxy.certs.on_demand import OnDemand
from proxy.certs.renewal import next_retry, renewal_due
from proxy.certs.status import RenewalStatus, load_status, save_status
from proxy.certs.store import (
    CertificateStorage,
    InvalidCertificate,
    StoredCert,
    open_storage,
    read_pair,
)
from proxy.config import Config, SiteConfig, wildcard_of
from proxy.config import Issuer as IssuerName
from proxy.tls.clienthello import ClientHello
from proxy.tls.policy import reject_context, server_context

log = logging.getLogger(__name__)

ON_DEMAND_WAIT = 180.0  # seconds a handshake waits for its name's first certificate
MAX_SLEEP = 3600.0  # re-read the wall clock at least hourly (suspend, clock steps)
FILES_POLL = 2.0  # seconds between looks at changed files: a "files" site's, or the store's

_UNSEEN = object()
T = TypeVar("T")
FileStamp = tuple[tuple[int, int, int], ...] | None  # (mtime_ns, size, inode) per file


class CertManager:
    """Loads, issues and renews every site's certificate; picks the context per handshake.

    The issuers follow each site's issuer (`SiteConfig.issuer`, else `certs.issuer`);
    `issuer`, when given, replaces them all (tests inject one this way).
    """

    def __init__(
        self, config: Config, alpn: Sequence[str], *, issuer: Issuer | None = None
    ) -> None:
        self._config = config
        self._alpn = tuple(alpn)
        self._store = open_storage(config)
        shared = self._store if isinstance(self._store, SharedChallenges) else None
        share_challenges(config.certs.dir, shared)
        self._issuers = _issuers(config, issuer, self._store)
        default = config.tls.default_site
        self._default = default.lower() if default else None
        self._reject = reject_context()
        self._challenges = TlsAlpn01Contexts(config.certs.dir)
        self._contexts: dict[str, ssl.SSLContext] = {}  # lower-case host -> context
        self._certs: dict[str, StoredCert] = {}  # site name -> certificate in service
        self._served: dict[str, StoredCert] = {}  # lower-case host -> its certificate
        self._file_stamps: dict[str, FileStamp] = {}  # "files" site name -> last validated
        self.renewal_failures: dict[str, int] = {}  # site name -> failed orders (metrics)
        wanted = any(site.on_demand for site in config.sites)
        self.on_demand = OnDemand(config, self._obtain) if wanted else None
        self._first_orders: dict[str, _FirstOrder] = {}  # on-demand name -> its first order
        self._nursery: trio.Nursery | None = None  # while running: on-demand names' tasks

    def context_for_hello(
        self, hello: ClientHello | None, local_address: str | None = None
    ) -> ssl.SSLContext:
        """The one answer to "which context for this ClientHello".

        Without SNI, the address the client connected to (`local_address`) stands for the
        name: a site listing that IP address answers with its IP-address certificate.

        A pending TLS-ALPN-01 challenge (RFC 8737) wins when the client offers acme-tls/1:
        only an ACME validator does that. None, a hello our parser refused, gets the
        refusing context, so that OpenSSL reads the hello itself and answers with its
        alert (decode_error for a bad length) as nginx does.
        """
        if hello is None:
            return self._reject
        if ACME_TLS_ALPN in hello.alpn and hello.server_name:
            challenge = self._challenges.context_for(hello.server_name)
            if challenge is not None:
                return challenge
        name = hello.server_name
        if name is None and local_address is not None:
            address = ipaddress.ip_address(local_address)
            name = str(getattr(address, "ipv4_mapped", None) or address)
        return self.context_for(name)

    async def handshake_context(
        self, hello: ClientHello | None, local_address: str | None = None
    ) -> ssl.SSLContext:
        """`context_for_hello`, after the certificate of an on-demand name was obtained: the
        one place a handshake waits, before OpenSSL reads the hello (never in its SNI
        callback). A refused on-demand name is refused, default site or not."""
        if (
            self.on_demand is not None
            and hello is not None
            and hello.server_name
            and hello.server_name.lower() not in self._contexts
            and ACME_TLS_ALPN not in hello.alpn  # a validator's: the order waits for it
            and not await self.on_demand.admit(hello.server_name)
        ):
            return self._reject
        return self.context_for_hello(hello, local_address)

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a handshake's SNI: exact host, else a wildcard host covering it
        (`*.example.com` for `a.example.com`), else the default site, else refuse."""
        return _by_name(self._contexts, server_name, self._default) or self._reject

    def certificate_for(self, server_name: str | None) -> StoredCert | None:
        """The certificate `context_for` serves for this SNI, by the same rule (QUIC's TLS
        takes a certificate and key, not an SSLContext); None: refuse the handshake."""
        return _by_name(self._served, server_name, self._default)

    @property
    def storage_unreachable(self) -> bool:
        """The shared store did not answer its last call (metrics); serving goes on."""
        return self._store.unreachable_since is not None

    def certificates(self) -> list[StoredCert]:
        """The certificates currently served, one per site that has one."""
        return list(self._certs.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve what is on disk, then report started and keep every site's certificate fresh.

        Certificates from an instant issuer (the local CA) are obtained before `started`;
        ACME orders are not waited for.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeat)
                for site in self._config.sites:
                    if site.on_demand:
                        continue  # its names' certificates come with their first handshakes
                    issuer = self._issuers.get(self._config.issuer_of(site))
                    if issuer is None:
                        await nursery.start(self._watch_files, site)
                    else:
                        await nursery.start(self._keep_issued, site, issuer)
                task_status.started()
                if self.on_demand is not None:  # names may come with any handshake
                    await trio.sleep_forever()
        finally:
            self._nursery = None

    async def reload(self) -> None:
        """Validate every "files" site's pair again now (SIGHUP), changed or not."""
        for site in self._config.sites:
            if self._config.issuer_of(site) == "files":
                await self._load_files(site, force=True)

    # -- issued certificates ------------------------------------------------------------

    async def _obtain(self, site: SiteConfig) -> bool:
        """Serve the certificate of an on-demand name (`site` narrowed to it): the stored
        one, else a new order. From then on it is kept like a site's (renewed, followed);
        if its first order fails, or none is had within ON_DEMAND_WAIT, its task ends."""
        if self._nursery is None or self.on_demand is None:
            return False  # a retired manager orders nothing more
        issuer = self.on_demand.limited(self._issuers[self._config.issuer_of(site)])
        first = self._first_orders[site.name] = _FirstOrder()
        self._nursery.start_soon(self._keep_on_demand, site, issuer, first)
        try:
            with trio.move_on_after(ON_DEMAND_WAIT):
                await first.settled.wait()
        finally:
            del self._first_orders[site.name]
        if site.name not in self._certs:
            first.scope.cancel()
            return False
        return True

    async def _keep_on_demand(self, site: SiteConfig, issuer: Issuer, first: _FirstOrder) -> None:
        try:
            with first.scope:
                await self._keep_issued(site, issuer)
        finally:
            first.settled.set()

    async def _keep_issued(
        self,
        site: SiteConfig,
        issuer: Issuer,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the site's stored certificate, then order a new one whenever it is due;
        while another process holds the site's renewal claim, follow what it stores. The
        claim is asked for again before each order: a lease may have been lost meanwhile."""
        while True:
            if not await trio.to_thread.run_sync(self._store.claim_renewal, site.name):
                await self._follow(site, task_status=task_status)
                task_status = trio.TASK_STATUS_IGNORED
            await self._renew_while_claimed(site, issuer, task_status=task_status)
            task_status = trio.TASK_STATUS_IGNORED

    async def _renew_while_claimed(
        self, site: SiteConfig, issuer: Issuer, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Order and renew the site's certificate until the claim is lost. It starts from
        the store, not from memory: another instance may have done the work already."""
        status = await trio.to_thread.run_sync(load_status, self._store, site.name)
        if status.hosts != site.hosts:  # failures for other names do not hold this set back
            status = RenewalStatus(hosts=site.hosts)
        cert = await self._load_stored(site)
        started = False
        while True:
            status = await self._plan(site, issuer, cert, status)
            attempt_at = status.next_attempt
            # started at once; only an instant issuer's first order comes before, come what may
            first_order = issuer.instant and not status.failures
            if not started and not (first_order and attempt_at and attempt_at <= _now()):
                task_status.started()
                started = True
            await trio.to_thread.run_sync(save_status, self._store, site.name, status)
            wake = min(filter(None, (attempt_at, status.ari_recheck)), default=None)
            await _sleep_until(wake)
            if attempt_at is not None and attempt_at <= _now():
                if not await trio.to_thread.run_sync(self._store.claim_renewal, site.name):
                    return
                cert, status = await self._attempt(site, issuer, cert, status)

    async def _follow(self, site: SiteConfig, *, task_status: trio.TaskStatus[None]) -> None:
        """Serve what the claim holder stores, picking up each new certificate within
        FILES_POLL; return once this process wins the claim (the holder died)."""
        log.info("site %s: another process orders and renews this certificate", site.name)
        seen: object = _UNSEEN  # the first look always loads: the store may be unreachable
        started = False
        while True:
            version = await trio.to_thread.run_sync(self._store.version, site.name)
            if version != seen:
                seen = version
                await self._load_stored(site)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(FILES_POLL)
            if await trio.to_thread.run_sync(self._store.claim_renewal, site.name):
                log.info("site %s: taking over its orders and renewals", site.name)
                return

    async def _heartbeat(self) -> None:
        """Keep this process's renewal claims alive, as often as the store asks."""
        while (interval := await trio.to_thread.run_sync(self._store.heartbeat)) is not None:
            await trio.sleep(interval)

    async def _plan(
        self, site: SiteConfig, issuer: Issuer, cert: StoredCert | None, status: RenewalStatus
    ) -> RenewalStatus:
        """When to order next: after a failure, per the retry policy; without a usable
        certificate of this issuer, now; else when it is due (asking the CA's ARI)."""
        if status.failures:
            return status
        now = _now()
        if (
            cert is None
            or now >= cert.not_after
            or not _covers(site, cert)
            or not issuer.issued(cert)
        ):
            return dataclasses.replace(status, serial=None, next_attempt=now)
        if status.serial != cert.serial:
            status = RenewalStatus(hosts=site.hosts, serial=cert.serial)
        elif status.ari_recheck is None or now < status.ari_recheck:
            return status
        window, recheck = status.ari_window, None
        try:
            info = await issuer.renewal_info(cert)
        except AcmeError as exc:  # ARI is advice: fall back to the lifetime, ask again later
            log.warning("site %s: %s; asking again in %s", site.name, exc, ARI_RECHECK)
            recheck = now + ARI_RECHECK
        else:
            if info is not None:
                window, recheck = info.window, info.recheck_at
        if status.next_attempt is None or window != status.ari_window:
            due = renewal_due(cert.not_before, cert.not_after, now, window)
            log.info(
                "site %s: certificate %x valid until %s, renewal at %s%s",
                site.name,
                cert.serial,
                cert.not_after,
                due,
                f" (ARI window {window.start} to {window.end})" if window else "",
            )
            status = dataclasses.replace(status, next_attempt=due, ari_window=window)
        return dataclasses.replace(status, ari_recheck=recheck)

    async def _attempt(
        self, site: SiteConfig, issuer: Issuer, cert: StoredCert | None, status: RenewalStatus
    ) -> tuple[StoredCert | None, RenewalStatus]:
        """Order one certificate; on failure keep `cert` and schedule the retry."""
        previous = cert if cert is not None and issuer.issued(cert) else None
        request = IssueRequest(
            site=site,
            previous=previous,
            other_challenge=status.other_challenge,
            fallback_ca=status.fallback_ca,
        )
        attempt = status.failures + 1
        log.info("site %s: requesting a certificate (attempt %d)", site.name, attempt)
        try:
            issued = await issuer.issue(request)
            new = await self._store_issued(site, issued.fullchain_pem, issued.key_pem, issued.meta)
            await self._install(site, new)
            if renewal_due(new.not_before, new.not_after, _now()) <= _now():
                raise InvalidCertificate("the new certificate is due for renewal already")
        except Exception as exc:  # one site's trouble must not take the others down
            return cert, self._failed(site, issuer, status, exc, previous)
        return new, RenewalStatus(hosts=site.hosts)

    def _failed(
        self,
        site: SiteConfig,
        issuer: Issuer,
        status: RenewalStatus,
        exc: Exception,
        renewing: StoredCert | None,
    ) -> RenewalStatus:
        """The retry after `exc`, per the failure policy, the lifetime of the certificate
        `renewing` and the CA's Retry-After; logged."""
        self.renewal_failures[site.name] = self.renewal_failures.get(site.name, 0) + 1
        pending = self._first_orders.get(site.name)
        if pending is not None:  # an on-demand name's first order: refused, its task ends
            pending.scope.cancel()
            pending.settled.set()
        now = _now()
        failures = status.failures + 1
        first = status.first_failure or now
        retry_after = exc.retry_after if isinstance(exc, AcmeError) else None
        retry = next_retry(
            failures,
            first,
            now,
            has_fallback_ca=issuer.has_fallback,
            retry_after=retry_after,
            lifetime=renewing.not_after - renewing.not_before if renewing is not None else None,
        )
        serving = (
            "keeping the current one"
            if site.name in self._certs
            else "its names fall through to the default site or are refused"
        )
        if pending is not None:
            when = "not ordered again within acme.on_demand_refusal_ttl"
        elif retry is None:
            when = f"giving up after {failures} attempts since {first}"
        else:
            how = " with another challenge type" if retry.other_challenge else ""
            how += " at the fallback CA" if retry.fallback_ca else ""
            when = f"retrying{how} in {retry.at - now} (at {retry.at})"
        log.error(
            "site %s: certificate request %d failed: %s; %s; %s",
            site.name,
            failures,
            exc,
            serving,
            when,
        )
        return dataclasses.replace(
            status,
            failures=failures,
            first_failure=first,
            next_attempt=retry.at if retry else None,
            other_challenge=retry.other_challenge if retry else False,
            fallback_ca=retry.fallback_ca if retry else False,
            last_error=str(exc),
            ari_recheck=None,  # no renewalInfo polls while retrying
        )

    async def _load_stored(self, site: SiteConfig) -> StoredCert | None:
        """The stored certificate, served at once if still valid, even when it is due."""
        cert = await trio.to_thread.run_sync(self._store.load, site.name)
        if cert is None or _now() >= cert.not_after:
            return cert
        try:
            await self._install(site, cert)
        except ssl.SSLError as exc:
            log.warning("site %s: stored certificate unusable: %s", site.name, exc)
            return None
        return cert

    async def _store_issued(
        self, site: SiteConfig, chain: bytes, key: bytes, meta: dict[str, object]
    ) -> StoredCert:
        meta = {**meta, "hosts": list(site.hosts), "issued_at": _now().isoformat()}
        await trio.to_thread.run_sync(self._store.write, site.name, chain, key, meta)
        cert = await trio.to_thread.run_sync(self._store.load, site.name)
        if cert is None or not _covers(site, cert):
            raise InvalidCertificate("the issued certificate is unusable or lacks site names")
        return cert

    # -- certificates from files ----------------------------------------------------------

    async def _watch_files(
        self, site: SiteConfig, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the site's files; poll their mtimes and swap in a changed, valid pair."""
        await self._load_files(site)
        task_status.started()
        while True:
            await trio.sleep(FILES_POLL)
            await self._load_files(site)

    async def _load_files(self, site: SiteConfig, *, force: bool = False) -> None:
        stamp = await trio.to_thread.run_sync(_stamp, site)
        if not force and site.name in self._file_stamps and stamp == self._file_stamps[site.name]:
            return
        self._file_stamps[site.name] = stamp
        try:
            cert = await trio.to_thread.run_sync(read_site_files, site)
            await self._install(site, cert)
        except (OSError, ValueError, ssl.SSLError) as exc:  # InvalidCertificate is a ValueError
            serving = (
                "keeping the one in service"
                if site.name in self._certs
                else "its names fall through to the default site or are refused"
            )
            log.error(
                "site %s: refusing the certificate in %s and %s: %s; %s",
                site.name,
                site.cert,
                site.key,
                exc,
                serving,
            )

    # -- serving --------------------------------------------------------------------------

    async def _install(self, site: SiteConfig, cert: StoredCert) -> None:
        """Serve `cert` for the site's hosts from now on (unchanged serial: no rebuild)."""
        current = self._certs.get(site.name)
        if current is not None and current.serial == cert.serial:
            return
        context = await trio.to_thread.run_sync(
            server_context, cert.chain_path, cert.key_path, self._alpn, site.client_auth
        )
        for host in site.hosts:
            self._contexts[host.lower()] = context  # atomic swap per name
            self._served[host.lower()] = cert
        self._certs[site.name] = cert
        if (pending := self._first_orders.get(site.name)) is not None:
            pending.settled.set()
        log.info(
            "site %s: serving certificate %x, valid until %s",
            site.name,
            cert.serial,
            cert.not_after,
        )


class _FirstOrder:
    """An on-demand name's first certificate: `settled` once it is served or failed; its
    task runs in `scope`."""

    def __init__(self) -> None:
        self.settled = trio.Event()
        self.scope = trio.CancelScope()


def _by_name(table: dict[str, T], server_name: str | None, default: str | None) -> T | None:
    """The entry for an SNI name: the exact host, else a wildcard host covering it, else the
    default site's, else None."""
    if server_name is not None:
        name = server_name.lower()
        entry = table.get(name)
        if entry is None and (wildcard := wildcard_of(name)) is not None:
            entry = table.get(wildcard)
        if entry is not None:
            return entry
    return table.get(default) if default is not None else None


def _issuers(
    config: Config, override: Issuer | None, store: CertificateStorage
) -> dict[IssuerName, Issuer]:
    """One issuer per kind the sites use; "files" needs none."""
    kinds = {config.issuer_of(site) for site in config.sites} - {"files"}
    issuers: dict[IssuerName, Issuer] = {}
    for kind in kinds:
        if override is not None:
            issuers[kind] = override
        elif kind == "local":
            issuers[kind] = LocalIssuer(LocalCA(config.certs.dir))
        else:
            issuers[kind] = AcmeIssuer(config.certs.dir, config.acme, store)
    return issuers


def _now() -> datetime:
    return datetime.now(UTC)


async def _sleep_until(when: datetime | None) -> None:
    """Sleep until the wall clock reaches `when` (None: forever), checking it hourly.

    Always a checkpoint, even when `when` has passed: a cancelled site task stops here.
    """
    if when is None:
        await trio.sleep_forever()
    while True:
        left = (when - _now()).total_seconds()
        await trio.sleep(min(max(left, 0.0), MAX_SLEEP))
        if left <= MAX_SLEEP:
            return


def _covers(site: SiteConfig, cert: StoredCert) -> bool:
    names = {name.lower() for name in cert.names}
    return all(host.lower() in names for host in site.hosts)


def _stamp(site: SiteConfig) -> FileStamp:
    """What changes when the site's files are rewritten or replaced; None if one is missing."""
    try:
        stats = [os.stat(path) for path in (site.cert, site.key) if path is not None]
    except OSError:
        return None
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)


def read_site_files(site: SiteConfig) -> StoredCert:
    """A "files" site's pair, if the key matches, the chain parses and it is in date."""
    if site.cert is None or site.key is None:
        raise InvalidCertificate('issuer "files" needs cert and key for the site')
    cert = read_pair(site.name, site.cert, site.key)
    now = _now()
    if now >= cert.not_after:
        raise InvalidCertificate(f"the certificate expired at {cert.not_after}")
    if now < cert.not_before:
        raise InvalidCertificate(f"the certificate is not valid before {cert.not_before}")
    if not _covers(site, cert):
        log.warning("site %s: certificate %s does not name every host", site.name, site.cert)
    return cert
