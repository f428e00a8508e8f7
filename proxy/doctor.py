"""`port443 doctor`: what a new user runs before going live. Each check ends in a verdict
(ok, warn, fail) and, unless ok, what to do; the exit status is 1 if any check failed.

Checks, in the order a problem would bite: ports 80/443 can be bound (or are held by this
configuration's own running proxy; otherwise which process holds them), the certificate
store is writable and persistent, the clock is sane, each site's host names resolve to an
address of this machine (A and AAAA, through the system resolver), each ACME directory
answers (and its Date agrees with our clock) and has our account, and the certificates in
the store and when they renew. The configuration itself was loaded before (`port443 check`).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Literal

from proxy.certs.acme import _directory_dirname
from proxy.certs.report import certificate_reports
from proxy.certs.store import account_path
from proxy.config import Config
from proxy.pidfile import read_pid
from proxy.storage_check import check_certificate_store

Verdict = Literal["ok", "warn", "fail"]
Resolver = Callable[[str], list[str]]  # host name -> its addresses
MAX_CLOCK_SKEW = 300.0  # seconds; ACME and TLS tolerate a little, certificates start "now"
BUILT = datetime(2025, 1, 1, tzinfo=UTC)  # a clock earlier than this is surely wrong
HTTP_TIMEOUT = 10.0


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    advice: str | None = None

    def __str__(self) -> str:
        line = f"[{self.verdict.upper():4}] {self.name}: {self.detail}"
        return line if self.advice is None else f"{line}\n       -> {self.advice}"


def run_doctor(config: Config) -> int:
    """Print every check; 0 when none failed."""
    checks = list(diagnose(config))
    for check in checks:
        print(check)
    failed = sum(check.verdict == "fail" for check in checks)
    print(f"{len(checks)} checks, {failed} failed")
    return 1 if failed else 0


def diagnose(config: Config, resolve: Resolver | None = None) -> Iterator[Check]:
    yield Check(name="config", verdict="ok", detail=f"{config.path}: {len(config.sites)} sites")
    yield from _ports(config)
    yield _store(config)
    yield _clock(datetime.now(UTC))
    resolve = resolve or system_resolver
    for site in config.sites:
        for host in site.hosts:
            yield _host(host, config.issuer_of(site) == "acme", resolve)
    directories = {
        config.acme.directory for site in config.sites if config.issuer_of(site) == "acme"
    }
    for directory in sorted(directories):
        yield from _acme(config, directory)
    yield from _certificates(config)


# -- ports ----------------------------------------------------------------------------


def _ports(config: Config) -> Iterator[Check]:
    ports = [
        (port, kind)
        for port, kind in ((config.listen.http, "http"), (config.listen.https, "https"))
        if port
    ]
    for address in config.listen.addresses:
        for port, kind in ports:
            yield _port(config, address, port, kind)


def _port(config: Config, address: str, port: int, kind: str) -> Check:
    name = f"{kind} port {address} {port}"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            return Check(name=name, verdict="ok", detail="can be bound")
        except PermissionError:
            return Check(
                name=name,
                verdict="fail",
                detail="permission denied (ports below 1024 need a privilege)",
                advice="run as root, or with CAP_NET_BIND_SERVICE (contrib/port443.service)",
            )
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return Check(
                    name=name,
                    verdict="fail",
                    detail=str(exc),
                    advice="check listen.addresses: is it an address of this machine?",
                )
    holder = port_holder(port)
    try:
        ours = read_pid(config)
    except (OSError, ValueError):
        ours = None
    if holder is not None and ours is not None and holder[0] in _family(ours):
        return Check(name=name, verdict="ok", detail=f"held by port443 itself (pid {ours})")
    who = f"{holder[1]} (pid {holder[0]})" if holder else "another process"
    return Check(
        name=name,
        verdict="fail",
        detail=f"in use by {who}",
        advice="stop that process, or choose another port in [listen]",
    )


def port_holder(port: int) -> tuple[int, str] | None:
    """The process listening on TCP `port` (any address): pid and command name, from /proc;
    None if it cannot be told (another user's process without privileges)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(pid_dir.name), (pid_dir / "comm").read_text().strip()
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _family(pid: int) -> set[int]:
    """`pid` and its children: a supervisor's workers hold the listeners too."""
    family = {pid}
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            family.update(int(c) for c in child.read_text().split())
        except OSError:
            continue
    return family


# -- store and clock --------------------------------------------------------------------


def _store(config: Config) -> Check:
    name = f"certificate store {config.certs.dir}"
    warnings = check_certificate_store(config.certs.dir)
    if not warnings:
        return Check(name=name, verdict="ok", detail="writable and persistent")
    not_writable = "not writable" in warnings[0]
    return Check(
        name=name,
        verdict="fail" if not_writable else "warn",
        detail=warnings[0],
        advice="make it writable by the proxy's user"
        if not_writable
        else "mount a volume at the certificate store",
    )


def _clock(now: datetime) -> Check:
    if now < BUILT:
        return Check(
            name="clock",
            verdict="fail",
            detail=f"it is {now:%Y-%m-%d}, surely wrong",
            advice="set the time (enable NTP: timedatectl set-ntp true)",
        )
    return Check(
        name="clock",
        verdict="ok",
        detail=f"{now:%Y-%m-%d %H:%M:%SZ} (compared with the ACME server's below, if any)",
    )


# -- DNS ----------------------------------------------------------------------------------


def system_resolver(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return []
    return sorted({str(info[4][0]) for info in infos})


def is_local_address(address: str) -> bool:
    """Whether `address` belongs to this machine: only then can a socket be bound to it."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _host(host: str, acme: bool, resolve: Resolver) -> Check:
    name = f"DNS {host}"
    addresses = resolve(host)
    if not addresses:
        return Check(
            name=name,
            verdict="fail",
            detail="does not resolve (no A or AAAA record)",
            advice=f"add an A and/or AAAA record for {host} pointing here",
        )
    elsewhere = [a for a in addresses if not is_local_address(a)]
    if not elsewhere:
        return Check(name=name, verdict="ok", detail=f"{', '.join(addresses)}: this machine")
    return Check(
        name=name,
        verdict="fail" if acme else "warn",
        detail=f"{', '.join(elsewhere)} is not an address of this machine",
        advice="fix the record; behind NAT or a load balancer, make sure ports 80 and 443 "
        "reach this machine" + (" (the CA validates there)" if acme else ""),
    )


# -- ACME -------------------------------------------------------------------------------


def _acme(config: Config, directory: str) -> Iterator[Check]:
    name = f"ACME {directory}"
    context = ssl.create_default_context(
        cafile=str(config.acme.ca_bundle) if config.acme.ca_bundle else None
    )
    try:
        with urllib.request.urlopen(directory, timeout=HTTP_TIMEOUT, context=context) as reply:
            data = json.loads(reply.read())
            date = reply.headers.get("Date")
    except (OSError, ValueError) as exc:  # URLError is an OSError
        yield Check(
            name=name,
            verdict="fail",
            detail=f"unreachable: {exc}",
            advice="check the URL, the network, and acme.ca_bundle for a private CA",
        )
        return
    if not isinstance(data, dict) or "newAccount" not in data:
        yield Check(
            name=name,
            verdict="fail",
            detail="not an ACME directory (no newAccount)",
            advice="acme.directory must be the CA's directory URL",
        )
        return
    yield Check(name=name, verdict="ok", detail="reachable")
    if date:
        skew = (datetime.now(UTC) - parsedate_to_datetime(date)).total_seconds()
        verdict: Verdict = "fail" if abs(skew) > MAX_CLOCK_SKEW else "ok"
        yield Check(
            name="clock vs ACME server",
            verdict=verdict,
            detail=f"{skew:+.0f} s",
            advice="set the time (enable NTP)" if verdict == "fail" else None,
        )
    account = account_path(config.certs.dir, _directory_dirname(directory))
    try:
        uri = json.loads(account.read_bytes()).get("uri")
    except (OSError, ValueError, AttributeError):
        uri = None
    if uri:
        yield Check(name=f"ACME account at {directory}", verdict="ok", detail=str(uri))
    else:
        yield Check(
            name=f"ACME account at {directory}",
            verdict="warn",
            detail="none yet: registered at the first start",
            advice="check that the CA's terms and acme.email are what you want",
        )


# -- certificates -------------------------------------------------------------------------


def _certificates(config: Config) -> Iterator[Check]:
    now = datetime.now(UTC)
    for report in certificate_reports(config):
        name = f"certificate {', '.join(report.names)}"
        days = report.days_left(now)
        error = f"; last error: {report.last_error}" if report.last_error else ""
        if days is None:
            yield Check(
                name=name,
                verdict="fail" if report.last_error else "warn",
                detail=f"{report.missing}{error}",
                advice="issued when the proxy starts"
                if not error
                else "fix the error above; the proxy retries on its own",
            )
        elif days <= 0:
            yield Check(
                name=name,
                verdict="fail",
                detail=f"expired{error}",
                advice="start the proxy to renew it, and see the error",
            )
        else:
            renews = report.renewal_plan or (
                f"renews {report.next_renewal:%Y-%m-%d %H:%MZ}" if report.next_renewal else "-"
            )
            yield Check(
                name=name,
                verdict="warn" if error else "ok",
                detail=f"{days:.1f} days left, {renews}{error}",
            )
