"""The certificate-store warnings, against a real directory and real mountinfo lines."""

from __future__ import annotations

from pathlib import Path

from proxy.storage_check import certificate_store_warnings, mount_point

MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw
30 22 254:1 /volumes/certs /var/lib/port443/certs rw,relatime - ext4 /dev/vda1 rw
31 22 254:1 /volumes/with\\040space /srv/with\\040space rw - ext4 /dev/vda1 rw
"""


def test_mount_point_picks_the_longest_prefix() -> None:
    assert mount_point(Path("/var/lib/port443/certs/site"), MOUNTINFO) == "/var/lib/port443/certs"
    assert mount_point(Path("/var/lib/port443/certs"), MOUNTINFO) == "/var/lib/port443/certs"
    assert mount_point(Path("/var/lib/port443/certs2"), MOUNTINFO) == "/"
    assert mount_point(Path("/srv/with space/x"), MOUNTINFO) == "/srv/with space"


def test_container_without_volume_is_warned(tmp_path: Path) -> None:
    store = tmp_path / "certs"
    assert certificate_store_warnings(store, container=False, mountinfo="") == []
    warnings = certificate_store_warnings(store, container=True, mountinfo=MOUNTINFO)
    assert len(warnings) == 1 and "not a mounted volume" in warnings[0]
    mounted = MOUNTINFO + f"40 22 254:1 /x {tmp_path} rw - ext4 /dev/vda1 rw\n"
    assert certificate_store_warnings(store, container=True, mountinfo=mounted) == []


def test_unwritable_store_is_warned(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    warnings = certificate_store_warnings(blocker / "certs", container=False, mountinfo="")
    assert len(warnings) == 1 and "is not writable" in warnings[0]
