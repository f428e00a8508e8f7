"""ACME DNS-01 (RFC 8555 8.4): TXT records published, waited for, and removed.

How a record gets into its zone is a `RecordStore`: RFC 2136 dynamic updates signed with a
TSIG key (RFC 8945), which any authoritative server takes (BIND, Knot, PowerDNS), here; a DNS
provider's API through dns-lexicon in `dns01_lexicon.py`. What follows is the same for both
(`Dns01Records`): the CA may ask any of the zone's authoritative servers, so before it is
asked to validate, every one of them must answer with the records: they are polled until
they do, for at most `propagation_timeout`; and the records are removed afterwards, also
after a failure or a cancellation.

Queries go out with dnspython's async API, which runs on trio. The TSIG secret stays in
the key object, whose repr shows it: neither is ever logged or put in a message.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update
import trio
from josepy.b64 import b64encode

from proxy.config import RFC2136, DnsConfig

log = logging.getLogger(__name__)

RECORD_TTL = 60  # seconds; short, as the record lives for one validation
QUERY_TIMEOUT = 5.0  # seconds per DNS query or update
CLEANUP_TIMEOUT = 15.0  # seconds for removing the records, even after a cancellation
_POLL_FIRST, _POLL_MAX = 0.2, 5.0  # seconds between looks at the authoritative servers
_LABEL = "_acme-challenge"

Server = tuple[str, int]  # IP address, port


class DnsError(Exception):
    """Publishing or removing a record failed; the message names the server and record."""


class TxtRecord(NamedTuple):
    name: dns.name.Name  # _acme-challenge.<domain>., absolute
    value: str  # base64url(SHA-256(key authorization))


def challenge_record(identifier: str, key_authorization: str) -> TxtRecord:
    """The record answering a dns-01 challenge for `identifier` (RFC 8555 8.4).

    A wildcard's authorization names its base domain, and a `*.` prefix is dropped in any
    case: `*.example.com` and `example.com` both answer at `_acme-challenge.example.com`.
    """
    domain = identifier.removeprefix("*.").rstrip(".")
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    name = dns.name.from_text(f"{_LABEL}.{domain}")
    return TxtRecord(name=name, value=b64encode(digest).decode("ascii"))


class RecordStore(Protocol):
    """Where TXT records are written: the one part of DNS-01 that differs by provider."""

    def where(self) -> str:
        """Where the records go, for log lines and errors (never a credential)."""

    async def zone_of(self, name: dns.name.Name) -> dns.name.Name:
        """The apex of the zone holding `name`; DnsError when none is found."""

    async def add(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        """Add `records` (keeping other values of the same names); DnsError on failure."""

    async def delete(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        """Delete exactly these values; DnsError on failure."""

    async def name_servers(self, zone: dns.name.Name) -> list[Server]:
        """The zone's authoritative servers, to watch for propagation."""


class Dns01Records:
    """Publishes challenge records through a `RecordStore`, waits until the zone's
    authoritative servers show them, and removes them."""

    def __init__(self, config: DnsConfig, store: RecordStore) -> None:
        self._config = config
        self._store = store

    async def publish(self, records: Sequence[TxtRecord]) -> None:
        """Add `records`, then wait until every authoritative server of their zones
        answers with them; DnsError when an update fails or time runs out."""
        zones = await self._by_zone(records)
        for zone, in_zone in zones.items():
            await self._store.add(zone, in_zone)
            log.info("DNS-01: added %s at %s", _show(in_zone), self._store.where())
        with trio.move_on_after(self._config.propagation_timeout) as scope:
            for zone, in_zone in zones.items():
                await self._wait_visible(zone, in_zone)
        if scope.cancelled_caught:
            raise DnsError(
                f"{_show(records)}: not visible at every authoritative server within"
                f" {self._config.propagation_timeout:g} s (acme.dns.propagation_timeout)"
            )

    async def remove(self, records: Sequence[TxtRecord]) -> None:
        """Delete `records` (only these values: other TXT data stays), even when the
        calling task is cancelled, within CLEANUP_TIMEOUT; failures are logged, not raised."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT) as scope:
            try:
                for zone, in_zone in (await self._by_zone(records)).items():
                    await self._store.delete(zone, in_zone)
                    log.info("DNS-01: removed %s", _show(in_zone))
            except DnsError as error:
                log.warning("DNS-01: could not remove the challenge records: %s", error)
        if scope.cancelled_caught:
            log.warning("DNS-01: removing %s timed out; remove them by hand", _show(records))

    async def _by_zone(self, records: Iterable[TxtRecord]) -> dict[dns.name.Name, list[TxtRecord]]:
        zones: dict[dns.name.Name, list[TxtRecord]] = {}
        for record in records:
            zones.setdefault(await self._store.zone_of(record.name), []).append(record)
        return zones

    async def _wait_visible(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        """Poll the zone's authoritative servers until each answers with every record."""
        servers = list(self._config.propagation_servers) or await self._store.name_servers(zone)
        delay = _POLL_FIRST
        while servers := [server for server in servers if not await _shows(server, records)]:
            log.debug("DNS-01: waiting for %s at %s", _show(records), _where(*servers))
            await trio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
        log.info("DNS-01: %s visible at the authoritative servers of %s", _show(records), zone)


class Rfc2136:
    """A `RecordStore` adding and removing TXT records at the primary server of their zone."""

    def __init__(self, config: DnsConfig) -> None:
        self._server = config.server
        self._key = dns.tsig.Key(
            name=config.tsig_key_name,
            secret=config.tsig_secret,
            algorithm=config.tsig_algorithm,
        )

    def where(self) -> str:
        return _where(self._server)

    async def zone_of(self, name: dns.name.Name) -> dns.name.Name:
        return await zone_at(self._server, name)

    async def add(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        update = self._update(zone)
        for record in records:
            update.add(record.name, RECORD_TTL, dns.rdatatype.TXT, f'"{record.value}"')
        await self._send(update, f"adding {_show(records)}")

    async def delete(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        update = self._update(zone)
        for record in records:
            update.delete(record.name, dns.rdatatype.TXT, f'"{record.value}"')
        await self._send(update, f"removing {_show(records)}")

    async def name_servers(self, zone: dns.name.Name) -> list[Server]:
        return await name_servers(zone, self._server)

    def _update(self, zone: dns.name.Name) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(
            zone,
            keyring=self._key,
            keyname=self._key.name,
            keyalgorithm=self._key.algorithm,
        )

    async def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        response = await ask(update, self._server, what, tcp=True)
        if response.rcode() != dns.rcode.NOERROR:
            raise DnsError(
                f"{what}: {_where(self._server)} answered {dns.rcode.to_text(response.rcode())}"
                " (is the TSIG key allowed to update this zone?)"
            )


async def zone_at(server: Server, name: dns.name.Name) -> dns.name.Name:
    """The apex of the zone holding `name`, from `server`'s SOA: in the answer at the
    apex, else in the authority section of its negative answer."""
    query = dns.message.make_query(name, dns.rdatatype.SOA)
    response = await ask(query, server, f"finding the zone of {name}")
    for rrset in (*response.answer, *response.authority):
        if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
            return rrset.name
    raise DnsError(
        f"{_where(server)} is not authoritative for {name}"
        f" ({dns.rcode.to_text(response.rcode())}, no SOA)"
    )


async def name_servers(zone: dns.name.Name, server: Server | None) -> list[Server]:
    """The zone's NS hosts on port 53, asked of `server` (which holds in-zone glue), else
    of the system resolver; addresses of hosts `server` has no glue for from the resolver."""
    if server is None:
        try:
            answer = await dns.asyncresolver.resolve(zone, dns.rdatatype.NS)
        except dns.exception.DNSException as error:
            raise DnsError(f"the NS of {zone}: {error}") from error
        hosts = [rdata.target for rdata in answer]
    else:
        query = dns.message.make_query(zone, dns.rdatatype.NS)
        response = await ask(query, server, f"the NS of {zone}")
        hosts = [
            rdata.target
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.NS
            for rdata in rrset
        ]
    servers: list[Server] = []
    for host in hosts:
        servers.extend((address, 53) for address in await _addresses(host, server))
    if not servers:
        raise DnsError(f"no address found for the name servers of {zone} ({hosts})")
    return servers


async def _addresses(host: dns.name.Name, server: Server | None) -> list[str]:
    addresses: list[str] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            found: list[str] = []
            if server is not None:
                query = dns.message.make_query(host, rdtype)
                response = await ask(query, server, f"the address of {host}")
                found = [
                    str(r) for rrset in response.answer if rrset.rdtype == rdtype for r in rrset
                ]
            if not found:
                answer = await dns.asyncresolver.resolve(host, rdtype, raise_on_no_answer=False)
                found = [str(r) for r in answer]
        except (DnsError, dns.exception.DNSException) as error:
            log.debug("DNS-01: no %s for %s: %s", dns.rdatatype.to_text(rdtype), host, error)
            continue
        addresses.extend(found)
    return addresses


async def _shows(server: Server, records: Sequence[TxtRecord]) -> bool:
    """Whether `server` answers every record now (an unreachable server does not)."""
    for name in {record.name for record in records}:
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD
        try:
            response = await ask(query, server, f"looking up {name}")
        except DnsError as error:
            log.debug("DNS-01: %s", error)
            return False
        values = {
            b"".join(rdata.strings).decode("ascii", "replace")
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.TXT and rrset.name == name
            for rdata in rrset
        }
        if not {record.value for record in records if record.name == name} <= values:
            return False
    return True


async def ask(
    message: dns.message.Message, server: Server, what: str, *, tcp: bool = False
) -> dns.message.Message:
    """Send one message; any DNS, TSIG or network failure becomes a DnsError."""
    address, port = server
    try:
        if tcp:
            return await dns.asyncquery.tcp(message, address, QUERY_TIMEOUT, port)
        response, _ = await dns.asyncquery.udp_with_fallback(message, address, QUERY_TIMEOUT, port)
        return response
    except (dns.exception.DNSException, OSError) as error:
        detail = str(error) or type(error).__name__
        raise DnsError(f"{what}: {_where(server)}: {detail}") from error


def _show(records: Iterable[TxtRecord]) -> str:
    names = sorted({record.name.to_text() for record in records})
    return "TXT " + ", ".join(names)


def _where(*servers: Server) -> str:
    return ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in servers)


def dns01_records(config: DnsConfig) -> Dns01Records:
    """DNS-01 for `config`: RFC 2136, or the dns-lexicon provider it names."""
    if config.provider == RFC2136:
        return Dns01Records(config, Rfc2136(config))
    # imported here: that module builds on this one, and loads dns-lexicon only when used
    from proxy.certs.dns01_lexicon import Lexicon

    return Dns01Records(config, Lexicon(config))
