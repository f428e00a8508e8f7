"""One upstream group at run time: choosing a backend, skipping the ones that are down,
counting requests in flight, and the active health checks.

The forwarder asks `open_stream` for a stream (connect failures move on to the next
backend) and reports every attempt's end with `finished`, which feeds the passive health
state and the least-connections count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import trio

from proxy.config import UpstreamGroup
from proxy.http.model import ResponseHead, UpstreamRequest
from proxy.netio import StreamTimeout
from proxy.upstream.balance import Balancer
from proxy.upstream.health import BackendHealth
from proxy.upstream.stream import (
    BodyEnd,
    Pool,
    UpstreamClosed,
    UpstreamStream,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)


class UpstreamUnavailable(Exception):
    """No backend of the group accepted a connection. `timed_out` picks 504 over 502."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class NoHealthyBackend(Exception):
    """Every backend of the group is down (503); `retry_after` in whole seconds."""

    def __init__(self, group: str, retry_after: int) -> None:
        super().__init__(f"every backend of group {group} is down")
        self.retry_after = retry_after


class GroupUpstreams:
    """The run-time state of one `UpstreamGroup` over the shared pools."""

    def __init__(
        self,
        group: UpstreamGroup,
        pools: Sequence[Pool],
        timeouts: tuple[float, float],
        on_health: Callable[[UpstreamGroup, str, bool], None],
    ) -> None:
        self.group = group
        self._pools = list(pools)
        self.first_byte, self.idle = timeouts  # seconds, resolved against [limits]
        self.busy = [0] * len(pools)
        urls = [pool.upstream.url for pool in pools]
        self._balancer = Balancer(group.policy, urls, group.weights)
        self._all = list(range(len(pools)))
        self.health = [BackendHealth(group.health, self._reporter(url, on_health)) for url in urls]
        # As nginx: a lone backend is never taken out passively, there is nothing to fail
        # over to (its active checks, if any, still decide).
        self._passive = len(pools) > 1
        self._down = 0  # backends down now: the common case, none, skips the filtering
        for url in urls:
            on_health(group, url, True)

    def _reporter(
        self, url: str, on_health: Callable[[UpstreamGroup, str, bool], None]
    ) -> Callable[[bool, str], None]:
        def changed(up: bool, reason: str) -> None:
            self._down += -1 if up else 1
            log.warning(
                "group %s: backend %s is %s (%s)",
                self.group.name,
                url,
                "up" if up else "down",
                reason,
            )
            on_health(self.group, url, up)

        return changed

    def url(self, index: int) -> str:
        return self._pools[index].upstream.url

    def _candidates(self, tried: set[int]) -> list[int]:
        if not self._down and not tried:
            return self._all
        now = trio.current_time()
        return [i for i in self._all if i not in tried and self.health[i].available(now)]

    def has_candidate(self, tried: set[int]) -> bool:
        return bool(self._candidates(tried))

    async def open_stream(self, key: bytes | None, tried: set[int]) -> tuple[int, UpstreamStream]:
        """A stream to a backend not in `tried`, chosen by the policy; a backend that cannot
        connect counts a failure and the next one is tried."""
        candidates = self._candidates(tried)
        if not candidates:
            now = trio.current_time()
            wait = min(self.health[i].retry_after(now) for i in self._all)
            raise NoHealthyBackend(self.group.name, math.ceil(wait))
        errors: list[str] = []
        timed_out = False
        while candidates:
            index = self._balancer.pick(candidates, self.busy, key)
            pool = self._pools[index]
            try:
                stream = await pool.open_stream()
            except StreamTimeout:
                timed_out = True
                errors.append(f"{pool.upstream.url}: connect timed out")
            except OSError as exc:
                errors.append(f"{pool.upstream.url}: {exc.strerror or exc}")
            else:
                self.busy[index] += 1
                return index, stream
            if self._passive:
                self.health[index].failed(trio.current_time())
            candidates = [i for i in candidates if i != index]
        raise UpstreamUnavailable("; ".join(errors), timed_out)

    def finished(self, index: int, failed: bool) -> None:
        """An attempt on backend `index` ended; `failed`: it counts against its health."""
        self.busy[index] -= 1
        if failed and self._passive:
            self.health[index].failed(trio.current_time())

    async def check_health(self) -> None:
        """The active health checks, forever: one task per group, each backend in turn."""
        settings = self.group.health
        path = settings.path
        if path is None:
            return
        while True:
            for index, pool in enumerate(self._pools):
                passed, detail = await self._check(pool, path)
                self.health[index].checked(passed, trio.current_time(), detail)
            await trio.sleep(settings.interval)

    async def _check(self, pool: Pool, path: str) -> tuple[bool, str]:
        settings = self.group.health
        upstream = pool.upstream
        host = settings.host or upstream.url.partition("://")[2]
        request = UpstreamRequest(
            method=b"GET",
            target=path.encode(),
            authority=host.encode(),
            fields=[(b"user-agent", b"port443-health-check")],
            has_body=False,
        )
        stream: UpstreamStream | None = None
        try:
            with trio.fail_after(settings.timeout):
                stream = await pool.open_stream()
                await stream.send_head(request, settings.timeout)
                event = await stream.next_event(settings.timeout)
                while isinstance(event, ResponseHead) and event.status < 200:
                    event = await stream.next_event(settings.timeout)
                status = event.status if isinstance(event, ResponseHead) else 0
                while not isinstance(event, BodyEnd):
                    event = await stream.next_event(settings.timeout)
        except (OSError, StreamTimeout, UpstreamClosed, UpstreamTimeout, trio.TooSlowError) as exc:
            if stream is not None:
                await stream.aclose()
            return False, f"health check: {type(exc).__name__}: {exc}"
        stream.release()
        return status == settings.status, f"health check: status {status}"
