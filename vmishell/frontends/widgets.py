"""Jupyter widgets: a lazy hex viewer, the live %watch view, a process table.

Each is a plain ipywidgets box (no custom JavaScript, so it works in every
Jupyter front end and in nbclient). Guest bytes and strings reach the page
only through `vmishell.frontends.memory.hex_html` and
`vmishell.frontends.frames.frame_html`, both of which escape everything.

Every widget is a `Snapshot` (see `vmishell.frontends.snapshot`): its output
also carries a static HTML and text picture of its state, so a notebook
without the widget front end, an exported one or one whose kernel stopped
still shows the table, the hex view or the watch history.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import ipywidgets as w

from vmishell.errors import VmiError
from vmishell.frontends.expr import evaluate
from vmishell.frontends.frames import GuestFrame, frame_html, frame_text, guest_frame
from vmishell.frontends.memory import hex_html, hex_text, read_window
from vmishell.frontends.snapshot import Snapshot

if TYPE_CHECKING:
    import pandas as pd

    from vmishell.frontends.memory import Reader
    from vmishell.frontends.watch import Sample, Watcher

_LAYOUT_BUTTON = w.Layout(width="auto")


def _status(text: str, error: bool = False) -> str:
    color = "#b00" if error else "#555"
    return f'<span style="color:{color}">{html.escape(text)}</span>'


class HexViewer(Snapshot, w.VBox):
    """Pages through guest memory, reading only the page on screen.

    `resolve` turns the "go to" text into an address (the magics pass the
    expression evaluator with kernel symbols); by default it accepts arithmetic on numbers.
    """

    def __init__(
        self,
        reader: Reader,
        address: int,
        *,
        page: int = 256,
        width: int = 16,
        resolve: Callable[[str], int] | None = None,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self.reader = reader
        self.page = max(width, min(page, 64 * 1024))
        self.width = width
        self._resolve = resolve or evaluate
        self._refresh = refresh
        self.address = address
        self.reads = 0  # how many page reads this viewer made (tests check laziness)
        self.prev_button = w.Button(description="◀ prev", layout=_LAYOUT_BUTTON)
        self.next_button = w.Button(description="next ▶", layout=_LAYOUT_BUTTON)
        self.reload_button = w.Button(description="reload", layout=_LAYOUT_BUTTON)
        self.goto = w.Text(
            placeholder="address or symbol+0x10",
            continuous_update=False,  # a value change is Enter or leaving the box
            layout=w.Layout(width="22em"),
        )
        self.go_button = w.Button(description="go", layout=_LAYOUT_BUTTON)
        self.status = w.HTML()
        self.view = w.HTML()
        self.prev_button.on_click(lambda _b: self.show(self.address - self.page))
        self.next_button.on_click(lambda _b: self.show(self.address + self.page))
        self.reload_button.on_click(lambda _b: self.show(self.address, refresh=True))
        self.go_button.on_click(lambda _b: self.go(self.goto.value))
        self.goto.observe(lambda change: self.go(change["new"]), names="value")
        bar = w.HBox(
            [self.prev_button, self.next_button, self.goto, self.go_button, self.reload_button]
        )
        super().__init__([bar, self.status, self.view])
        self.show(address)

    def go(self, text: str) -> None:
        try:
            address = self._resolve(text.strip())
        except VmiError as exc:
            self.status.value = _status(str(exc), error=True)
            return
        self.show(address)

    def show(self, address: int, *, refresh: bool = False) -> None:
        """Read and render the page starting at `address` (clamped at 0)."""
        address = max(0, address)
        self.address = address
        if refresh and self._refresh is not None:
            self._refresh()
        self.reads += 1
        try:
            data, readable = read_window(self.reader, address, self.page)
        except VmiError as exc:
            data, readable = bytes(self.page), bytes(self.page)
            self.status.value = _status(str(exc), error=True)
            self.status_text = str(exc)
        else:
            missing = readable.count(0)
            note = f", {missing} bytes unreadable" if missing else ""
            self.status_text = f"{address:#x} – {address + self.page:#x}{note}"
            self.status.value = _status(self.status_text)
        self.data = data
        self.readable = readable
        self.view.value = hex_html(data, address, readable=readable, width=self.width)
        self.snapshot_changed()

    def snapshot_html(self) -> str:
        return f"<div>{self.status.value}</div>{self.view.value}"

    def snapshot_text(self) -> str:
        dump = hex_text(self.data, self.address, readable=self.readable, width=self.width)
        return f"{self.status_text}\n{dump}"


class WatchView(Snapshot, w.VBox):
    """The live view of a Watcher: the bytes (changes highlighted), history, a Stop button."""

    def __init__(self, watcher: Watcher, *, history_rows: int = 10) -> None:
        self.watcher = watcher
        self.history_rows = history_rows
        self.highlighted: set[int] = set()
        self.stop_button = w.Button(description="Stop", button_style="danger")
        self.status = w.HTML(_status(watcher.status()))
        self.view = w.HTML(_status("waiting for the first read…"))
        self.changes = w.HTML()
        self.stop_button.on_click(lambda _b: self.watcher.stop("stopped from the widget"))
        super().__init__([w.HBox([self.stop_button, self.status]), self.view, self.changes])
        watcher.on_sample(self._on_sample)
        watcher.on_stop(self._on_stop)

    def _on_sample(self, watcher: Watcher, sample: Sample) -> None:
        if sample.changes:  # keep the last change lit until the next one
            self.highlighted = sample.changed_offsets
        if sample.error is None:
            self.view.value = hex_html(
                sample.data,
                watcher.address,
                readable=sample.readable,
                changed=self.highlighted,
            )
        self.status.value = _status(watcher.status(), error=sample.error is not None)
        if sample.changes:
            recent = watcher.history.tail(self.history_rows)
            self.changes.value = frame_html(recent)
        self.snapshot_changed()

    def _on_stop(self, watcher: Watcher) -> None:
        self.stop_button.disabled = True
        self.stop_button.description = "Stopped"
        self.status.value = _status(watcher.status())
        self.refresh_snapshot()  # the saved notebook keeps the final history


class ProcessTable(Snapshot, w.VBox):
    """A DataFrame-backed process table: filter by text, sort by any column, one page at a time.

    Only the page on screen becomes HTML, so thousands of rows stay quick to
    filter, sort and page through.
    """

    def __init__(self, df: pd.DataFrame, *, page_size: int = 50) -> None:
        self.df = df if isinstance(df, GuestFrame) else guest_frame(df)
        self.page_size = max(1, page_size)
        self.page = 0
        self._text: pd.DataFrame | None = None  # df as strings, made on the first filter
        columns = [str(c) for c in self.df.columns]
        self.sort_by = w.Dropdown(
            options=columns, value="pid" if "pid" in columns else columns[0], description="sort"
        )
        self.descending = w.Checkbox(value=False, description="descending")
        self.filter = w.Text(placeholder="filter (comm, cmdline, pid…)", description="filter")
        self.prev_button = w.Button(description="◀ prev", layout=_LAYOUT_BUTTON)
        self.next_button = w.Button(description="next ▶", layout=_LAYOUT_BUTTON)
        self.count = w.HTML()
        self.table = w.HTML()
        for control in (self.sort_by, self.descending, self.filter):
            control.observe(lambda _change: self.render(page=0), names="value")
        self.prev_button.on_click(lambda _b: self.render(page=self.page - 1))
        self.next_button.on_click(lambda _b: self.render(page=self.page + 1))
        controls = w.HBox([self.filter, self.sort_by, self.descending])
        pager = w.HBox([self.prev_button, self.next_button, self.count])
        super().__init__([controls, pager, self.table])
        self.render()

    @property
    def shown(self) -> pd.DataFrame:
        """The rows selected (filtered and sorted), on every page."""
        df = self.df
        needle = self.filter.value.strip()
        if needle:
            if self._text is None:
                self._text = self.df.astype(str)
            text = self._text.loc[df.index]
            mask = text.apply(lambda col: col.str.contains(needle, regex=False)).any(axis=1)
            df = df[mask]
        if self.sort_by.value in df.columns:
            df = df.sort_values(self.sort_by.value, ascending=not self.descending.value)
        return df

    @property
    def pages(self) -> int:
        return max(1, -(-len(self.shown) // self.page_size))

    def render(self, page: int | None = None) -> None:
        import pandas as pd

        shown = self.shown
        pages = max(1, -(-len(shown) // self.page_size))
        self.page = min(max(0, self.page if page is None else page), pages - 1)
        first = self.page * self.page_size
        rows = shown.iloc[first : first + self.page_size]
        self.prev_button.disabled = self.page == 0
        self.next_button.disabled = self.page >= pages - 1
        last = first + len(rows)
        self.count_text = (
            f"rows {first + 1 if len(rows) else 0}–{last} of {len(shown)}"
            + (f" (filtered from {len(self.df)})" if len(shown) != len(self.df) else "")
            + f", page {self.page + 1} of {pages}"
        )
        self.count.value = _status(self.count_text)
        with pd.option_context("display.max_rows", None, "display.show_dimensions", False):
            self.table.value = frame_html(rows)
        self.rows = rows
        self.snapshot_changed()

    def snapshot_html(self) -> str:
        return f"<div>{self.count.value}</div>{self.table.value}"

    def snapshot_text(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_rows", None):
            return f"{self.count_text}\n{frame_text(self.rows)}"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `predicate` until true or `timeout` (for notebooks and tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


__all__ = ["HexViewer", "ProcessTable", "WatchView", "wait_for"]
