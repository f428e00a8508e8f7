"""On-demand TLS: a certificate for a name nobody listed, obtained during its first handshake.

For platforms whose customers point their own domains at the proxy. A name that an
on-demand site takes (config.site_for_host) is served once the site's `ask` endpoint
approved it (GET `?domain=<name>`, 200 = yes, as Caddy does) and its certificate is there:
from the store, else ordered now. Orders are limited per minute and the names in number,
so that nobody can drain the CA's rate limits with made-up server names. A refusal (the
endpoint's, a limit's, a failed order) is remembered for `on_demand_refusal_ttl`: no new
ask and no new order for that name meanwhile. Approvals need no cache: an approved name
has its certificate from then on. Concurrent handshakes for one name share one flight: one
ask, one order.

What happens after approval belongs to the certificate manager (`obtain`): the name's
certificate is stored, renewed and shared between workers like any site's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import quote, urlsplit

import requests
import trio
from trio.lowlevel import RunVar

from proxy.certs.acme import RenewalInfo
from proxy.certs.issuers import Issued, Issuer, IssueRequest
from proxy.certs.store import StoredCert
from proxy.config import Config, SiteConfig, is_ip_address
from proxy.config_load.convert import Invalid, host
from proxy.lograte import RateLimitedLog

log = logging.getLogger(__name__)

ASK_TIMEOUT = 10.0  # seconds for the ask endpoint's answer; no answer refuses
RATE_WINDOW = 60.0  # on_demand_rate counts orders in any window this long (seconds)
MAX_REFUSALS = 100_000  # refusals remembered at most; beyond, the oldest are forgotten
OUTCOMES = ("ordered", "refused", "rate_limited")  # counted for the metrics

Clock = Callable[[], float]
Ask = Callable[[str, str], Awaitable[bool]]
Obtain = Callable[[SiteConfig], Awaitable[bool]]

ASK_THREADS = 8  # asks in flight at once: trio's shared thread pool stays free for the rest

_ask_threads: RunVar[trio.CapacityLimiter] = RunVar("_ask_threads")
# a client chooses the names it sends: one line per interval for what it can repeat at will
_log_not_dns = RateLimitedLog(log, logging.INFO)
_log_refused = RateLimitedLog(log, logging.INFO)
_log_ask_failed = RateLimitedLog(log, logging.WARNING)
_log_capped = RateLimitedLog(log, logging.WARNING)


class RateLimited(Exception):
    """An on-demand order refused by `on_demand_rate`."""


class Refusals:
    """Names refused lately, each for `ttl` seconds. Bounded: every entry lives equally
    long, so the oldest entries are the first to expire and the first to be dropped."""

    def __init__(self, ttl: float, *, limit: int = MAX_REFUSALS, clock: Clock) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()  # name -> its end, oldest first

    def __len__(self) -> int:
        return len(self._until)

    def refused(self, name: str) -> bool:
        until = self._until.get(name)
        return until is not None and self._clock() < until

    def add(self, name: str) -> None:
        now = self._clock()
        self._until.pop(name, None)  # re-added: now the newest
        while self._until:
            until = next(iter(self._until.values()))
            if until > now and len(self._until) < self._limit:
                break
            self._until.popitem(last=False)
        self._until[name] = now + self._ttl


class OrderLimiter:
    """At most `rate` orders in any RATE_WINDOW seconds (a sliding window)."""

    def __init__(self, rate: int, *, clock: Clock) -> None:
        self._rate = rate
        self._clock = clock
        self._orders: deque[float] = deque()  # when the orders in the window were placed

    def take(self) -> bool:
        """Count one order now if the window has room for it; False when it has not."""
        now = self._clock()
        while self._orders and self._orders[0] <= now - RATE_WINDOW:
            self._orders.popleft()
        if len(self._orders) >= self._rate:
            return False
        self._orders.append(now)
        return True


class LimitedIssuer(Issuer):
    """An issuer whose first orders (no certificate of its own to renew) pass the limiter;
    renewals of certificates already given out are never held back."""

    def __init__(self, inner: Issuer, on_demand: OnDemand) -> None:
        self._inner = inner
        self._on_demand = on_demand
        self.instant = inner.instant
        self.has_fallback = inner.has_fallback

    async def issue(self, request: IssueRequest) -> Issued:
        if request.previous is None:
            self._on_demand.count_order()
        return await self._inner.issue(request)

    def issued(self, cert: StoredCert) -> bool:
        return self._inner.issued(cert)

    async def renewal_info(self, cert: StoredCert) -> RenewalInfo | None:
        return await self._inner.renewal_info(cert)


class OnDemand:
    """Which names get a certificate on demand, and the one flight per name that gets it.

    `obtain(site)` serves the certificate of `site` (an on-demand site narrowed to one
    name): True once it is served, False if it could not be had.
    """

    def __init__(
        self, config: Config, obtain: Obtain, *, ask: Ask | None = None, clock: Clock | None = None
    ) -> None:
        clock = clock or trio.current_time
        acme = config.acme
        self._config = config
        self._obtain = obtain
        self._ask = ask or ask_endpoint
        self._refusals = Refusals(acme.on_demand_refusal_ttl, clock=clock)
        self._limiter = OrderLimiter(acme.on_demand_rate, clock=clock)
        self._max_names = acme.on_demand_max_names
        self._names: set[str] = set()  # served or being obtained
        self._flights: dict[str, trio.Event] = {}  # name -> set when its flight lands
        self.counts = dict.fromkeys(OUTCOMES, 0)

    def limited(self, issuer: Issuer) -> Issuer:
        """`issuer`, its first orders counted against on_demand_rate."""
        return LimitedIssuer(issuer, self)

    def count_order(self) -> None:
        """Count a first order, or raise RateLimited when on_demand_rate allows none now."""
        if not self._limiter.take():
            self.counts["rate_limited"] += 1
            rate = self._config.acme.on_demand_rate
            raise RateLimited(f"on-demand orders are limited to {rate} per minute")
        self.counts["ordered"] += 1

    async def admit(self, server_name: str) -> bool:
        """Whether a handshake for `server_name` may go on: True for a name no on-demand
        site takes (the usual rules pick its context) or once its certificate is served;
        False: refuse the handshake (unrecognized_name)."""
        name = server_name.lower()
        site = self._config.site_for_host(name)
        if site is None or not site.on_demand:
            return True
        while (landed := self._flights.get(name)) is not None:  # one flight per name
            await landed.wait()
        if name in self._names:
            return True
        if self._refusals.refused(name):
            return False
        landed = self._flights[name] = trio.Event()
        try:
            return await self._fly(site, name)
        finally:
            del self._flights[name]
            landed.set()

    async def _fly(self, site: SiteConfig, name: str) -> bool:
        if not _valid_name(name):
            _log_not_dns("on-demand: refusing %r: not a DNS name", name)
            return False
        if not await self._ask(site.ask or "", name):
            self.counts["refused"] += 1
            self._refusals.add(name)
            return False
        if len(self._names) >= self._max_names:
            self.counts["rate_limited"] += 1
            _log_capped(
                "on-demand: refusing %s: on_demand_max_names (%d) reached", name, self._max_names
            )
            self._refusals.add(name)
            return False
        self._names.add(name)
        if await self._obtain(dataclasses.replace(site, hosts=(name,))):
            return True
        self._names.discard(name)
        self._refusals.add(name)
        return False


async def ask_endpoint(url: str, name: str) -> bool:
    """GET `url` with `domain=<name>` added to its query: 200 approves; any other status,
    no answer within ASK_TIMEOUT or a failed connection refuses."""
    target = f"{url}{'&' if urlsplit(url).query else '?'}domain={quote(name)}"
    get = partial(requests.get, target, timeout=ASK_TIMEOUT, allow_redirects=False, stream=True)
    try:
        response = await trio.to_thread.run_sync(get, limiter=_threads(), abandon_on_cancel=True)
    except requests.RequestException as exc:
        _log_ask_failed("on-demand: refusing %s: ask %s failed: %s", name, url, exc)
        return False
    response.close()
    if response.status_code != 200:
        _log_refused("on-demand: %s refused (ask answered %d)", name, response.status_code)
        return False
    log.info("on-demand: %s approved", name)
    return True


def _threads() -> trio.CapacityLimiter:
    """This run's limiter of ask threads (a limiter belongs to one trio run)."""
    try:
        return _ask_threads.get()
    except LookupError:
        limiter = trio.CapacityLimiter(ASK_THREADS)
        _ask_threads.set(limiter)
        return limiter


def _valid_name(name: str) -> bool:
    """A DNS name a CA could issue for: LDH labels (A-labels), at least two, no IP."""
    try:
        return host(name) == name and "." in name and not is_ip_address(name)
    except Invalid:
        return False
