"""Every site's certificate state, read from disk: the `port443 certs` table, the status
page and `port443 doctor` all show these reports.

Only files are read (the store, each site's status record, a "files" site's own pair), so
the command works while the proxy runs elsewhere, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from proxy.certs.manager import read_site_files
from proxy.certs.renewal import AriWindow
from proxy.certs.status import load_status
from proxy.certs.store import CertificateStorage, CertStore
from proxy.config import Config, SiteConfig

HEADER = ("NAMES", "ISSUER", "NOT AFTER", "DAYS LEFT", "NEXT RENEWAL", "LAST ERROR")
NONE = "-"
WATCHED = "watched"  # a "files" site: renewed by whoever writes its files
GAVE_UP = "gave up"


@dataclass(frozen=True, kw_only=True)
class CertificateReport:
    """One site's certificate: what is served, when it renews, what went wrong."""

    site: str
    names: tuple[str, ...]
    issuer: str  # "local", "files", "acme <directory host>"
    not_after: datetime | None  # None: no usable certificate (see `missing`)
    missing: str | None  # "none yet" or "unusable" when not_after is None
    next_renewal: datetime | None
    renewal_plan: str | None  # WATCHED or GAVE_UP when there is no next renewal time
    last_error: str | None
    ari_window: AriWindow | None

    def days_left(self, now: datetime) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / 86400

    def to_json(self, now: datetime) -> dict[str, Any]:
        window = self.ari_window
        return {
            "site": self.site,
            "names": list(self.names),
            "issuer": self.issuer,
            "not_after": _iso(self.not_after),
            "days_left": self.days_left(now),
            "missing": self.missing,
            "next_renewal": _iso(self.next_renewal),
            "renewal_plan": self.renewal_plan,
            "last_error": self.last_error,
            "ari_window": [_iso(window.start), _iso(window.end)] if window else None,
        }


def certificate_reports(
    config: Config, store: CertificateStorage | None = None
) -> list[CertificateReport]:
    """From `store`, else from the files in `certs.dir` (this machine's copy). An on-demand
    site has no certificate of its own: each name it obtained one for is listed after the
    configured sites, as the one-name site it was obtained as (`OnDemand`)."""
    store = store or CertStore(config.certs.dir)
    reports = [_report(config, store, site) for site in config.sites if not site.on_demand]
    if any(site.on_demand for site in config.sites):
        for name in store.names():
            site = config.site_for_host(name)
            if site is not None and site.on_demand:
                reports.append(_report(config, store, replace(site, hosts=(name,))))
    return reports


def certificates_table(
    config: Config, now: datetime | None = None, store: CertificateStorage | None = None
) -> str:
    """One row per site, columns aligned; the last error is never cut short."""
    now = now or datetime.now(UTC)
    return aligned([HEADER, *(_row(report, now) for report in certificate_reports(config, store))])


def aligned(rows: list[tuple[str, ...]]) -> str:
    """Rows as text, every column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def _report(config: Config, store: CertificateStorage, site: SiteConfig) -> CertificateReport:
    issuer: str = config.issuer_of(site)
    if issuer == "files":
        try:
            files = read_site_files(site)
        except (OSError, ValueError) as exc:  # InvalidCertificate is a ValueError
            return _files_report(site, issuer, None, str(exc))
        return _files_report(site, issuer, files.not_after, None)
    cert = store.load(site.name)
    status = load_status(store, site.name)
    if cert is not None and isinstance(directory := cert.meta.get("directory"), str):
        issuer = f"{issuer} {urlsplit(directory).netloc}"
    gave_up = bool(status.failures) and status.next_attempt is None
    return CertificateReport(
        site=site.name,
        names=site.hosts,
        issuer=issuer,
        not_after=None if cert is None else cert.not_after,
        missing="none yet" if cert is None else None,
        next_renewal=status.next_attempt,
        renewal_plan=GAVE_UP if gave_up else None,
        last_error=status.last_error if status.failures and status.last_error else None,
        ari_window=status.ari_window,
    )


def _files_report(
    site: SiteConfig, issuer: str, not_after: datetime | None, error: str | None
) -> CertificateReport:
    return CertificateReport(
        site=site.name,
        names=site.hosts,
        issuer=issuer,
        not_after=not_after,
        missing="unusable" if not_after is None else None,
        next_renewal=None,
        renewal_plan=WATCHED,
        last_error=error,
        ari_window=None,
    )


def _row(report: CertificateReport, now: datetime) -> tuple[str, str, str, str, str, str]:
    days = report.days_left(now)
    if report.not_after is None or days is None:
        not_after, days_left = report.missing or NONE, NONE
    else:
        not_after, days_left = (
            format_time(report.not_after),
            f"{days:.1f}" if days > 0 else "expired",
        )
    if report.renewal_plan is not None:
        next_renewal = report.renewal_plan
    else:
        next_renewal = format_time(report.next_renewal) if report.next_renewal else NONE
    return (
        ",".join(report.names),
        report.issuer,
        not_after,
        days_left,
        next_renewal,
        report.last_error or NONE,
    )


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat()
