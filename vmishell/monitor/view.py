"""The live Jupyter view of a FieldWatch: current values, recent changes, a Stop button.

Like the byte-range WatchView, it repaints from the watch's listener and
shows guest values only through escaped HTML (`frame_html`).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import ipywidgets as w

from vmishell.frontends.frames import frame_html, guest_frame
from vmishell.frontends.snapshot import Snapshot
from vmishell.frontends.text import safe_text

if TYPE_CHECKING:
    from vmishell.monitor.watch import FieldSample, FieldWatch


def _status(text: str, *, error: bool = False) -> str:
    color = "#b00" if error else "#555"
    return f'<span style="color:{color}">{html.escape(safe_text(text))}</span>'


class FieldWatchView(Snapshot, w.VBox):
    """Current value of each target, the last changes, and a Stop button.

    A `Snapshot`: without a widget front end (or in a saved notebook) its output
    still shows the values and changes as last drawn.
    """

    def __init__(self, watch: FieldWatch, *, history_rows: int = 10) -> None:
        self.watch = watch
        self.history_rows = history_rows
        self.stop_button = w.Button(description="Stop", button_style="danger")
        self.status = w.HTML(_status(watch.status()))
        self.values = w.HTML(_status("waiting for the first read…"))
        self.changes = w.HTML()
        self.stop_button.on_click(lambda _b: self.watch.stop("stopped from the widget"))
        super().__init__([w.HBox([self.stop_button, self.status]), self.values, self.changes])
        watch.on_sample(self._on_sample)
        watch.on_stop(self._on_stop)

    def _on_sample(self, watch: FieldWatch, sample: FieldSample) -> None:
        import pandas as pd

        current = pd.DataFrame(
            {"target": list(watch.current), "value": [repr(v) for v in watch.current.values()]}
        )
        self.values.value = frame_html(guest_frame(current))
        self.status.value = _status(watch.status(), error=sample.error is not None)
        if sample.changes:
            self.changes.value = frame_html(watch.history.tail(self.history_rows))
        self.snapshot_changed()

    def _on_stop(self, watch: FieldWatch) -> None:
        self.stop_button.disabled = True
        self.stop_button.description = "Stopped"
        self.status.value = _status(watch.status())
        self.refresh_snapshot()  # the saved notebook keeps the final values and changes


__all__ = ["FieldWatchView"]
