"""Startup warnings about the certificate store, the one piece of state worth keeping.

A container that loses `certs/` on every restart re-orders its certificates each time
and soon hits the CA's rate limits (Let's Encrypt: 5 duplicate certificates a week).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def in_container() -> bool:
    """Docker leaves /.dockerenv, podman /run/.containerenv; both set `container` for systemd."""
    return (
        Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
        or bool(os.environ.get("container"))  # noqa: SIM112 (lower-case by convention)
    )


def mount_point(path: Path, mountinfo: str) -> str:
    """The mount point holding `path`, from /proc/self/mountinfo (field 5)."""
    target = str(path.resolve())
    best = "/"
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best = point
    return best


def _writable(directory: Path) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        return str(exc)
    return None


def certificate_store_warnings(directory: Path, *, container: bool, mountinfo: str) -> list[str]:
    problem = _writable(directory)
    if problem is not None:
        return [
            f"certificate store {directory} is not writable ({problem}): certificates cannot "
            "be saved and will be issued again on every start"
        ]
    if container and mount_point(directory, mountinfo) == "/":
        return [
            f"certificate store {directory} is inside the container's own filesystem, not a "
            "mounted volume: certificates are lost when the container is replaced, and "
            "re-ordering them on every start runs into the CA's rate limits. Mount a volume there."
        ]
    return []


def check_certificate_store(directory: Path) -> list[str]:
    try:
        mountinfo = MOUNTINFO.read_text()
    except OSError:
        mountinfo = ""
    return certificate_store_warnings(directory, container=in_container(), mountinfo=mountinfo)
