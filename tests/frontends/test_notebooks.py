"""The notebooks run top to bottom in a real Jupyter kernel, and say the right things.

Each notebook boots its own lab guests (under names carrying a prefix this
test chooses, so that whatever a failed run leaves behind is shut down here)
and stops them in its last cell. The checks read the executed notebook's
outputs by cell tag.

The committed notebooks carry their outputs; every run checks that they
still have the shape a fresh run gives (see `notebook_shape`). With
VMISHELL_NB_WRITE=1 a run writes its notebook back instead (refreshing them).
"""

from __future__ import annotations

import ast
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from notebook_shape import differences, write

from vmishell.errors import VmiError
from vmishell.lab.workload import MARKER

pytestmark = pytest.mark.lab

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WIDGET = "application/vnd.jupyter.widget-view+json"
#: Notebooks committed with outputs, checked against every run. page-tables.ipynb boots
#: three guests at once and has not been refreshed yet (VMISHELL_NB_WRITE=1, see above).
WITH_OUTPUTS = {"tour", "monitoring", "page-tables", "hunting"}


def _running(prefix: str) -> list[str]:
    from vmishell.lab.runner import list_guests

    return [st.name for st in list_guests() if st.name.startswith(prefix)]


@pytest.fixture
def run_notebook(monkeypatch, lab_unavailable) -> Iterator:
    """Execute notebooks/NAME.ipynb; afterwards no guest of its prefix may remain."""
    import shutil

    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from vmishell.lab.runner import down

    prefix = f"t-{os.getpid()}-nb"
    monkeypatch.setenv("VMISHELL_NB_PREFIX", prefix)
    if shutil.which("qemu-system-x86_64") is None:
        lab_unavailable("qemu-system-x86_64 is not installed")

    def run(name: str):
        path = NOTEBOOKS / f"{name}.ipynb"
        committed = nbformat.read(path, as_version=4)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            if "failed to boot" in str(exc) or "MissingToolError" in str(exc):
                lab_unavailable(f"{name}.ipynb could not boot its guests: {exc}")
            raise
        if os.environ.get("VMISHELL_NB_WRITE") == "1":
            write(nb, path)
        elif name in WITH_OUTPUTS:
            problems = differences(committed, nb)
            assert not problems, (
                f"notebooks/{name}.ipynb is out of date with the code; refresh it with "
                "VMISHELL_NB_WRITE=1 python3 -m pytest tests/frontends/test_notebooks.py:\n"
                + "\n".join(problems)
            )
        return nb

    yield run
    left = _running(prefix)
    for name in left:
        with contextlib.suppress(VmiError):
            down(name)
    assert not left, f"the notebook left guests running: {left}"


def outputs(nb, tag: str) -> list[dict]:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"no single cell tagged {tag!r}"
    return cells[0]["outputs"]


def text(outs: list[dict], mime: str = "text/plain") -> str:
    return "\n".join(
        "".join(o.get("data", {}).get(mime, "")) if "data" in o else o.get("text", "") for o in outs
    )


def all_mimes(nb) -> set[str]:
    return {
        m for c in nb.cells if c.cell_type == "code" for o in c.outputs for m in o.get("data", {})
    }


def test_tour(run_notebook) -> None:
    nb = run_notebook("tour")
    assert repr(MARKER.decode()) in text(outputs(nb, "marker-string"))
    walk = outputs(nb, "walk")
    assert "4 levels" in text(walk, "text/html") and "PML4" in text(walk)
    assert "'vmi-marker'" in text(outputs(nb, "task"))
    hexview = [
        o for c in nb.cells for o in c.get("outputs", [])
        if "vmishell-hex" in "".join(o.get("data", {}).get("text/html", ""))
    ]  # fmt: skip
    assert hexview and "VMISHELL-MARKER-" in "".join(hexview[0]["data"]["text/html"])
    assert WIDGET in all_mimes(nb)  # the live watch view


def test_page_tables(run_notebook) -> None:
    nb = run_notebook("page-tables")
    levels = ast.literal_eval(text(outputs(nb, "levels")))
    assert levels == {"x86_64": 4, "x86_64-la57": 5, "i386-pae": 3}
    for n in (4, 5, 3):
        assert f"{n} levels" in text(outputs(nb, f"walk-{n}"), "text/html")
    assert "PML5" in text(outputs(nb, "walk-5")) and "PML5" not in text(outputs(nb, "walk-4"))
    # arm64: the granule decides the levels; no register tells vmishell where the tables are.
    assert ast.literal_eval(text(outputs(nb, "arm64-levels"))) == {"aarch64": 4, "aarch64-16k": 4}
    four_k, sixteen_k = outputs(nb, "walk-arm64-4k"), outputs(nb, "walk-arm64-16k")
    assert "TTBR0: 4 KiB granule, 48-bit VA" in text(four_k, "text/html")
    assert "TTBR0: 16 KiB granule, 52-bit VA" in text(sixteen_k, "text/html")
    assert "AP_EL0" in text(four_k) and "0x4000-byte page" in text(sixteen_k)
    kernel = text(outputs(nb, "walk-arm64-kernel"))
    assert "TTBR1" in kernel and "UXN" in kernel and "AP_EL0" not in kernel


def test_monitoring(run_notebook) -> None:
    nb = run_notebook("monitoring")
    assert int(text(outputs(nb, "history-count"))) >= 2
    assert WIDGET in all_mimes(nb)


def test_hunting(run_notebook) -> None:
    """Search, YARA, watch, snapshot and diff, on a guest the notebook boots and stops."""
    nb = run_notebook("hunting")
    assert "vmi-marker" in text(outputs(nb, "search")) and "0x600000" in text(outputs(nb, "search"))
    assert "Marker:$m" in text(outputs(nb, "yara"))
    assert "'task_struct.comm': 'vmi-hunt'" in text(outputs(nb, "watch"))
    diff = text(outputs(nb, "diff"))
    assert "writable and executable" in diff and "appeared" in diff and "uid" in diff
