"""A real IPython shell with `%load_ext vmishell`, shared by the front-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class CellResult:
    """What a cell did: its IPython result and everything it wrote."""

    success: bool
    value: object
    error: BaseException | None
    output: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def ip() -> Iterator[object]:
    """The process's InteractiveShell with the extension loaded (unloaded at the end)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("colors", "nocolor")  # tracebacks as plain text
    shell.run_line_magic("load_ext", "vmishell")
    yield shell
    shell.run_line_magic("unload_ext", "vmishell")


@pytest.fixture
def cell(ip, capsys):
    """Run one cell in the shell: `cell("%ps")` -> CellResult."""

    def run(code: str) -> CellResult:
        capsys.readouterr()
        result = ip.run_cell(code, store_history=True)
        captured = capsys.readouterr()
        error = result.error_in_exec or result.error_before_exec
        return CellResult(result.success, result.result, error, captured.out + captured.err)

    return run


@pytest.fixture(scope="session")
def lab_unavailable():
    """Skip a test whose own lab guest cannot boot, or fail it under CI=true (as tests/conftest)."""
    import os

    def unavailable(reason: str) -> None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lab guest unavailable under CI: {reason}", pytrace=False)
        pytest.skip(f"lab guest unavailable: {reason}")

    return unavailable
