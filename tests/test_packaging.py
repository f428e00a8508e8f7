"""What an operator installs: a wheel and an sdist that give a working `port443` in a fresh
virtualenv, the version from one place, and the systemd unit of contrib/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import proxy
from proxy.cli import main
from tests.support.run import ROOT

UNIT = ROOT / "contrib" / "port443.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_version_comes_from_one_place(capsys: pytest.CaptureFixture[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "proxy.__version__"}
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"port443 {proxy.__version__}\n"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (Debian: systemd)")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for setting in (
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "DynamicUser=yes",
        "StateDirectory=port443",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert re.search(f"^{re.escape(setting)}$", text, re.MULTILINE), setting
    # verify checks that ExecStart exists: point it at the port443 this test runs.
    port443 = Path(sys.executable).parent / "port443"
    assert port443.exists()
    unit = tmp_path / "port443.service"
    unit.write_text(text.replace("/usr/local/bin/port443", str(port443)))
    broken = tmp_path / "broken" / "port443.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    assert SYSTEMD_ANALYZE is not None
    for path, clean in ((unit, True), (broken, False)):
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # A bad value is only a warning (exit 0): the unit is clean when nothing is said.
        assert (result.returncode == 0 and not result.stderr.strip()) is clean, result.stderr


@pytest.mark.slow
def test_wheel_and_sdist_install_into_a_fresh_venv(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building leaves egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    version = proxy.__version__
    wheel = dist / f"port443-{version}-py3-none-any.whl"
    sdist = dist / f"port443-{version}.tar.gz"
    template = "proxy/handlers/templates/status.html"
    assert template in zipfile.ZipFile(wheel).namelist()
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert f"port443-{version}/{template}" in names
    assert f"port443-{version}/pyproject.toml" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The wheel brings the dependencies; the sdist then replaces the package alone (built
    # from source), so the dependencies are not downloaded and installed twice.
    for package, options in ((wheel, []), (sdist, ["--force-reinstall", "--no-deps"])):
        subprocess.run(
            [venv / "bin" / "pip", "install", "-q", *options, str(package)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        out = subprocess.run(
            [venv / "bin" / "port443", "--version"], check=True, capture_output=True, text=True
        )
        assert out.stdout == f"port443 {version}\n"
        config = tmp_path / "port443.toml"
        config.write_text('[[sites]]\nhosts = ["a.test"]\nupstreams = ["http://127.0.0.1:1"]\n')
        check = subprocess.run(
            [venv / "bin" / "port443", "check", "-c", str(config)],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # not the checkout: the installed package runs
        )
        assert check.returncode == 0, check.stderr
        page = subprocess.run(
            [venv / "bin" / "python", "-c", "import proxy.handlers.status_page as p; "
             "print(p.__file__, len(p.TEMPLATE.template))"],
            check=True, capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert str(venv) in page.stdout
