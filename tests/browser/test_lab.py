"""The notebooks as users meet them: JupyterLab in Chromium, cells run from the page.

- The tour runs against its own lab guest; its widgets (%ps --table,
  %peek --browse, %watch) render as widgets, %watch counts changes, and the
  console has no comm errors.
- A widget notebook (synthetic guest bytes, no QEMU) shows the live widgets:
  a table of thousands of rows pages, the watch updates while we look, Stop
  stops it, and guest strings are text, not markup.
- The user's own notebook, saved from the page (Ctrl+S), its kernel shut
  down, reopened: every widget shows its last state from the widget state
  JupyterLab saved with it (vmishell's environment turns saving it on).
- The same notebook in a JupyterLab without the widget front end shows every
  widget's snapshot and the hint saying how to fix the set-up, never a repr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import urllib.request
from typing import Any

import nbformat
import pytest
from labserver import REPO, start_lab, stop_lab

from vmishell.errors import VmiError

pytestmark = pytest.mark.lab  # the tour boots its own guest (and JupyterLab uses every CPU)

COMM_ERRORS = ("Exception opening new comm", "Error displaying widget", "Could not create a model")

WIDGET_NOTEBOOK = [
    "import pandas as pd\n"
    "from vmishell.frontends.watch import Watcher\n"
    "from vmishell.frontends.widgets import HexViewer, ProcessTable, WatchView\n"
    "\n"
    "class Guest:  # guest memory built in bytes: a counter the 'guest' bumps on every read\n"
    "    pid = 0\n"
    "    def __init__(self):\n"
    "        self.buf = bytearray(b'<b>guest</b>' + bytes(500))\n"
    "    def read(self, vaddr, size):\n"
    "        return bytes(self.buf[vaddr - 0x1000 :][:size])\n"
    "    def tick(self):\n"
    "        self.buf[0] = (self.buf[0] + 1) % 256\n"
    "\n"
    "guest = Guest()",
    "comm = ['<b>evil</b>'] + ['init'] * 2999\n"
    "ProcessTable(pd.DataFrame({'pid': range(1, 3001), 'comm': comm}))",
    "HexViewer(guest, 0x1000, page=64)",
    "w = Watcher(guest, 0x1000, 8, every=0.2, refresh=guest.tick)\n"
    "display(WatchView(w))\n"
    "w.start();",
]

RUN_ALL = """async () => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    await app.commands.execute('notebook:run-all-cells');
}"""

STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const kernel = panel.sessionContext.session?.kernel;
    const cells = panel.content.widgets.filter(c => c.model.type === 'code');
    return {
        status: kernel ? kernel.status : 'none',
        pending: cells.filter(c => c.model.executionCount === null
            || c.promptNode?.textContent.includes('*')).length,
        errors: cells.flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue),
    };
}"""


SAVE = """async () => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    await app.commands.execute('docmanager:save');  // what Ctrl+S runs
    return panel.context.model.dirty;
}"""

SHUT_DOWN_KERNEL = """async () => {
    const session = window.jupyterapp.shell.currentWidget.sessionContext;
    const id = session.session?.kernel?.id;
    await session.shutdown();
    return id;
}"""

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _notebook(cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _tour() -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "notebooks" / "tour.ipynb", as_version=4)
    for cell in nb.cells:  # the committed outputs must not answer for this run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    return nb


def open_and_run(page: Any, lab: Any, name: str, nb: Any, timeout: float) -> None:
    """Write `nb` into the lab's folder, open it, run all cells, wait until every cell ran."""
    nbformat.write(nb, lab.root / name)
    page.goto(lab.notebook_url(name))
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext",
                           timeout=60_000)  # fmt: skip
    page.evaluate(RUN_ALL)
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = page.evaluate(STATE)
        assert not state["errors"], f"{name}: a cell failed: {state['errors']}"
        if state["pending"] == 0 and state["status"] == "idle":
            return
        time.sleep(0.25)
    raise AssertionError(f"{name}: cells still running after {timeout} s: {state}")


def _reads(text: str) -> int:
    match = re.search(r"(\d+) reads", text)
    assert match, text
    return int(match.group(1))


# -- with the widget front end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Any:
    prefix = f"t-{os.getpid()}-br"
    lab = start_lab(tmp_path_factory.mktemp("lab"), env={"VMISHELL_NB_PREFIX": prefix})
    yield lab
    stop_lab(lab)
    from vmishell.lab.runner import down, list_guests

    left = [st.name for st in list_guests() if st.name.startswith(prefix)]
    for name in left:
        with contextlib.suppress(VmiError):
            down(name)
    assert not left, f"the tour left guests running: {left}"


def test_widgets_render_page_and_update_in_jupyterlab(lab, page) -> None:
    page, console = page
    open_and_run(page, lab, "widgets.ipynb", _notebook(WIDGET_NOTEBOOK), timeout=60)
    outputs = page.locator(".jp-OutputArea-output")
    # The process table: a real dropdown and pager, one page of 50 rows of 3000.
    page.wait_for_selector(".widget-dropdown select", timeout=20_000)
    assert page.get_by_text("rows 1–50 of 3000, page 1 of 60").is_visible()
    table = page.locator(".widget-html table.vmishell").first  # (the watch history is another)
    assert table.locator("tbody tr").count() == 50
    page.get_by_role("button", name="next ▶").first.click()
    page.get_by_text("rows 51–100 of 3000, page 2 of 60").wait_for(timeout=10_000)
    assert page.locator(".widget-html td b").count() == 0, "guest markup stays text"
    # The hex viewer.
    assert page.locator(".widget-html pre.vmishell-hex").count() >= 2  # viewer and watch
    # The watch updates while we look, and Stop stops it.
    status = page.locator(".widget-html", has_text="bytes at 0x1000").first
    first = _reads(status.inner_text())
    page.wait_for_function(
        "([n]) => [...document.querySelectorAll('.widget-html')].some(e => "
        "(m = e.textContent.match(/(\\d+) reads/)) && +m[1] > n)",
        arg=[first + 3],
        timeout=20_000,
    )
    assert page.locator(".widget-html span.changed").count() > 0, "changes are lit"
    page.get_by_role("button", name="Stop").click()
    page.get_by_role("button", name="Stopped").wait_for(timeout=10_000)
    # The live widgets, not the snapshots, and no comm trouble.
    assert outputs.locator(".vmishell-snapshot").count() == 0
    assert not console.errors(*COMM_ERRORS), console.messages


def test_the_tour_runs_in_jupyterlab_with_its_widgets(lab, page) -> None:
    page, console = page
    open_and_run(page, lab, "tour.ipynb", _tour(), timeout=240)
    assert page.locator(".widget-dropdown select").count() >= 1, "%ps --table"
    assert page.get_by_role("button", name="go").count() >= 1, "%peek --browse"
    assert page.get_by_role("button", name="Stopped").count() == 1, "%watch, stopped by w.stop()"
    watch = page.locator(".widget-html", has_text="stopped (stop() called)").first
    changes = int(re.search(r"(\d+) changes", watch.inner_text()).group(1))
    assert changes >= 2, "the watched counter changed while the cell slept"
    assert page.locator(".vmishell-walk").count() == 1, "%translate draws its walk"
    assert page.locator(".jp-OutputArea-output .vmishell-snapshot").count() == 0
    assert not console.errors(*COMM_ERRORS), console.messages


def test_a_committed_notebook_reopened_without_its_kernel_shows_every_widget(lab, page) -> None:
    """The tour as committed (outputs and widget state of a CI run), opened without running it."""
    page, console = page
    shutil.copy(REPO / "notebooks" / "tour.ipynb", lab.root / "downloaded.ipynb")
    page.goto(lab.notebook_url("downloaded.ipynb"))  # not trusted: as from GitHub or a mail
    snapshots = page.locator(".jp-OutputArea-output .vmishell-snapshot")
    snapshots.nth(2).wait_for(timeout=30_000)
    assert snapshots.count() == 3, "the table, the hex viewer and the watch"
    watch = snapshots.nth(2).text_content()
    assert "stopped (stop() called)" in watch and "new_int" in watch, "the watch's last history"
    shutil.copy(REPO / "notebooks" / "tour.ipynb", lab.root / "saved.ipynb")
    lab.trust("saved.ipynb")  # trusted, as the user's own saved notebook: widgets from saved state
    page.goto(lab.notebook_url("saved.ipynb"))
    restored = page.locator(".jp-OutputArea-output .widget-html", has_text="stop() called")
    restored.first.wait_for(timeout=30_000)
    assert page.get_by_text("rows 1–").count() >= 1, "the table's page, restored"
    shown = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())
    assert "Error displaying widget" not in shown
    assert not console.errors(*COMM_ERRORS, "model not found"), console.messages


def _kernels_of(lab: Any, name: str) -> list[str]:
    """The ids of the kernels the server runs for notebook `name` (its REST API)."""
    with urllib.request.urlopen(f"{lab.url}api/sessions?token={lab.token}", timeout=10) as r:
        sessions = json.load(r)
    return [s["kernel"]["id"] for s in sessions if s["path"] == name and s.get("kernel")]


def test_a_notebook_saved_in_jupyterlab_reopens_without_its_kernel_with_every_widget(
    lab, page
) -> None:
    """Save from the page, shut the kernel down, reopen: the widgets show their last state.

    JupyterLab keeps widget state in a saved notebook only when its widget
    manager's saveState is on; vmishell's install makes that the default of
    the JupyterLab in its environment (jupyter-config/, installed into
    sys.prefix), which this server reads as a user's would.
    """
    page, console = page
    name = "mine.ipynb"
    open_and_run(page, lab, name, _notebook(WIDGET_NOTEBOOK), timeout=60)
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    table, hexview, watch = (cells.nth(i).locator(".jp-OutputArea-output") for i in (1, 2, 3))
    # A last state that is not the first one: the table on page 2, the watch stopped
    # after it saw changes.
    page.wait_for_selector(".widget-dropdown select", timeout=20_000)
    table.get_by_role("button", name="next ▶").click()
    table.get_by_text("rows 51–100 of 3000, page 2 of 60").wait_for(timeout=10_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-html')].some(e => "
        "(m = e.textContent.match(/(\\d+) changes/)) && +m[1] >= 3)",
        timeout=20_000,
    )
    watch.get_by_role("button", name="Stop").click()
    watch.get_by_role("button", name="Stopped").wait_for(timeout=10_000)
    time.sleep(1)  # the kernel's last redraws (the snapshot) arrive before the save
    before = {
        "table": table.locator("table.vmishell tbody tr").first.inner_text(),
        "hex": hexview.locator("pre.vmishell-hex").inner_text(),
        "watch": watch.locator(".widget-html", has_text="bytes at 0x1000").inner_text(),
        "history": watch.locator("table.vmishell tbody tr").count(),
    }
    assert "stopped (stopped from the widget)" in before["watch"], before
    assert before["history"] >= 3, before

    assert page.evaluate(SAVE) is False, "saved, nothing left unsaved"
    old_kernel = page.evaluate(SHUT_DOWN_KERNEL)
    deadline = time.monotonic() + 20
    while _kernels_of(lab, name) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not _kernels_of(lab, name), "the notebook's kernel is gone"

    page.goto(lab.notebook_url(name))  # a new page: no widget model left in the browser
    outputs = page.locator(".jp-OutputArea-output")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-OutputArea-output')].some(e => "
        "e.textContent.includes('page 2 of 60') || e.textContent.includes('Error displaying'))",
        timeout=30_000,
    )
    shown = "\n".join(outputs.all_text_contents())
    assert "Error displaying widget" not in shown, (
        "the saved widgets did not come back (JupyterLab saved no widget state?); vmishell's "
        "default is jupyter-config/labconfig/default_setting_overrides.d/vmishell.json in "
        f"{sys.prefix}/etc/jupyter (pip install ., or scripts/install)"
    )
    assert old_kernel not in _kernels_of(lab, name), "not the kernel that made the widgets"
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    table, hexview, watch = (cells.nth(i).locator(".jp-OutputArea-output") for i in (1, 2, 3))
    # Every widget: the widget itself (not its snapshot), in its last state.
    assert table.get_by_text("rows 51–100 of 3000, page 2 of 60").is_visible()
    assert table.locator(".widget-dropdown select").count() == 1
    assert table.locator("table.vmishell tbody tr").count() == 50
    assert table.locator("table.vmishell tbody tr").first.inner_text() == before["table"]
    assert hexview.locator(".widget-html pre.vmishell-hex").inner_text() == before["hex"]
    status = watch.locator(".widget-html", has_text="bytes at 0x1000")
    assert status.inner_text() == before["watch"]
    assert watch.locator("table.vmishell tbody tr").count() == before["history"]
    assert watch.get_by_role("button", name="Stopped").is_visible()
    assert outputs.locator(".vmishell-snapshot").count() == 0, "the widgets, not the snapshots"
    assert not console.errors(*COMM_ERRORS, "model not found"), console.messages
    # What made it so: the saved file has every widget output's model in its widget state.
    saved = nbformat.read(lab.root / name, as_version=4)
    state = saved.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    views = [
        out["data"][WIDGET_VIEW]["model_id"]
        for cell in saved.cells
        for out in cell.get("outputs", [])
        if WIDGET_VIEW in out.get("data", {})
    ]
    assert len(views) == 3, "the table, the hex viewer and the watch"
    assert all(v in state for v in views), (views, sorted(state)[:5])


# -- without the widget front end ---------------------------------------------------------------


def test_without_the_widget_front_end_every_widget_shows_its_snapshot_and_the_fix(
    tmp_path, page
) -> None:
    page, console = page
    lab = start_lab(tmp_path, widgets=False)
    try:
        open_and_run(page, lab, "widgets.ipynb", _notebook(WIDGET_NOTEBOOK), timeout=60)
        snapshots = page.locator(".jp-OutputArea-output .vmishell-snapshot")
        snapshots.nth(2).wait_for(timeout=20_000)
        assert snapshots.count() == 3  # table, hex viewer, watch
        # The front end refused the comms; the kernel heard it and said how to fix it.
        hint = page.locator(".vmishell-snapshot-note", has_text="could not open")
        page.wait_for_function(
            "() => document.querySelectorAll('.vmishell-snapshot-note').length === 3 && "
            "[...document.querySelectorAll('.vmishell-snapshot-note')]"
            ".every(e => e.textContent.includes('could not open'))",
            timeout=20_000,
        )
        assert "pip install 'vmishell[jupyter]'" in hint.first.inner_text()
        assert page.get_by_text("rows 1–50 of 3000, page 1 of 60").count() == 1
        assert page.locator(".vmishell-snapshot td b").count() == 0, "guest markup stays text"
        shown = "\n".join(page.locator(".jp-OutputArea-output").all_text_contents())
        for repr_ in ("VBox(", "ProcessTable(", "HexViewer(", "WatchView(", "Error displaying"):
            assert repr_ not in shown
        # The watch keeps running; with no live view the kernel redraws its snapshot.
        page.wait_for_function(
            "() => { const e = [...document.querySelectorAll('.vmishell-snapshot')].pop();"
            " const m = e && e.textContent.match(/(\\d+) reads/); return m && +m[1] >= 10; }",
            timeout=20_000,
        )
        assert console.errors("Exception opening new comm"), "the page did refuse the comms"
    finally:
        stop_lab(lab)
