"""The front door: `from vmishell import Session`, and an `import vmishell` that stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vmishell
from vmishell.errors import VmiError
from vmishell.limits import Limits
from vmishell.session import Process, Session

REPO = Path(__file__).resolve().parents[2]


def _fresh(code: str) -> dict:
    """Run `code` in a new interpreter on this checkout; it prints one JSON value."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_plain_api_is_importable_from_the_package() -> None:
    from vmishell import Limits as L
    from vmishell import Process as P
    from vmishell import Session as S
    from vmishell import VmiError as E

    assert (Session, Process, Limits, VmiError) == (S, P, L, E)
    assert {"Session", "Process", "Limits", "VmiError"} <= set(dir(vmishell))
    assert {"Session", "Process", "Limits", "VmiError"} <= set(vmishell.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Sesion'"):
        vmishell.Sesion  # noqa: B018
    with pytest.raises(ImportError):
        from vmishell import Sesion  # noqa: F401


def test_import_vmishell_loads_neither_the_session_nor_pandas() -> None:
    loaded = _fresh(
        "import sys, json, vmishell; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('vmishell', 'pandas')))))"
    )
    assert loaded == ["vmishell"]


def test_the_session_is_imported_on_first_use_only() -> None:
    seen = _fresh(
        "import sys, json, vmishell; before = 'vmishell.session' in sys.modules; "
        "from vmishell import Session; "
        "print(json.dumps([before, 'vmishell.session' in sys.modules, Session.__module__]))"
    )
    assert seen == [False, True, "vmishell.session"]


def test_the_session_reads_no_package_metadata_and_imports_no_numpy() -> None:
    """Attach-time imports: importlib.metadata (email, calendar, ...) and numpy/pandas wait
    until something needs them."""
    loaded = _fresh(
        "import sys, json, vmishell.session; "
        "print(json.dumps([m for m in ('importlib.metadata', 'numpy', 'pandas') "
        "if m in sys.modules]))"
    )
    assert loaded == []


def test_vmishell_s_own_schemes_are_those_pyproject_declares() -> None:
    import tomllib

    from vmishell import schemes

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][schemes.GROUP] == schemes._OWN
    assert "lab" in schemes.known()
    assert schemes.opener("lab").__module__ == "vmishell.lab.target"
