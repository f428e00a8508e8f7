"""`port443 storage migrate`: copy certificates, keys, renewal plans and ACME accounts from
one store into another (a directory into Redis, or back).

Running it twice changes nothing, and it never loses anything newer: a certificate is
copied only where the target has none for that name or one that expires earlier, its
renewal plan travels with it, and an ACME account is copied only to a target without one
for that CA. Into Redis every write holds the certificate's lock (and its fencing token),
so a running instance renewing the same certificate is neither overwritten nor
overwrites; the lock is freed right after.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from proxy.certs.redis_store import LockLost
from proxy.certs.store import CertificateStorage, StoredCert

COPIED = "copied"
WOULD_COPY = "would copy"  # --dry-run
KEPT = "kept"  # the target's is as new or newer
SKIPPED = "skipped"  # run again later


@dataclass(frozen=True, kw_only=True)
class Step:
    """What happened to one certificate or account."""

    item: str  # "certificate a.example.com", "account acme-v02.api.letsencrypt.org"
    action: str
    detail: str

    def __str__(self) -> str:
        return f"{self.item}: {self.action} ({self.detail})"


def migrate(source: CertificateStorage, target: CertificateStorage, *, dry_run: bool) -> list[Step]:
    """Copy what `target` lacks or holds older; `dry_run` only says what would be copied.
    OSError and RedisError propagate when a store cannot be read at all."""
    steps = [_certificate(source, target, name, dry_run) for name in source.names()]
    present = target.accounts()
    steps += [
        _account(target, present, ident, data, dry_run) for ident, data in source.accounts().items()
    ]
    return steps


def _certificate(
    source: CertificateStorage, target: CertificateStorage, name: str, dry_run: bool
) -> Step:
    item = f"certificate {name}"
    cert = source.load(name)
    if cert is None:
        return Step(item=item, action=SKIPPED, detail="unusable in the source")
    chain, key = cert.chain_path.read_bytes(), cert.key_path.read_bytes()
    described = _describe(cert)
    if dry_run:
        kept = _kept(target.load(name), cert)
        if kept is not None:
            return Step(item=item, action=KEPT, detail=kept)
        return Step(item=item, action=WOULD_COPY, detail=described)
    if not target.claim_renewal(name):
        why = "the target is unreachable" if target.unreachable_since else "its lock is held"
        return Step(item=item, action=SKIPPED, detail=f"{why}; run again later")
    try:
        kept = _kept(target.load(name), cert)  # under the lock: nobody writes meanwhile
        if kept is not None:
            return Step(item=item, action=KEPT, detail=kept)
        status = source.read_status(name)
        meta = {k: v for k, v in cert.meta.items() if k != "store_version"}  # Redis's own
        target.write(name, chain, key, meta)
        if status is not None:
            target.write_status(name, status)
    except (LockLost, redis.RedisError) as exc:
        return Step(item=item, action=SKIPPED, detail=f"{exc}; run again later")
    finally:
        target.release(name)
    return Step(item=item, action=COPIED, detail=described)


def _kept(current: StoredCert | None, incoming: StoredCert) -> str | None:
    """Why the target's certificate stays, or None when `incoming` should replace it."""
    if current is None or current.not_after < incoming.not_after:
        return None
    return f"the target's {_describe(current)} is as new or newer"


def _describe(cert: StoredCert) -> str:
    return f"serial {cert.serial:x}, valid until {cert.not_after:%Y-%m-%d %H:%M:%SZ}"


def _account(
    target: CertificateStorage,
    present: dict[str, bytes],
    ident: str,
    data: bytes,
    dry_run: bool,
) -> Step:
    """Copy the account for the CA `ident` unless `target` has one (`present`)."""
    item = f"account {ident}"
    if ident in present:
        same = present[ident] == data
        detail = "already there" if same else "the target has its own account at this CA"
        return Step(item=item, action=KEPT, detail=detail)
    if dry_run:
        return Step(item=item, action=WOULD_COPY, detail="no account at this CA yet")
    stored = target.account(ident, data)  # the first wins: one stored meanwhile stays
    action = COPIED if stored == data else KEPT
    return Step(item=item, action=action, detail="no account at this CA yet")
