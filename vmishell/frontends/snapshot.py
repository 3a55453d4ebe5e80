"""Widgets that always show something: a static picture of their state beside the live view.

A widget's output normally holds only a reference to a model that lives in
the kernel and a widget manager in the browser. Without that manager (the
kernel and JupyterLab in different environments), in an exported notebook,
on GitHub, or after the kernel stopped, the reader would get a repr or
"model not found". So every vmishell widget is a `Snapshot`: its mimebundle
also carries text/html and text/plain pictures of its current state, with
one line saying that this is a snapshot and why the live widget is not there.
Front ends that have the widget manager prefer the widget view; the others
show the picture.

A front end without the manager refuses the widget's comm (JupyterLab logs
"Exception opening new comm" and closes it). The kernel hears that close;
the widget's output is then updated in place (it is displayed with a
display_id) with a hint saying how to fix the set-up, and later widgets say
so straight away.
"""

from __future__ import annotations

import html
import re
import time
import uuid
from typing import Any, ClassVar

#: How to get live widgets: the front end must be installed where JupyterLab runs.
FIX = (
    "install the widget front end where JupyterLab runs: pip install 'vmishell[jupyter]' "
    "(it brings jupyterlab and ipywidgets), then reload the page and re-run the cell"
)
#: The snapshot line when nothing is known about the front end.
NOTE = (
    "Snapshot of this widget as last drawn; the live widget is not shown here "
    "(no widget front end, an exported notebook, or its kernel has stopped). For live widgets, "
    + FIX
    + "."
)
#: The snapshot line once a front end refused a widget's comm.
MISSING = (
    "The live widget could not open: this Jupyter front end has no widget manager "
    "(its browser console says 'Exception opening new comm'). Showing a snapshot. To fix, "
    + FIX
    + "."
)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: Least seconds between two snapshot refreshes of a changing widget with no live view.
REFRESH_EVERY = 2.0

_TAG = re.compile(r"<[^>]*>")
_ROW = re.compile(r"<tr[^>]*>(.*?)</tr>", re.S)
_CELL = re.compile(r"<t[hd][^>]*>(.*?)</t[hd]>", re.S)


class FrontEnd:
    """What this kernel learnt about its widget front end (shared by all widgets)."""

    missing: ClassVar[bool] = False

    @classmethod
    def refused(cls) -> None:
        cls.missing = True


def html_to_text(markup: str) -> str:
    """Plain text of our own escaped HTML (tags dropped, entities decoded, a table row a line)."""
    if "<table" in markup:
        rows = (_CELL.findall(row) for row in _ROW.findall(markup))
        return "\n".join(
            "  ".join(html.unescape(_TAG.sub("", cell)).strip() for cell in cells) for cells in rows
        )
    text = _TAG.sub("", markup.replace("<br>", "\n").replace("</div>", "</div>\n"))
    return html.unescape(text).strip("\n")


def _html_parts(widget: Any) -> list[str]:
    """The HTML of every `ipywidgets.HTML` inside `widget`, depth first."""
    import ipywidgets as w

    if isinstance(widget, w.HTML):
        return [widget.value] if widget.value else []
    parts: list[str] = []
    for child in getattr(widget, "children", ()):
        parts.extend(_html_parts(child))
    return parts


class Snapshot:
    """Mixin for an ipywidgets box: a static picture of it travels with its widget view.

    Subclasses may override `snapshot_html` / `snapshot_text`; by default the
    picture is the HTML panes of the box (already escaped by whoever filled them).
    """

    _snapshot_display_id: str | None = None
    _snapshot_refused: bool = False
    _snapshot_refreshed: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listen_for_refusal()  # the refusal may come before the widget is displayed

    def snapshot_html(self) -> str:
        return "".join(f"<div>{part}</div>" for part in _html_parts(self))

    def snapshot_text(self) -> str:
        return "\n".join(html_to_text(part) for part in _html_parts(self))

    def snapshot_note(self) -> str:
        return MISSING if (FrontEnd.missing or self._snapshot_refused) else NOTE

    def snapshot_bundle(self) -> dict[str, str]:
        """text/html and text/plain: the note line, then the picture."""
        note = self.snapshot_note()
        markup = (
            '<div class="vmishell-snapshot">'
            '<div class="vmishell-snapshot-note" style="color:#666;font-size:85%;'
            f'font-style:italic;margin-bottom:4px">{html.escape(note)}</div>'
            f"{self.snapshot_html()}</div>"
        )
        return {"text/html": markup, "text/plain": f"[{note}]\n{self.snapshot_text()}"}

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = dict(super()._repr_mimebundle_(**kwargs) or {})  # type: ignore[misc]
        data.update(self.snapshot_bundle())
        return data

    def _ipython_display_(self) -> None:
        """Display with a display_id, so the output can be updated when the comm is refused."""
        from IPython.display import display

        if self._snapshot_display_id is None:
            self._snapshot_display_id = uuid.uuid4().hex
        display(self._repr_mimebundle_(), raw=True, display_id=self._snapshot_display_id)

    def refresh_snapshot(self) -> None:
        """Redraw the displayed output with the current picture (a live view re-renders too)."""
        if self._snapshot_display_id is None:
            return
        from IPython.display import update_display

        self._snapshot_refreshed = time.monotonic()
        update_display(self._repr_mimebundle_(), raw=True, display_id=self._snapshot_display_id)

    def snapshot_changed(self) -> None:
        """The state changed: redraw the picture if no live view shows it (at most every 2 s)."""
        if not (FrontEnd.missing or self._snapshot_refused):
            return  # a live view shows the change; redrawing would reset it
        if time.monotonic() - self._snapshot_refreshed >= REFRESH_EVERY:
            self.refresh_snapshot()

    def _listen_for_refusal(self) -> None:
        comm = getattr(self, "comm", None)
        if comm is not None and hasattr(comm, "on_close"):
            comm.on_close(self._on_comm_closed)

    def _on_comm_closed(self, _msg: Any) -> None:
        """The front end refused our comm: it has no widget manager (our close never calls this)."""
        self._snapshot_refused = True
        FrontEnd.refused()
        self.refresh_snapshot()


__all__ = ["FIX", "MISSING", "NOTE", "FrontEnd", "Snapshot", "html_to_text"]
