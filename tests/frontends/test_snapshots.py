"""Every widget always shows something: a static picture of its state travels with it.

The last test runs a real Jupyter kernel and plays a front end without the
widget manager (as JupyterLab does when ipywidgets' front end is installed in
another environment than the kernel's): it closes every comm the kernel opens.
The user must then see the snapshot and a hint saying how to fix it, never a repr.
"""

from __future__ import annotations

import html
import os
import queue
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from vmishell.frontends.snapshot import MISSING, NOTE, WIDGET_MIME, FrontEnd

REPO = Path(__file__).resolve().parents[2]
EVIL = "<b>evil</b>\x1b[2J"


@pytest.fixture(autouse=True)
def _fresh_front_end():
    FrontEnd.missing = False
    yield
    FrontEnd.missing = False


def _table(rows: int = 5) -> Any:
    from vmishell.frontends.widgets import ProcessTable

    return ProcessTable(
        pd.DataFrame({"pid": range(1, rows + 1), "comm": [EVIL] + ["init"] * (rows - 1)})
    )


def _assert_safe_snapshot(bundle: dict[str, Any]) -> None:
    assert WIDGET_MIME in bundle, "the live widget view stays first in line"
    page, text = bundle["text/html"], bundle["text/plain"]
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "\x1b" not in page and "\x1b" not in text
    assert "Widget(" not in text and "VBox(" not in text


def test_a_process_table_carries_its_page_as_html_and_text() -> None:
    bundle = _table()._repr_mimebundle_()
    _assert_safe_snapshot(bundle)
    assert html.escape(NOTE) in bundle["text/html"] and bundle["text/plain"].startswith(f"[{NOTE}]")
    assert "rows 1–5 of 5" in bundle["text/plain"] and "init" in bundle["text/plain"]


def test_a_hex_viewer_carries_its_page() -> None:
    from vmishell.frontends.widgets import HexViewer

    class Evil:
        def read(self, vaddr: int, size: int) -> bytes:
            return (b"<b>evil</b>\x1b" * size)[:size]

    viewer = HexViewer(Evil(), 0x1000, page=32)
    bundle = viewer._repr_mimebundle_()
    assert "<b>evil" not in bundle["text/html"] and "&lt;b&gt;evil" in bundle["text/html"]
    assert "00001000  3c 62 3e 65" in bundle["text/plain"]
    assert "0x1000 – 0x1020" in bundle["text/plain"]
    viewer.next_button.click()
    assert "00001020" in viewer._repr_mimebundle_()["text/plain"], "the snapshot follows the view"


def test_a_watch_view_carries_its_status_bytes_and_history() -> None:
    from vmishell.frontends.watch import Watcher
    from vmishell.frontends.widgets import WatchView

    memory = bytearray(b"<b>evil</b>\x1b\0\0\0\0")

    class Guest:
        pid = 0

        def read(self, vaddr: int, size: int) -> bytes:
            return bytes(memory[vaddr - 0x600000 :][:size])

    watcher = Watcher(Guest(), 0x600000, 8, every=0.01, count=3, refresh=lambda: None)
    view = WatchView(watcher)
    watcher.poll()
    memory[0] = 0x41
    watcher.poll()
    bundle = view._repr_mimebundle_()
    assert "b&gt;evil&lt;" in bundle["text/html"] and ">evil<" not in bundle["text/html"]
    assert "running, 2 reads, 1 changes" in bundle["text/plain"]
    assert "00600000  41 62 3e 65" in bundle["text/plain"]
    # The history, a row a line: the whole watched value (8 bytes), escaped like the rest.
    assert "0x600000  0x0  8  b'<b>evil<'  b'Ab>evil<'" in bundle["text/plain"]
    assert "00600000  41 62 3e 65" in bundle["text/plain"], bundle["text/plain"]


def test_a_table_of_thousands_of_rows_renders_one_page() -> None:
    table = _table(5000)
    assert table.table.value.count("<tr>") <= table.page_size + 1
    assert table.count_text == "rows 1–50 of 5000, page 1 of 100"
    table.next_button.click()
    assert table.count_text.startswith("rows 51–100 of 5000") and table.rows["pid"].iloc[0] == 51
    table.descending.value = True  # a new order starts again on page 1
    assert table.page == 0 and table.rows["pid"].iloc[0] == 5000
    table.filter.value = "evil"
    assert table.count_text == "rows 1–1 of 1 (filtered from 5000), page 1 of 1"
    assert table.next_button.disabled and table.prev_button.disabled


# -- a real kernel, and a front end without the widget manager ---------------------------------


def _drain(kc: Any, until: Any, timeout: float = 30.0) -> list[dict]:
    """IOPub messages until `until(msg)` is true; comms the kernel opens are refused."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(msg)
        if msg["msg_type"] == "comm_open":  # what JupyterLab does without a widget manager
            close = kc.session.msg("comm_close", {"comm_id": msg["content"]["comm_id"], "data": {}})
            kc.shell_channel.send(close)
        if until(msg):
            return seen
    raise AssertionError(f"timed out; saw {[m['msg_type'] for m in seen]}")


def test_a_kernel_without_the_widget_front_end_shows_snapshots_and_the_fix() -> None:
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(REPO))
    try:
        code = (
            "import pandas as pd\n"
            "from vmishell.frontends.widgets import ProcessTable\n"
            f"ProcessTable(pd.DataFrame({{'pid': [1, 2], 'comm': [{EVIL!r}, 'init']}}))\n"
        )
        kc.execute(code)
        seen = _drain(
            kc,
            lambda m: m["msg_type"] == "update_display_data",
        )
        shown = [m for m in seen if m["msg_type"] in ("display_data", "execute_result")]
        assert len(shown) == 1, "one output: the widget with its snapshot"
        first = shown[0]["content"]
        _assert_safe_snapshot(first["data"])
        assert first["data"]["text/plain"].startswith(f"[{NOTE}]")
        display_id = first["transient"]["display_id"]
        update = next(m for m in seen if m["msg_type"] == "update_display_data")["content"]
        assert update["transient"]["display_id"] == display_id, "the same output is updated"
        _assert_safe_snapshot(update["data"])
        assert update["data"]["text/plain"].startswith(f"[{MISSING}]")
        assert html.escape(MISSING) in update["data"]["text/html"]
        assert "pip install 'vmishell[jupyter]'" in MISSING

        kc.execute("ProcessTable(pd.DataFrame({'pid': [3], 'comm': ['later']}))\n")
        seen = _drain(kc, lambda m: m["msg_type"] == "display_data")
        later = seen[-1]["content"]["data"]
        assert later["text/plain"].startswith(f"[{MISSING}]"), "later widgets say so at once"
        assert "later" in later["text/html"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
