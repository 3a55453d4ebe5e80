"""Outcomes of a sweep into frames: answers with a `target` column, errors, notes, timings.

Rows come in the order the targets were given (not the order they finished),
so the same sweep gives the same frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from vmishell.fleet.task import Outcome

ERROR_COLUMNS = ["target", "error_type", "error", "worker"]
NOTE_COLUMNS = ["target", "note"]
TIMING_COLUMNS = ["target", "worker", "seconds", "wall"]


@dataclass
class Sweep:
    """Everything one sweep produced."""

    frame: pd.DataFrame
    errors: pd.DataFrame
    notes: pd.DataFrame
    timings: pd.DataFrame


def combine(outcomes: Iterable[Outcome]) -> Sweep:
    """One frame of every successful answer (a `target` column first), and the rest."""
    done = list(outcomes)
    frames, hex_cols = [], []
    for o in done:
        if o.ok and isinstance(o.answer, pd.DataFrame):
            df = o.answer.copy()
            df.insert(0, "target", o.target)
            frames.append(df)
            hex_cols += [c for c in df.attrs.get("vmishell.hex", ()) if c not in hex_cols]
    filled = [f for f in frames if len(f)] or frames[:1]
    frame = pd.concat(filled, ignore_index=True) if filled else pd.DataFrame(columns=["target"])
    frame.attrs = {"vmishell.hex": hex_cols}
    errors = pd.DataFrame(
        [(o.target, o.error_type, o.error, o.worker) for o in done if not o.ok],
        columns=ERROR_COLUMNS,
    )
    notes = pd.DataFrame([(o.target, n) for o in done for n in o.notes], columns=NOTE_COLUMNS)
    timings = pd.DataFrame(
        [(o.target, o.worker, o.seconds, o.wall) for o in done], columns=TIMING_COLUMNS
    )
    return Sweep(frame, errors, notes, timings)


__all__ = ["ERROR_COLUMNS", "NOTE_COLUMNS", "TIMING_COLUMNS", "Sweep", "combine"]
