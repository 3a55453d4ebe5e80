"""Under CI=true a lab test whose subject is missing fails; it does not skip.

A lab test may skip only through tests/conftest.py's `lab_unavailable`
(a skip on a developer's machine, a failure under CI=true). These cases run
one lab test in a child pytest under CI=true with one of vmishell's own
modules made unimportable (None in sys.modules), and check that the child
reports a failure or an error, never a skip or a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]

CASES = [
    # It skipped "not there yet" when vmishell.interop.volatility did not import.
    (
        "tests/frontends/test_magics_lab.py::test_vol_runs_a_volatility_plugin",
        "vmishell.interop.volatility",
    ),
    # It used importorskip on vmishell.frontends.frames.
    (
        "tests/lab/test_tampering_lab.py::test_html_and_terminal_escapes_in_names_are_rendered_inert",
        "vmishell.frontends.frames",
    ),
]


@pytest.mark.parametrize(("test", "module"), CASES, ids=[c[1] for c in CASES])
def test_a_lab_test_fails_under_ci_when_a_vmishell_module_is_missing(
    x86_64_guest, test: str, module: str
) -> None:
    child = (
        "import sys; sys.modules[sys.argv[1]] = None; import pytest; "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[2]]))"
    )
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(REPO)}
    for key in [k for k in env if k.startswith("PYTEST_XDIST")]:
        del env[key]  # the child is a plain run, not one of this run's workers
    done = subprocess.run(
        [sys.executable, "-c", child, module, test],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    # 0 would be a pass or a skip; a failed test exits 1, a module that cannot be imported
    # 2 or 4 (pytest's collection error, or "not found" for the node id it did not collect).
    assert done.returncode != 0, f"{test} with {module} missing: {summary}"
    assert "failed" in summary or "error" in summary, summary
    assert "skipped" not in summary, summary
