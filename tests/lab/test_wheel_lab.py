"""What users install is a wheel: build one, install it into a fresh virtual environment, use it.

An editable checkout hides packaging mistakes (the top-level `profiles/`
folder is simply there), so these tests build a wheel from the files a build
reads, install it with `--no-deps` into a new virtual environment that sees
this interpreter's dependencies (`--system-site-packages`: nothing is
downloaded), and run the installed `vmishell` from outside the repository,
with a home directory of its own so that only the wheel's files can answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmishell.session import Session
from vmishell.symbols.finder import candidate_profiles

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
#: What a build reads; nothing else of the checkout (no build/ left over) goes in.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "vmishell", "profiles", "jupyter-config")
SHIPPED = sorted(p.name for p in (REPO / "profiles").iterdir() if p.name.endswith(".json.xz"))


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    home: Path
    elsewhere: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user who installed the wheel: no PYTHONPATH, own home."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VMISHELL_PROFILE_PATH", "XDG_CACHE_HOME")
        }
        env.update(HOME=str(self.home), **extra)
        return env

    def run(self, *argv: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=self.elsewhere,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=300,
        )


def _run(*argv: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if not (REPO / name).exists():
            continue
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    build = ("--no-deps", "--no-build-isolation", "--no-index")
    _run(*pip, "wheel", *build, "-w", work, src, cwd=work)
    (wheel,) = work.glob("vmishell-*.whl")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=work)
    # This interpreter's pip installs into the interpreter that runs it: the venv's.
    _run(
        venv / "bin" / "python",
        *pip[1:],
        "install",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        wheel,
        cwd=work,
    )
    (work / "home").mkdir()
    (work / "elsewhere").mkdir()
    return Installed(wheel, venv, work / "home", work / "elsewhere")


def test_the_wheel_carries_every_shipped_profile(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert SHIPPED, "the repository ships no profiles?"
    for profile in SHIPPED:
        assert f"vmishell/profiles/{profile}" in names
    assert "vmishell/profiles/README.md" in names
    assert not any(n.startswith(("profiles/", "tests/")) for n in names)


def test_the_installed_vmishell_is_the_wheels(installed: Installed) -> None:
    done = installed.run(installed.python, "-c", "import vmishell; print(vmishell.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(installed.venv), done.stdout


def test_the_installed_vmishell_finds_its_shipped_profiles(installed: Installed) -> None:
    script = (
        "import json; from vmishell.symbols.finder import candidate_profiles; "
        "print(json.dumps([str(p) for p in candidate_profiles()]))"
    )
    done = installed.run(installed.python, "-c", script)
    assert done.returncode == 0, done.stderr
    found = [Path(p) for p in json.loads(done.stdout)]
    assert sorted(p.name for p in found) == SHIPPED
    assert all(p.is_relative_to(installed.venv) for p in found), found


def test_the_wheel_makes_saving_widget_state_jupyterlabs_default(installed: Installed) -> None:
    """In etc/jupyter/labconfig, which jupyterlab_server reads; no share/jupyter/lab folder,
    which a JupyterLab from outside the venv would take for its app dir (and lose its assets)."""
    default = installed.venv / "etc/jupyter/labconfig/default_setting_overrides.d/vmishell.json"
    assert json.loads(default.read_text()) == {
        "@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": True}
    }
    assert not (installed.venv / "share" / "jupyter" / "lab").exists()


def test_vmishell_ps_from_the_wheel_lists_a_lab_guests_processes(
    installed: Installed, x86_64_guest
) -> None:
    truth = x86_64_guest.truth()
    target = f"qemu:{x86_64_guest.ram_path},{x86_64_guest.qmp_path}"
    with Session.attach(target) as s:
        needed = s.profile.name
    extra = {}
    if f"{needed}.json.xz" not in SHIPPED:
        # Debian moved past the shipped kernel and the lab built this profile: point the
        # installed copy at it (the shipped profiles are checked above either way).
        (built,) = (p for p in candidate_profiles() if p.name.startswith(f"{needed}.json"))
        extra["VMISHELL_PROFILE_PATH"] = str(built.parent)
    vmishell = installed.venv / "bin" / "vmishell"
    done = installed.run(vmishell, "ps", target, "--json", **extra)
    assert done.returncode == 0, done.stderr
    marker = [r for r in json.loads(done.stdout) if r["tgid"] == truth.marker_pid]
    assert [(r["pid"], r["comm"], r["cmdline"]) for r in marker] == [
        (truth.marker_pid, "vmi-marker", "/bin/vmi-marker")
    ]
