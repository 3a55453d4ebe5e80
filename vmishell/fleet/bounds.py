"""Per-target bounds on what comes back: rows, cell lengths, bytes.

A hostile guest controls how many processes, hits or mappings it shows and
how long its strings are; a fleet multiplies that by the number of targets.
Each target's frame is cut here, on the worker, before it is sent, so one
target cannot exhaust the client's memory; the cut is reported as a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one target may send back."""

    #: Rows of one target's frame.
    max_rows: int = 100_000
    #: Characters (str) or bytes (bytes) of one cell, like `Limits.max_string`.
    max_cell: int = 4096
    #: Bytes of one target's pickled answer, checked again on the receiving side.
    max_bytes: int = 256 << 20


def _cut_cell(value: Any, limit: int) -> Any:
    if isinstance(value, str | bytes) and len(value) > limit:
        return value[:limit]
    return value


def bound_frame(df: pd.DataFrame, bounds: Bounds) -> tuple[pd.DataFrame, list[str]]:
    """`df` cut to `bounds` (rows first, then long text cells), and what was cut."""
    notes: list[str] = []
    if len(df) > bounds.max_rows:
        notes.append(f"{len(df)} rows cut to {bounds.max_rows} (Bounds.max_rows)")
        df = df.iloc[: bounds.max_rows]
    cut = 0
    copied = False
    for i, dtype in enumerate(df.dtypes):
        if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            continue
        col = df.iloc[:, i]
        lengths = col.map(lambda v: len(v) if isinstance(v, str | bytes) else 0)
        long = lengths > bounds.max_cell
        if long.any():
            cut += int(long.sum())
            if not copied:
                df, copied = df.copy(), True
            df.isetitem(i, col.map(lambda v: _cut_cell(v, bounds.max_cell)))
    if cut:
        notes.append(f"{cut} cells cut to {bounds.max_cell} characters (Bounds.max_cell)")
    return df, notes


__all__ = ["Bounds", "bound_frame"]
