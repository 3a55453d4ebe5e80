"""The committed notebooks carry outputs, and the shape check notices when they drift.

The lab run (test_notebooks.py) re-executes them and compares shapes; these
checks need no guest.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
from notebook_shape import differences, shape

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WITH_OUTPUTS = ["tour", "monitoring", "page-tables", "hunting"]
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("name", WITH_OUTPUTS)
def test_a_committed_notebook_carries_the_outputs_of_a_clean_run(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outs, f"{name}.ipynb has no outputs: run it (see notebook_shape)"
    assert not [o for o in outs if o["output_type"] == "error"]
    for o in outs:
        if WIDGET in o.get("data", {}):  # every widget output also shows without a kernel
            assert "text/html" in o["data"] and "vmishell-snapshot" in o["data"]["text/html"]
    for cell in nb.cells:
        assert "execution" not in cell.metadata, "no timings committed"


def test_the_shape_check_sees_a_cell_that_now_shows_something_else() -> None:
    nb = nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4)
    assert differences(nb, copy.deepcopy(nb)) == []
    changed = copy.deepcopy(nb)
    cell = next(c for c in changed.cells if c.cell_type == "code" and c.outputs)
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="boom")]
    (problem,) = differences(nb, changed)
    assert "committed" in problem and "stderr" in problem
    assert shape(nb) != shape(changed)
