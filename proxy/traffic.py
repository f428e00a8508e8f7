"""The last minutes of traffic for the status page: request and error rates, p50/p99
latency, each site's errors and the latest errors.

Prometheus keeps totals since start; a person looking at the status page wants "now". This
observer counts finished HTTPS requests in wall-clock slots of `SLOT_SECONDS`, so that the
supervisor can add up its workers' snapshots slot by slot (their clocks are the same one).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.http.model import Outcome
from proxy.metrics import LATENCY_BUCKETS

SLOT_SECONDS = 10
SLOTS = 30  # five minutes of history
RECENT_ERRORS = 20
ERROR_STATUS = 500  # at and above: the proxy's or the upstream's failure, not the client's


@dataclass
class _Slot:
    requests: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sites: dict[str, list[int]] = field(default_factory=dict)  # name -> [requests, errors]

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "buckets": self.buckets,
            "sites": self.sites,
        }

    def add(self, data: dict[str, Any]) -> None:
        self.requests += int(data["requests"])
        self.errors += int(data["errors"])
        self.buckets = [a + int(b) for a, b in zip(self.buckets, data["buckets"], strict=True)]
        for name, (requests, errors) in data["sites"].items():
            counts = self.sites.setdefault(name, [0, 0])
            counts[0] += int(requests)
            counts[1] += int(errors)


class TrafficHistory:
    """An `Observer` of the HTTPS listener's requests; `snapshot()` is JSON for the wire."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)

    def record(self, outcome: Outcome) -> None:
        if outcome.listener != "https":
            return
        now = self._clock()
        number = int(now // SLOT_SECONDS)
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = _Slot()
            for old in [n for n in self._slots if n <= number - SLOTS]:
                del self._slots[old]
        failed = outcome.status >= ERROR_STATUS
        slot.requests += 1
        slot.errors += failed
        slot.buckets[_bucket(outcome.finished - outcome.started)] += 1
        if outcome.site is not None:
            counts = slot.sites.setdefault(outcome.site, [0, 0])
            counts[0] += 1
            counts[1] += failed
        if failed:
            self._errors.append(
                {
                    "time": now,
                    "site": outcome.site,
                    "status": outcome.status,
                    "upstream": outcome.upstream,
                    "method": outcome.request.method.decode("ascii", "replace"),
                    # the path only: a query string may carry a secret
                    "path": outcome.request.target.partition(b"?")[0].decode("ascii", "replace"),
                }
            )

    def snapshot(self) -> dict[str, Any]:
        return {
            "slots": {str(n): slot.to_json() for n, slot in self._slots.items()},
            "errors": list(self._errors),
        }


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One snapshot of the instance from its workers' ones: counts added slot by slot."""
    slots: dict[int, _Slot] = {}
    errors: list[dict[str, Any]] = []
    for snapshot in snapshots:
        for number, data in snapshot["slots"].items():
            slots.setdefault(int(number), _Slot()).add(data)
        errors.extend(snapshot["errors"])
    errors.sort(key=lambda error: float(error["time"]))
    return {
        "slots": {str(n): slot.to_json() for n, slot in slots.items()},
        "errors": errors[-RECENT_ERRORS:],
    }


def summarize(snapshot: dict[str, Any], now: float) -> dict[str, Any]:
    """What the page shows: one point per slot of the last `SLOTS` (the running one last,
    its rates over the seconds elapsed so far), each site's totals over the window."""
    current = int(now // SLOT_SECONDS)
    slots: dict[int, _Slot] = {}
    for number, data in snapshot["slots"].items():
        if current - SLOTS < int(number) <= current:
            slots.setdefault(int(number), _Slot()).add(data)
    series = []
    for number in range(current - SLOTS + 1, current + 1):
        slot = slots.get(number, _Slot())
        seconds = now - number * SLOT_SECONDS if number == current else SLOT_SECONDS
        seconds = max(seconds, 1.0)
        series.append(
            {
                "time": number * SLOT_SECONDS,
                "requests_per_second": slot.requests / seconds,
                "errors_per_second": slot.errors / seconds,
                "p50": quantile(slot.buckets, 0.5),
                "p99": quantile(slot.buckets, 0.99),
            }
        )
    total = _Slot()
    for slot in slots.values():
        total.add(slot.to_json())
    return {
        "slot_seconds": SLOT_SECONDS,
        "series": series,
        "requests": total.requests,
        "errors": total.errors,
        "p50": quantile(total.buckets, 0.5),
        "p99": quantile(total.buckets, 0.99),
        "sites": {name: {"requests": r, "errors": e} for name, (r, e) in total.sites.items()},
        "recent_errors": snapshot["errors"],
    }


def quantile(buckets: list[int], q: float) -> float | None:
    """The q-quantile of a latency histogram in seconds, interpolated inside its bucket as
    Prometheus's histogram_quantile does; None without observations. The overflow bucket
    answers with the highest bound."""
    count = sum(buckets)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    lower = 0.0
    for upper, n in zip(LATENCY_BUCKETS, buckets, strict=False):
        if n and seen + n >= rank:
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
        lower = upper
    return float(LATENCY_BUCKETS[-1])


def _bucket(seconds: float) -> int:
    for index, upper in enumerate(LATENCY_BUCKETS):
        if seconds <= upper:
            return index
    return len(LATENCY_BUCKETS)
