"""The shape of a notebook's outputs: what a re-run must reproduce, whatever the guest's numbers.

Committed notebooks carry the outputs of a CI-checked run (so they read well
on GitHub, exported, or opened without a kernel). A re-run cannot reproduce
pids, addresses or timings, but it must produce the same kinds of output in
the same cells: per code cell, each output's type, stream name and mime types.
When the code changes what a cell shows, the check fails until the notebook
is refreshed: `VMISHELL_NB_WRITE=1 python3 -m pytest tests/frontends/test_notebooks.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Shape = list[tuple[str, list[tuple[str, ...]]]]

#: Metadata a run leaves behind that says nothing about the notebook (kept out of the files).
VOLATILE_CELL_METADATA = ("execution",)


def output_shape(output: dict[str, Any]) -> tuple[str, ...]:
    kind = output["output_type"]
    if kind == "stream":
        return (kind, output.get("name", ""))
    if kind == "error":
        return (kind, output.get("ename", ""))
    return (kind, *sorted(output.get("data", {})))


def shape(nb: Any) -> Shape:
    """Per code cell: its source's first line and the shapes of its outputs."""
    return [
        (
            cell.source.splitlines()[0] if cell.source else "",
            [output_shape(o) for o in cell.get("outputs", [])],
        )
        for cell in nb.cells
        if cell.cell_type == "code"
    ]


def differences(committed: Any, fresh: Any) -> list[str]:
    """Human-readable differences between two notebooks' output shapes (empty: in sync)."""
    old, new = shape(committed), shape(fresh)
    if [s for s, _ in old] != [s for s, _ in new]:
        return ["the code cells differ (the committed notebook is not the one that ran)"]
    return [
        f"cell {i} ({source!r}): committed {was} but a run gives {now}"
        for i, ((source, was), (_, now)) in enumerate(zip(old, new, strict=True))
        if was != now
    ]


def clean(nb: Any) -> Any:
    """The executed notebook as it is committed: no timings, no kernel-specific metadata."""
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
    return nb


def write(nb: Any, path: Path) -> None:
    import nbformat

    nbformat.write(clean(nb), path)


__all__ = ["clean", "differences", "output_shape", "shape", "write"]
