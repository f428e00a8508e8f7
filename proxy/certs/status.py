"""A site's renewal plan and failure record, kept in the store next to its certificate.

The record (`certs/<name>/status.json`, or Redis) lets a restarted or reloaded proxy
continue a backoff instead of hammering the CA, and lets `port443 certs` show the plan
of a proxy running elsewhere.
The certificate itself stays the truth: a status for another certificate is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from proxy.certs.renewal import AriWindow
from proxy.certs.store import CertificateStorage

log = logging.getLogger(__name__)

_TIMES = ("next_attempt", "ari_recheck", "first_failure")


@dataclass(frozen=True)
class RenewalStatus:
    hosts: tuple[str, ...] = ()  # the names the plan is for; another set starts afresh
    serial: int | None = None  # the certificate the plan is for; None before the first plan
    next_attempt: datetime | None = None  # the next order; None after failures: gave up
    ari_window: AriWindow | None = None  # the CA's last suggested window
    ari_recheck: datetime | None = None  # when to ask the CA again; None: it offers no ARI
    failures: int = 0  # consecutive failed orders
    first_failure: datetime | None = None
    other_challenge: bool = False  # how the next try is made (renewal.Retry)
    fallback_ca: bool = False
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in _TIMES:
            data[name] = _time_text(data[name])
        window = self.ari_window
        data["ari_window"] = [window.start.isoformat(), window.end.isoformat()] if window else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RenewalStatus:
        """KeyError, TypeError or ValueError for a malformed record."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for name in _TIMES:
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name])
        values["hosts"] = tuple(values.get("hosts", ()))
        window = values.get("ari_window")
        if window is not None:
            start, end = window
            values["ari_window"] = AriWindow(
                datetime.fromisoformat(start), datetime.fromisoformat(end)
            )
        return cls(**values)


def load_status(store: CertificateStorage, name: str) -> RenewalStatus:
    """The recorded status of certificate `name`; an empty one if absent or unreadable."""
    try:
        data = store.read_status(name)
        return RenewalStatus() if data is None else RenewalStatus.from_json(json.loads(data))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring the unreadable renewal status of %s: %s", name, exc)
        return RenewalStatus()


def save_status(store: CertificateStorage, name: str, status: RenewalStatus) -> None:
    """Record `status`; an unwritable store is logged, renewals go on without the record."""
    data = json.dumps(status.to_json(), indent=2, sort_keys=True).encode()
    try:
        store.write_status(name, data)
    except OSError as exc:
        log.warning("cannot record the renewal status of %s: %s", name, exc)


def _time_text(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
