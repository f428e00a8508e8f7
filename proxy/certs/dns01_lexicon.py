"""DNS-01 records through a DNS provider's API (Cloudflare, Route 53, OVH, ...) with dns-lexicon.

A `RecordStore` for `Dns01Records`: the zone is found in DNS (the SOA at the first
propagation server, else through the system resolver), not guessed from the public suffix
list as lexicon's `Client` does (which also downloads that list), so delegated sub-zones
work and nothing but the provider's API is contacted. The provider class is therefore used
directly, loaded by the one private lexicon function behind `_provider_class`.

The provider's options come from `[acme.dns.options]`, then a YAML `credentials_file`,
then `LEXICON_<PROVIDER>_<OPTION>` environment variables (lexicon's own convention);
none of them is logged or put in a message. Lexicon is synchronous: each call runs in a
worker thread, bounded by CALL_TIMEOUT (a thread that overruns is abandoned).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import requests
import trio
from lexicon._private.discovery import find_providers, load_provider_module
from lexicon.config import ConfigResolver
from lexicon.interfaces import Provider

from proxy.certs.dns01 import DnsError, Server, TxtRecord, name_servers, zone_at
from proxy.config import DnsConfig

log = logging.getLogger(__name__)

CALL_TIMEOUT = 60.0  # seconds for one provider call (its HTTP requests)


def lexicon_providers() -> frozenset[str]:
    """The provider names this dns-lexicon offers."""
    return frozenset(find_providers())


def _provider_class(name: str) -> type[Provider]:
    """Lexicon's provider class `name` (its private module; pinned by a unit test)."""
    provider: type[Provider] = load_provider_module(name).Provider
    return provider


class Lexicon:
    """Adds and removes TXT records through the dns-lexicon provider `config.provider`."""

    def __init__(self, config: DnsConfig) -> None:
        self._config = config
        self._provider = _provider_class(config.provider)
        # where zones and name servers are looked up: a propagation server, else the resolver
        self._lookup: Server | None = next(iter(config.propagation_servers), None)
        self._one_call = trio.CapacityLimiter(1)  # providers keep per-instance state

    def where(self) -> str:
        return f"the {self._config.provider} API (dns-lexicon)"

    async def zone_of(self, name: dns.name.Name) -> dns.name.Name:
        if self._lookup is not None:
            return await zone_at(self._lookup, name)
        try:
            return await dns.asyncresolver.zone_for_name(name)
        except dns.exception.DNSException as error:
            raise DnsError(f"finding the zone of {name}: {error}") from error

    async def add(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        def create(provider: Provider, record: TxtRecord) -> None:
            provider.create_record("TXT", _relative_to_root(record.name), record.value)

        await self._run(zone, records, create, "adding")

    async def delete(self, zone: dns.name.Name, records: Sequence[TxtRecord]) -> None:
        def delete(provider: Provider, record: TxtRecord) -> None:
            provider.delete_record(None, "TXT", _relative_to_root(record.name), record.value)

        await self._run(zone, records, delete, "removing")

    async def name_servers(self, zone: dns.name.Name) -> list[Server]:
        return await name_servers(zone, self._lookup)

    async def _run(
        self,
        zone: dns.name.Name,
        records: Sequence[TxtRecord],
        change: Callable[[Provider, TxtRecord], None],
        what: str,
    ) -> None:
        """Authenticate a provider for `zone` and apply `change` to each record, in a thread."""

        def call() -> None:
            provider = self._provider(self._resolver(zone))
            provider.authenticate()
            try:
                for record in records:
                    change(provider, record)
            finally:
                provider.cleanup()

        names = ", ".join(sorted({record.name.to_text() for record in records}))
        with trio.move_on_after(CALL_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(call, limiter=self._one_call, abandon_on_cancel=True)
            except Exception as error:  # any provider's own errors, requests' included
                raise DnsError(
                    f"{what} TXT {names} by {self.where()}: {_describe(error)}"
                ) from None
        if scope.cancelled_caught:
            raise DnsError(
                f"{what} TXT {names}: {self.where()} gave no answer in {CALL_TIMEOUT:g} s"
            )

    def _resolver(self, zone: dns.name.Name) -> ConfigResolver:
        """The provider's configuration for `zone`: TOML options, file, environment."""
        provider = self._config.provider
        options: dict[str, Any] = {
            "provider_name": provider,
            "domain": _relative_to_root(zone),
            "ttl": 60,
            provider: dict(self._config.options),
        }
        resolver = ConfigResolver().with_dict(options)  # type: ignore[no-untyped-call]
        if self._config.credentials_file is not None:
            resolver.with_provider_config_file(provider, self._config.credentials_file)
        return resolver.with_env()


def _relative_to_root(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)


def _describe(error: Exception) -> str:
    """The error for a message; of an HTTP error only its kind and status, as its text
    names the URL, where some providers put a token."""
    if isinstance(error, requests.RequestException):
        status = error.response.status_code if error.response is not None else None
        return type(error).__name__ + (f" (HTTP {status})" if status is not None else "")
    return f"{type(error).__name__}: {error}"
