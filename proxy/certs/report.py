"""`port443 certs`: every site's certificate as a table, read from disk.

Only files are read (the store, each site's status record, a "files" site's own pair), so
the command works while the proxy runs elsewhere, or not at all.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

from proxy.certs.manager import read_site_files
from proxy.certs.status import load_status
from proxy.certs.store import CertStore, StoredCert
from proxy.config import Config, SiteConfig

HEADER = ("NAMES", "ISSUER", "NOT AFTER", "DAYS LEFT", "NEXT RENEWAL", "LAST ERROR")
NONE = "-"


def certificates_table(config: Config, now: datetime | None = None) -> str:
    """One row per site, columns aligned; the last error is never cut short."""
    now = now or datetime.now(UTC)
    store = CertStore(config.certs.dir)
    rows = [HEADER, *(_row(config, store, site, now) for site in config.sites)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def _row(
    config: Config, store: CertStore, site: SiteConfig, now: datetime
) -> tuple[str, str, str, str, str, str]:
    names = ",".join(site.hosts)
    issuer: str = config.issuer_of(site)
    if issuer == "files":
        try:
            files = read_site_files(site)
        except (OSError, ValueError) as exc:  # InvalidCertificate is a ValueError
            return names, issuer, "unusable", NONE, "watched", str(exc)
        return names, issuer, *_validity(files, now), "watched", NONE
    cert = store.load(site.name)
    status = load_status(store, site.name)
    if cert is not None and isinstance(directory := cert.meta.get("directory"), str):
        issuer = f"{issuer} {urlsplit(directory).netloc}"
    if status.failures and status.next_attempt is None:
        next_renewal = "gave up"
    else:
        next_renewal = _time(status.next_attempt) if status.next_attempt else NONE
    error = status.last_error if status.failures and status.last_error else NONE
    if cert is None:
        return names, issuer, "none yet", NONE, next_renewal, error
    return names, issuer, *_validity(cert, now), next_renewal, error


def _validity(cert: StoredCert, now: datetime) -> tuple[str, str]:
    days = (cert.not_after - now).total_seconds() / 86400
    return _time(cert.not_after), f"{days:.1f}" if days > 0 else "expired"


def _time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
