"""The commands that read certificate stores, `certs` and `storage migrate`: their own module
so that serving imports redis only when `[storage]` uses it."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis

from proxy.certs.migrate import SKIPPED, migrate
from proxy.certs.redis_store import RedisStore
from proxy.certs.report import NONE, aligned, certificates_table, format_time
from proxy.certs.store import CertificateStorage, CertStore, open_storage
from proxy.config import Config

Loader = Callable[[Path], Config | None]  # a config file, or None after printing why not


def _open_store(path: Path, cache: Path, load: Loader) -> CertificateStorage | None:
    """The store a configuration file names (Redis with `cache` as its local copy), or a
    certs directory as it is; None after printing why not."""
    if path.is_dir():
        return CertStore(path)
    config = load(path)
    return None if config is None else open_storage(config, cache=cache)


def migrate_stores(source_path: Path, target_path: Path, load: Loader, *, dry_run: bool) -> int:
    """`port443 storage migrate`: exit status 1 when anything was skipped or failed."""
    with tempfile.TemporaryDirectory(prefix="port443-migrate-") as tmp:
        source = _open_store(source_path, Path(tmp) / "source", load)
        target = _open_store(target_path, Path(tmp) / "target", load)
        if source is None or target is None:
            return 1
        try:
            steps = migrate(source, target, dry_run=dry_run)
        except (OSError, ValueError, redis.RedisError) as exc:
            print(f"port443: storage migrate stopped: {exc}", file=sys.stderr)
            return 1
    for step in steps:
        print(step)
    skipped = sum(step.action == SKIPPED for step in steps)
    print(f"{len(steps)} items, {skipped} skipped{' (dry run)' if dry_run else ''}")
    return 1 if skipped else 0


def certificates(config: Config) -> int:
    """The certificate table; with Redis, the shared view and who holds each lock."""
    if config.storage.backend == "directory":
        print(certificates_table(config))
        return 0
    with tempfile.TemporaryDirectory(prefix="port443-certs-") as tmp:
        store = RedisStore(config.storage, CertStore(Path(tmp)))
        try:
            locks = _locks_table(config, store)
        except redis.RedisError as exc:
            print(
                f"port443: Redis unreachable ({exc}); this machine's copy in {config.certs.dir}:",
                file=sys.stderr,
            )
            print(certificates_table(config))
            return 1
        print(certificates_table(config, store=store))
    print()
    print(locks)
    return 0


def _locks_table(config: Config, store: RedisStore) -> str:
    """Which instance orders and renews each issued certificate, since when; RedisError
    when Redis does not answer."""
    now = datetime.now(UTC)
    rows: list[tuple[str, ...]] = [("CERTIFICATE", "LOCK HOLDER", "SINCE")]
    for site in config.sites:
        if config.issuer_of(site) == "files":
            continue
        holder = store.lock_holder(site.name)
        if holder is None:
            rows.append((site.name, "free", NONE))
            continue
        instance, since = holder
        held = int((now - since).total_seconds())
        rows.append((site.name, instance, f"{format_time(since)} (for {held} s)"))
    return aligned(rows)
