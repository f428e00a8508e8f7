"""The certificate store on a real file system, including crashes at every step of a write."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from proxy.certs.local_ca import LocalCA
from proxy.certs.store import CertStore, atomic_write

Pair = tuple[bytes, bytes]


class Crash(BaseException):
    """Stands in for the process dying: nothing after it runs, not even except clauses."""


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def store(tmp_path: Path) -> CertStore:
    return CertStore(tmp_path / "certs")


def serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(pair[0]).serial_number


def new_files(store: CertStore, name: str) -> list[str]:
    return sorted(p.name for p in store.path(name).iterdir() if p.name.endswith(".new"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip(store: CertStore, local_ca: LocalCA) -> None:
    pair = local_ca.issue(["a.test", "www.a.test", "127.0.0.1"])
    store.write("a.test", *pair, {"issuer": "local", "hosts": ["a.test"]})
    cert = store.load("a.test")
    assert cert is not None
    assert cert.name == "a.test"
    assert cert.chain_path == store.root / "a.test" / "fullchain.pem"
    assert cert.chain_path.read_bytes() == pair[0]
    assert cert.key_path.read_bytes() == pair[1]
    assert cert.names == ("a.test", "www.a.test", "127.0.0.1")
    assert cert.serial == serial(pair)
    assert cert.not_before.utcoffset() is not None
    assert cert.not_after > cert.not_before
    assert cert.meta == {"issuer": "local", "hosts": ["a.test"]}
    assert mode(cert.key_path) == 0o600
    assert mode(cert.chain_path) == 0o644
    assert new_files(store, "a.test") == []


def test_absent(store: CertStore) -> None:
    assert store.load("missing.test") is None
    store.path("empty.test").mkdir(parents=True)
    assert store.load("empty.test") is None


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_names_cannot_escape_the_root(store: CertStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.path(name)


def test_mismatched_pair_is_absent(
    store: CertStore, local_ca: LocalCA, caplog: pytest.LogCaptureFixture
) -> None:
    chain, _ = local_ca.issue(["a.test"])
    _, other_key = local_ca.issue(["a.test"])
    store.write("a.test", chain, other_key, {})
    with caplog.at_level(logging.WARNING):
        assert store.load("a.test") is None
    assert "does not belong" in caplog.text


@pytest.mark.parametrize(
    "damage",
    [
        ("fullchain.pem", b"garbage"),
        ("privkey.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
        ("meta.json", b"[1, 2]"),
        ("meta.json", b"{not json"),
    ],
)
def test_bad_content_is_absent(
    store: CertStore, local_ca: LocalCA, caplog: pytest.LogCaptureFixture, damage: tuple[str, bytes]
) -> None:
    store.write("a.test", *local_ca.issue(["a.test"]), {})
    (store.path("a.test") / damage[0]).write_bytes(damage[1])
    with caplog.at_level(logging.WARNING):
        assert store.load("a.test") is None
    assert "ignoring stored certificate a.test" in caplog.text


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> Callable[[], int]:
    """Make the `step`-th durable file-system operation (fsync or rename) crash.

    Returns a counter of the operations done so far, to learn how many a write takes.
    """
    done = 0

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any) -> Any:
            nonlocal done
            if done == step:
                raise Crash
            done += 1
            return real(*args)

        return operation

    monkeypatch.setattr(os, "fsync", wrap(os.fsync))
    monkeypatch.setattr(os, "replace", wrap(os.replace))
    return lambda: done


def stage_pending_commit(store: CertStore, pair: Pair) -> None:
    """What a crash right after committing `pair` leaves: all of its files still *.new."""
    directory = store.path("a.test")
    (directory / "fullchain.pem.new").write_bytes(pair[0])
    (directory / "privkey.pem.new").write_bytes(pair[1])
    (directory / "meta.json.new").write_bytes(b'{"pair": "pending"}')


@pytest.mark.parametrize("pending", [False, True], ids=["clean", "after-earlier-crash"])
def test_crash_at_every_step_leaves_old_or_new_pair(
    tmp_path: Path, local_ca: LocalCA, monkeypatch: pytest.MonkeyPatch, pending: bool
) -> None:
    old, earlier, new = (local_ca.issue(["a.test"]) for _ in range(3))
    before = earlier if pending else old

    def prepare(store: CertStore) -> None:
        store.write("a.test", *old, {"pair": "old"})
        if pending:  # a write must not pair its own files with an unfinished commit's
            stage_pending_commit(store, earlier)

    with monkeypatch.context() as patch:
        probe = CertStore(tmp_path / "probe")
        prepare(probe)
        counter = crash_at(patch, -1)
        probe.write("a.test", *new, {"pair": "new"})
        steps = counter()

    outcomes = []
    for step in range(steps):
        store = CertStore(tmp_path / f"crash{step}")
        prepare(store)
        with monkeypatch.context() as patch, pytest.raises(Crash):
            crash_at(patch, step)
            store.write("a.test", *new, {"pair": "new"})
        cert = store.load("a.test")
        assert cert is not None, f"crash at step {step} lost the certificate"
        assert cert.serial in (serial(before), serial(new)), f"crash at step {step}"
        is_new = cert.serial == serial(new)
        assert cert.meta == {"pair": "new" if is_new else ("pending" if pending else "old")}
        assert new_files(store, "a.test") == []
        outcomes.append(is_new)
    # Early crashes roll back, late ones roll forward; once forward, always forward.
    assert outcomes[0] is False and outcomes[-1] is True
    assert outcomes == sorted(outcomes)


def test_torn_commit_record_rolls_back(store: CertStore, local_ca: LocalCA) -> None:
    old, new = local_ca.issue(["a.test"]), local_ca.issue(["a.test"])
    store.write("a.test", *old, {})
    stage_pending_commit(store, new)
    (store.path("a.test") / "meta.json.new").write_bytes(b'{"pair": "pe')  # power loss
    cert = store.load("a.test")
    assert cert is not None and cert.serial == serial(old)
    assert new_files(store, "a.test") == []


def test_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "account.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    atomic_write(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["account.key"]
    atomic_write(tmp_path / "token", b"x")
    assert mode(tmp_path / "token") == 0o644


def test_atomic_write_failure_leaves_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "challenge"
    target.write_bytes(b"old")
    with monkeypatch.context() as patch, pytest.raises(Crash):
        crash_at(patch, 0)
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["challenge"]
